"""How waiting ranks wait: seconds per round and CPU use, side by side in one run.

The same job (synthetic data, N clients, MLP) runs at ``-n 3`` (2 client ranks) and at
``-n N+1`` (one client per rank), with ``run.mpi_wait = sleep`` (nonblocking collectives
polled with backing-off sleeps, fedmpi's default) and ``block`` (the MPI library's
blocking calls, which busy-poll in MPICH). Prints seconds per round (median over rounds
after the first), the ratio of the wide layout to ``-n 3``, and the CPU seconds the
server rank used per wall second (a rank that spins shows ~1.0).

    python -m fedmpi.bench wait [--clients 10] [--rounds 12] [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import numpy as np

from fedmpi import launch
from fedmpi.bench import report
from fedmpi.metrics import open_run

NAME = "wait"


def run_job(n: int, wait: str, clients: int, rounds: int, steps: int, out: str) -> dict:
    name = f"wait-n{n}-{wait}"
    args = ["--set", f"run.name={name}", "--set", f"run.out_dir={out}", "--set",
            f"run.rounds={rounds}", "--set", f"data.num_clients={clients}", "--set",
            f"client.local_steps={steps}", "--set", f"run.mpi_wait={wait}", "--set",
            "run.threads=1", "--quiet", "--overwrite"]
    proc = subprocess.run(launch.command(n, "fedmpi.train", args), capture_output=True,
                          text=True, env=launch.environment())
    if proc.returncode:
        raise RuntimeError(f"-n {n} {wait} failed:\n{proc.stderr[-3000:]}")
    run = open_run(os.path.join(out, f"{name}.h5"))
    t = run.rounds["time_round"][1:]
    wall = float(run.rounds["wall_time"][-1])  # the round loop, as cpu_seconds
    return {"n": n, "wait": wait, "s_per_round": float(np.median(t)),
            "server_cpu_per_wall": float(run.attrs["cpu_seconds"][0]) / max(wall, 1e-9),
            "cpu_total": float(np.sum(run.attrs["cpu_seconds"]))}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fedmpi.bench wait")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--waits", default="sleep,block")
    p.add_argument("--write", default="", metavar="FILE",
                   help="also write the table into FILE's generated wait block "
                        "(fedmpi.bench.report)")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for wait in a.waits.split(","):
            for n in (3, a.clients + 1):
                rows.append(run_job(n, wait, a.clients, a.rounds, a.steps, out))
    lines = [f"{a.clients} clients x {a.steps} local steps (MLP, synthetic), "
             f"median s/round over rounds 2..{a.rounds}, {os.cpu_count()} cores",
             f"{'wait':>6} {'-n':>4} {'s/round':>9} {'ratio vs -n 3':>14} "
             f"{'server CPU/wall':>16} {'CPU s (all ranks)':>18}"]
    base = {r["wait"]: r["s_per_round"] for r in rows if r["n"] == 3}
    for r in rows:
        lines.append(f"{r['wait']:>6} {r['n']:>4} {r['s_per_round']:9.3f} "
                     f"{r['s_per_round'] / base[r['wait']]:13.2f}x "
                     f"{r['server_cpu_per_wall']:16.2f} {r['cpu_total']:18.1f}")
    print("\n".join(lines))
    if a.write:
        report.write(a.write, "wait", report.command("python -m fedmpi.bench wait", argv,
                                                     a.write), "\n".join(lines))
    return 0
