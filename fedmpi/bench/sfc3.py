"""``python -m fedmpi.bench 3sfc``: where a 3SFC round spends its time, and what batching
the synthetic-feature fits of a rank's clients buys.

3SFC (Zhou et al., ICCV 2023) costs one double-backward LBFGS fit per client per round.
Part 1 runs MNIST + MLP (d = 199,210) with 10 clients through ``fedmpi.train`` at each
``--ranks`` (default -n 1 and -n 3) and prints seconds per round split into train /
encode / communicate / decode / evaluate, read from the HDF5 ``time_*`` columns (round 0
is left out as warm-up when there are more rounds), and encode / train. Part 2 fits the
same 10 clients' real updates four ways in one process, side by side: one
``torch.optim.LBFGS`` per client (the official loop), the lockstep batched LBFGS with the
factored objective of a dense chain (``factored``: no d-sized gradient formed, all
clients in one call), evaluating clients one by one (``loop``) and in one
``torch.func.vmap`` call (``vmap``), with the mean cosine each reaches.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from fedmpi import config, launch, synth
from fedmpi.metrics import open_run
from fedmpi.models import FlatModel, build_module

NAME = "3sfc"
PHASES = ("train", "encode", "comm", "decode", "eval")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m fedmpi.bench {NAME}",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=os.environ.get("FEDMPI_DATA_ROOT", "data"),
                   help="folder holding MNIST/raw (default: $FEDMPI_DATA_ROOT or ./data)")
    p.add_argument("--ranks", default="1,3", help="MPI process counts to time (1,3)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run (3)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--s-steps", type=int, default=10, help="3SFC LBFGS outer steps S (10)")
    p.add_argument("--local-steps", type=int, default=5, help="K local SGD steps (5)")
    p.add_argument("--batch-size", type=int, default=256, help="local batch (256, paper)")
    p.add_argument("--lr", type=float, default=0.01, help="client lr (0.01, paper)")
    p.add_argument("--threads", type=int, default=0,
                   help="run.threads (0 = the node's cores / ranks on it)")
    p.add_argument("--skip-runs", action="store_true", help="only part 2 (fitting)")
    return p.parse_args(argv)


def train_args(a: argparse.Namespace, out: str, name: str) -> list[str]:
    sets = {"data.dataset": "mnist", "data.root": a.data_root, "data.partition": "dirichlet",
            "data.num_clients": a.clients, "client.local_steps": a.local_steps,
            "client.batch_size": a.batch_size, "client.lr": a.lr, "run.rounds": a.rounds,
            "run.threads": a.threads, "compressor.name": "3sfc",
            "compressor.s_steps": a.s_steps, "run.out_dir": out, "run.name": name}
    args = []
    for k, v in sets.items():
        args += ["--set", f"{k}={v}" if not isinstance(v, str) else f"{k}='{v}'"]
    return [*args, "--quiet", "--overwrite"]


def time_runs(a: argparse.Namespace) -> None:
    ranks = [int(r) for r in a.ranks.split(",") if r]
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for n in ranks:
            name = f"bench3sfc_n{n}"
            env = launch.environment()
            t0 = time.perf_counter()
            proc = subprocess.run(launch.command(n, "fedmpi.train", train_args(a, out, name)),
                                  capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"-n {n} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            run = open_run(os.path.join(out, f"{name}.h5"))
            r = run.rounds
            keep = slice(1, None) if len(run) > 1 else slice(None)
            per = {k: float(np.mean(r[f"time_{k}"][keep])) for k in PHASES}
            rows.append((n, float(np.mean(r["time_round"][keep])), per,
                         float(np.mean(r["efficiency_mean"][keep])),
                         float(r["compression_ratio_up"][-1]), float(r["test_acc"][-1]), wall))
    which = f"mean of rounds 2..{a.rounds}" if a.rounds > 1 else "round 1"
    print(f"\nMNIST + MLP (d = 199,210), {a.clients} clients, 3SFC M = 1, S = {a.s_steps}, "
          f"K = {a.local_steps}, batch {a.batch_size}; seconds per round ({which})")
    head = (f"{'ranks':>5} {'round':>7} " + " ".join(f"{k:>7}" for k in PHASES)
            + f" {'enc/train':>9} {'eff':>6} {'ratio':>7} {'acc':>6} {'wall':>6}")
    print(head)
    for n, total, per, eff, ratio, acc, wall in rows:
        rel = per["encode"] / per["train"] if per["train"] > 0 else float("nan")
        print(f"{'-n ' + str(n):>5} {total:7.2f} " + " ".join(f"{per[k]:7.2f}" for k in PHASES)
              + f" {rel:9.1f} {eff:6.3f} {ratio:7.1f} {acc:6.3f} {wall:6.1f}")
    print("(train / encode: the slowest client rank; comm: the rest of the round outside "
          "train, encode, decode and evaluate; wall: the whole run incl. start-up)")


def client_updates(a: argparse.Namespace, model: FlatModel, w: torch.Tensor
                   ) -> list[torch.Tensor]:
    """Each client's update: K SGD steps from w on its own MNIST samples."""
    import torchvision

    ds = torchvision.datasets.MNIST(a.data_root, train=True, download=False)
    x = ds.data.float().div(255).unsqueeze(1)
    y = ds.targets
    sm = synth.SynthModel(model)
    g = torch.Generator().manual_seed(0)
    per = len(y) // a.clients
    out = []
    for c in range(a.clients):
        cur = w.clone()
        for _ in range(a.local_steps):
            idx = c * per + torch.randint(0, per, (a.batch_size,), generator=g)
            cur = cur - a.lr * sm.grad(cur, x[idx], F.one_hot(y[idx], 10).float())
        out.append(cur - w)
    return out


