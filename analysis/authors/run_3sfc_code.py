"""Run the authors' 3SFC code (Soptq/iccv23-3sfc) unmodified, beside fedmpi, for the
reproduction report (analysis/reproduce.py reads the log this writes).

    git clone https://github.com/Soptq/iccv23-3sfc /path/to/iccv23-3sfc   # commit e1b5ca9
    python analysis/authors/run_3sfc_code.py --code /path/to/iccv23-3sfc \
        --data-root /path/to/data --log runs/authors/fedavg_seed1.log -- \
        --method fedavg --dataset mnist --model mlp --n_client 10 --dirichlet 1.0 \
        --n_epoch 200 --n_client_epoch 5 --batch_size 256 --lr 0.01 --train_frac 0.8 --seed 1

Nothing of the authors' code is copied or edited. Two things are done around it, both
needed with current torch / torchvision and neither changing its numbers:

* ``data_utils.CustomSubset`` gets ``__getitems__`` returning ``[self[i] for i in idxs]``
  (torch >= 2.1 DataLoaders fetch a batch through ``__getitems__``, which ``Subset``
  defines and which would bypass the code's per-subset transform);
* the code reads ``./MNIST/raw`` (torchvision's layout, ``download=True`` finds the files
  and downloads nothing): the run happens in a scratch folder whose ``MNIST`` links to
  ``<data-root>/MNIST``.

One torch thread (``--threads``), stdout to ``--log`` (one "Round t, Clients Acc: [...],
Server Acc: [...]" line per round: what the report reads).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import sys
import tempfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--code", required=True, help="checkout of Soptq/iccv23-3sfc")
    p.add_argument("--data-root", default=os.environ.get("FEDMPI_DATA_ROOT", "data"),
                   help="folder holding MNIST/raw (default: $FEDMPI_DATA_ROOT or data)")
    p.add_argument("--log", required=True, help="file the code's stdout goes to")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the code's own flags")
    a = p.parse_args()
    code = os.path.abspath(a.code)
    flags = a.args[1:] if a.args[:1] == ["--"] else a.args
    log = os.path.abspath(a.log)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="iccv23-3sfc-")
    for name in ("MNIST", "FashionMNIST", "EMNIST"):
        src = os.path.join(os.path.abspath(a.data_root), name)
        if os.path.isdir(src):
            os.symlink(src, os.path.join(scratch, name))
    os.chdir(scratch)
    sys.path.insert(0, code)

    import torch

    torch.set_num_threads(a.threads)
    import data_utils  # the authors' module

    def __getitems__(self, idxs):  # noqa: N807 - the DataLoader's protocol name
        return [self[i] for i in idxs]

    data_utils.CustomSubset.__getitems__ = __getitems__
    sys.argv = [os.path.join(code, "main.py"), *flags]
    with open(log, "w", buffering=1) as fh, contextlib.redirect_stdout(fh):
        print(f"# authors' code {code}; flags: {' '.join(flags)}", flush=True)
        runpy.run_path(os.path.join(code, "main.py"), run_name="__main__")


if __name__ == "__main__":
    main()
