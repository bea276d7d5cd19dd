"""The least memory an MPI rank that trains an MLP can have: the floor under fedmpi's RSS.

Run under ``mpiexec -n N python -m mpi4py -m fedmpi.bench.floor [--dims ...]``. Every rank
imports torch, has MPI initialised (by ``-m mpi4py``), records its peak RSS, then runs a
bare SGD loop of an MLP written out by hand (forward with ``addmm``/``relu``, the
cross-entropy gradient and backward by hand: no autograd graph, no ``torch.nn``, no
``torch.optim``, the smallest footprint among the loops tried) on random data, and records
its peak RSS again. Rank 0 prints one JSON object: ``{"init": [MiB per rank], "trained":
[MiB per rank]}``.

Of fedmpi it imports only :mod:`fedmpi.comm` (the one module that talks to MPI: numpy
and mpi4py, both loaded already), so the two sums are what any program of fedmpi's shape
(one torch process per MPI rank, each training) pays on this machine before doing anything
federated; :mod:`fedmpi.bench.perf` prints them next to fedmpi's own peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import torch

from fedmpi.comm import SERVER, world_gather, world_rank


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM) in MiB."""
    try:
        with open("/proc/self/status") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0


def train(dims: list[int], samples: int, steps: int, batch: int, seed: int,
          lr: float = 0.01) -> float:
    """``steps`` SGD steps of the MLP ``dims`` (ReLU between layers) on random uint8 inputs
    scaled on the fly, by hand; returns the last loss (so the work cannot be skipped)."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(a, b, generator=g) / a ** 0.5
          for a, b in zip(dims[:-1], dims[1:], strict=True)]
    bs = [torch.zeros(b) for b in dims[1:]]
    x = torch.randint(0, 256, (samples, dims[0]), dtype=torch.uint8, generator=g)
    y = torch.randint(0, dims[-1], (samples,), generator=g)
    loss = 0.0
    for _ in range(steps):
        idx = torch.randint(0, samples, (batch,), generator=g)
        acts = [x.index_select(0, idx).float().div_(255.0)]
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            a = torch.addmm(b, acts[-1], w)
            acts.append(a.relu_() if i < len(ws) - 1 else a)
        p = torch.softmax(acts[-1], 1)
        rows = torch.arange(batch)
        loss = float(-p[rows, y[idx]].log().mean())
        p[rows, y[idx]] -= 1.0
        e = p.div_(batch)
        for i in range(len(ws) - 1, -1, -1):
            gw, gb = acts[i].t() @ e, e.sum(0)
            if i:
                e = (e @ ws[i].t()).mul_(acts[i] > 0)
            ws[i].sub_(gw, alpha=lr)
            bs[i].sub_(gb, alpha=lr)
    return loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpi4py -m fedmpi.bench.floor",
                                description=__doc__.split("\n")[0])
    p.add_argument("--dims", default="784,200,200,10", help="MLP layer widths")
    p.add_argument("--samples", type=int, default=1200, help="a rank's training samples")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args(argv)
    dims = [int(v) for v in args.dims.split(",")]
    if len(dims) < 2 or min(dims) < 1 or args.samples < 1 or args.batch < 1 or args.steps < 0:
        p.error("--dims needs two or more positive widths; --samples and --batch >= 1")
    torch.set_num_threads(max(1, args.threads))
    rank = world_rank()
    init = peak_rss_mb()
    train(dims, args.samples, args.steps, min(args.batch, args.samples), rank)
    trained = peak_rss_mb()
    rows = world_gather((init, trained))
    if rank == SERVER:
        sys.stdout.write(json.dumps({"init": [r[0] for r in rows],
                                     "trained": [r[1] for r in rows]}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