def time_fits(a: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, a.threads) if a.threads else torch.get_num_threads())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = FlatModel(build_module(config.ModelConfig(), (1, 28, 28), 10, 0), device)
    w = model.params.detach().clone()
    targets = torch.stack(client_updates(a, model, w))
    direction = synth.Gradient(synth.SynthModel(model), 1, (1, 28, 28), 10)
    gen = torch.Generator().manual_seed(1)
    starts = [synth.init_xy(gen, direction.x_shape, direction.y_shape, device)
              for _ in range(a.clients)]
    x0 = torch.stack([s[0] for s in starts])
    y0 = torch.stack([s[1] for s in starts])
    opts = synth.FitOptions(steps=a.s_steps)
    ways = {"sequential (torch LBFGS per client)": lambda: synth.fit_sequential(
        direction, w, targets, x0, y0, opts)}
    for mode in ("factored", "loop", "vmap"):
        ways[f"batched lockstep LBFGS, {mode}"] = (
            lambda mode=mode: synth.fit(direction, w, targets, x0, y0, opts, mode=mode))
    print(f"\nfitting {a.clients} clients' synthetic samples (MNIST MLP, M = 1, "
          f"S = {a.s_steps}) on {device}, {torch.get_num_threads()} thread(s)")
    print(f"{'method':<38} {'seconds':>8} {'x seq':>6} {'mean cos':>9}")
    base = None
    for label, run in ways.items():
        if "vmap" in label:
            run_small = synth.FitOptions(steps=1, max_iter=1)  # torch.func warm-up
            synth.fit(direction, w, targets[:2], x0[:2], y0[:2], run_small, mode="vmap")
        t0 = time.perf_counter()
        res = run()
        dt = time.perf_counter() - t0
        base = base or dt
        cos = float(torch.mean(1 - res.loss.float()))
        print(f"{label:<38} {dt:8.2f} {base / dt:6.2f} {cos:9.3f}")


def main(argv: list[str]) -> int:
    a = parse(argv)
    if not os.path.isdir(os.path.join(a.data_root, "MNIST", "raw")):
        print(f"MNIST not found under {a.data_root!r} (MNIST/raw); pass --data-root",
              file=sys.stderr)
        return 2
    if not a.skip_runs:
        time_runs(a)
    time_fits(a)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
