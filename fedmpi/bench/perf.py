"""``python -m fedmpi.bench perf``: fedmpi against the official 3SFC code, side by side.

The job is the 3SFC paper's MNIST setting (Zhou et al., ICCV 2023): MLP (d = 199,210), 10
clients, per-class Dirichlet alpha = 1.0 over 80% of the training split (the rest is the
test set), 5 local epochs of plain SGD (lr 0.01, decay 0.99 per round trained, batch 64),
3SFC with M = 1 (S = 10 LBFGS steps of 20 iterations, error feedback), mean aggregation,
evaluation every round. Everything below is measured in one run of this command and
printed as ratios:

1. seconds per round: fedmpi launched with ``mpiexec`` (:func:`fedmpi.launch.command`) in
   two layouts, ``-n cores+1`` (a server rank and a client rank per core) and ``-n cores``
   with ``run.server_trains = true`` (rank 0 trains a client group too), read from the
   run's HDF5 ``time_round`` column without round 0 (warm-up); against
   :mod:`fedmpi.bench.reference3sfc`, the official code's loop in this process, on one
   torch thread (``--ref-threads``; the official code runs torch's default, which for
   this MLP gains nothing from a second thread on an idle machine and loses several
   times over when other work oversubscribes the cores). ``speed-up vs reference`` uses
   the faster layout.
2. local-training FLOP/s: :func:`fedmpi.models.flops_per_sample` x 3 (forward + backward)
   x the samples a round trains on (local epochs x every client's shard size), over the
   ``time_train`` column (the slowest rank's training time) of the faster layout, per
   training rank and thread; against a bare ``torch.optim.SGD`` loop on one thread over
   the same batches (round 1's batch schedule of every client, inputs already float).
3. ``-n N+1`` vs ``-n 3`` seconds per round on the same job with 40 clients (``-n 41``; N+1
   is capped by ``--max-ranks``): waiting ranks must not steal cores.
4. the peak RSS of that ``-n N+1`` run summed over its ranks (HDF5 root attribute
   ``peak_rss_mb``), next to N+1 x the peak RSS of a bare ``python -c "import torch"``
   measured here (the child's VmHWM), that plus 1 GiB (the issue's budget), the summed
   proportional set size at the end of the run (``pss_mb``: physical memory), and the floor
   under it: :mod:`fedmpi.bench.floor` at the same ``-n``, ranks that only import torch
   and initialise MPI, then run a bare hand-written MLP SGD loop on a rank's share of the
   samples (the least any one-torch-process-per-rank program that trains pays here).
5. the share of a round outside compute in the faster layout: (time_round - time_train -
   time_encode - time_decode - time_eval) / time_round, summed over the measured rounds.

``--quick`` shrinks everything (4 clients on 2,400 samples, 1 epoch, S = 2, 1 measured
round; the scaling runs are that job at ``-n 3`` and ``-n 5``) so that a test can run it
end to end; its numbers are not the issue's. The MNIST files come from ``--root``, else
``$FEDMPI_DATA_ROOT``, else the repository's ``data/`` folder. Timings on a
machine that other work is using are noisy: the 1-minute load average at the start is
printed (run it when that is well below the core count).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedmpi import config, data, launch, metrics
from fedmpi.bench import report
from fedmpi.client import batch_schedule
from fedmpi.config import ClientConfig, Config
from fedmpi.layout import cores as usable_cores
from fedmpi.models import build_module, flops_per_sample

NAME = "perf"

REPO = Path(__file__).resolve().parents[2]

#: the issue's targets
TARGET_SPEEDUP = 10.0  # reference s/round over fedmpi s/round, at least
TARGET_EFFICIENCY = 0.80  # fedmpi training FLOP/s per rank-thread over the bare loop, at least
TARGET_SCALING = 1.3  # -n N+1 over -n 3 s/round, at most
RSS_SLACK_MB = 1024.0  # summed peak RSS <= ranks x bare torch + this
TARGET_OUTSIDE = 0.05  # share of a round outside compute, below


# ---------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class Job:
    """The benchmarked job; :meth:`settings` are the ``--set`` overrides of fedmpi.train."""

    root: str
    num_clients: int = 10
    local_epochs: int = 5
    batch_size: int = 64
    lr: float = 0.01
    lr_decay: float = 0.99
    alpha: float = 1.0
    train_frac: float = 0.8
    max_train: int = 0
    max_test: int = 0
    hidden: int = 200
    m: int = 1
    s_steps: int = 10
    max_iter: int = 20
    seed: int = 0

    def settings(self) -> list[str]:
        out = [
            "data.dataset=mnist", f"data.root={self.root}", "data.partition=dirichlet",
            f"data.alpha={self.alpha}", f"data.num_clients={self.num_clients}",
            f"data.train_frac={self.train_frac}", "model.name=mlp",
            f"model.hidden={self.hidden}", f"client.lr={self.lr}",
            f"client.lr_decay={self.lr_decay}", f"client.batch_size={self.batch_size}",
            f"client.local_epochs={self.local_epochs}", "client.local_steps=0",
            "compressor.name=3sfc", f"compressor.m={self.m}",
            f"compressor.s_steps={self.s_steps}", f"compressor.max_iter={self.max_iter}",
            "server.aggregation=mean", "server.participation=1.0", "eval.every=1",
            f"run.seed={self.seed}",
        ]
        if self.max_train:
            out.append(f"data.max_train={self.max_train}")
        if self.max_test:
            out.append(f"data.max_test={self.max_test}")
        return out

    def config(self, *extra: str) -> Config:
        return config.load(None, [*self.settings(), *extra])

    def describe(self) -> str:
        cut = f", train capped at {self.max_train}" if self.max_train else ""
        return (f"MNIST + MLP (hidden {self.hidden}), {self.num_clients} clients, Dirichlet "
                f"alpha {self.alpha} over {self.train_frac:.0%} of the train split{cut}, "
                f"{self.local_epochs} local epoch(s), batch {self.batch_size}, lr {self.lr} "
                f"(x{self.lr_decay}/round), 3SFC M = {self.m} (S = {self.s_steps}, "
                f"max_iter {self.max_iter}, EF)")


def full_job(root: str) -> Job:
    return Job(root)


def quick_job(root: str) -> Job:
    return Job(root, num_clients=4, local_epochs=1, max_train=2400, max_test=600, s_steps=2,
               max_iter=5)


def default_root() -> str:
    env = os.environ.get("FEDMPI_DATA_ROOT")
    if env:
        return env
    return str(REPO / "data")


# ---------------------------------------------------------------------------- counting


def samples_per_round(sizes: list[int] | np.ndarray, client: ClientConfig) -> int:
    """Training samples one round processes: E x n_i summed over clients (local epochs),
    or K x min(B, n_i) summed (local steps); every client participating."""
    sizes = [int(n) for n in sizes]
    if client.local_epochs > 0:
        return client.local_epochs * sum(sizes)
    return sum(client.local_steps * min(client.batch_size, n) for n in sizes)


def training_flops(per_sample: int, samples: int) -> int:
    """Forward + backward = 3 x the forward FLOPs, per sample."""
    return 3 * int(per_sample) * int(samples)


def model_flops(cfg: Config) -> int:
    info = data.info(cfg.data)
    return flops_per_sample(build_module(cfg.model, info.input_shape, info.num_classes, 0),
                            info.input_shape)


# ---------------------------------------------------------------------------- fedmpi runs


@dataclass
class RunStats:
    """Means over the measured rounds (all rows but round 0) of one fedmpi run file."""

    rounds: int
    seconds: float  #: time_round
    train: float
    encode: float
    decode: float
    eval: float
    samples: int  #: training samples per round
    peak_rss_mb: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)  #: after every round (0, 1, ...)
    compute_slots: list[int] = field(default_factory=list)  #: per rank (fedmpi.gate)
    fit_pool_size: list[int] = field(default_factory=list)  #: per rank (fedmpi.fitpool)
    train_samples: int = 0  #: the clients' training samples, summed
    pss_mb: list[float] = field(default_factory=list)  #: per rank, at the end of the run

    def acc_after(self, rounds: int) -> float:
        """Test accuracy after ``rounds`` rounds (NaN if the run was shorter)."""
        return self.test_acc[rounds - 1] if 0 < rounds <= len(self.test_acc) else float("nan")

    @property
    def outside(self) -> float:
        """Share of a round outside train, encode, decode and eval."""
        compute = self.train + self.encode + self.decode + self.eval
        return (self.seconds - compute) / self.seconds if self.seconds > 0 else float("nan")


def run_stats(run: metrics.Run) -> RunStats:
    r = run.rounds
    n = len(run)
    if n == 0:
        raise RuntimeError(f"{run.path}: no rounds")
    rows = slice(1, n) if n > 1 else slice(0, n)  # round 0 is warm-up
    mean = {k: float(np.mean(r[k][rows])) for k in
            ("time_round", "time_train", "time_encode", "time_decode", "time_eval")}
    cfg = run.config
    sizes = run.partition.sum(axis=1)
    rss = [float(v) for v in np.atleast_1d(run.attrs.get("peak_rss_mb", []))]
    return RunStats(len(range(n)[rows]), mean["time_round"], mean["time_train"],
                    mean["time_encode"], mean["time_decode"], mean["time_eval"],
                    samples_per_round(sizes, cfg.client), rss,
                    [float(a) for a in r["test_acc"]],
                    [int(v) for v in np.atleast_1d(run.attrs.get("compute_slots", []))],
                    [int(v) for v in np.atleast_1d(run.attrs.get("fit_pool_size", []))],
                    int(sizes.sum()),
                    [float(v) for v in np.atleast_1d(run.attrs.get("pss_mb", []))])


@dataclass
class Layout:
    n: int
    server_trains: bool = False
    stats: RunStats | None = None
    wall: float = 0.0  #: seconds of the whole mpiexec call (start-up included)
    command: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"-n {self.n}" + (" run.server_trains=true" if self.server_trains else "")

    @property
    def training_ranks(self) -> int:
        return self.n if self.n == 1 or self.server_trains else self.n - 1

    def threads(self, cores: int) -> int:
        """torch threads per rank (fedmpi.layout: cores // ranks on the node, >= 1)."""
        return max(1, cores // self.n)


def run_fedmpi(job: Job, layout: Layout, rounds: int, out: str, name: str,
               timeout: float) -> Layout:
    """Launch fedmpi.train with ``layout`` for ``rounds`` rounds; fill in its stats."""
    args = [a for s in job.settings() for a in ("--set", s)]
    args += ["--set", f"run.server_trains={'true' if layout.server_trains else 'false'}",
             "--set", f"run.rounds={rounds}", "--set", f"run.name={name}",
             "--set", f"run.out_dir={out}", "--quiet", "--overwrite"]
    t0 = time.perf_counter()
    cmd, _ = mpirun(layout.n, "fedmpi.train", args, timeout)
    wall = time.perf_counter() - t0
    stats = run_stats(metrics.open_run(os.path.join(out, f"{name}.h5")))
    return replace(layout, stats=stats, wall=wall, command=cmd)


def mpirun(n: int, module: str, args: list[str], timeout: float
           ) -> tuple[list[str], subprocess.CompletedProcess]:
    """``mpiexec -n n python -m mpi4py -m module args`` from the repository; raises
    RuntimeError (with its stderr's tail) unless it exits 0."""
    cmd = launch.command(n, module, args)
    env = launch.environment()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    return cmd, proc


# ---------------------------------------------------------------------------- baselines


@dataclass
class RefStats:
    seconds: float  #: mean per round
    rounds: int
    threads: int
    setup: float  #: building datasets, loaders and models
    test_acc: float  #: after the last round
    train: float = 0.0  #: mean seconds per round of local training (data pipeline included)
    fit: float = 0.0  #: ... of the clients' LBFGS fits
    decode: float = 0.0  #: ... of the server's replay and mean
    eval: float = 0.0


def run_reference(cfg: Config, rounds: int, threads: int) -> RefStats:
    from fedmpi.bench.reference3sfc import Reference

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        ref = Reference(cfg)
        setup = time.perf_counter() - t0
        results = [ref.round(r) for r in range(rounds)]
    finally:
        torch.set_num_threads(before)
    def mean(key: str) -> float:
        return float(np.mean([getattr(r, key) for r in results]))

    return RefStats(mean("seconds"), rounds, threads, setup, results[-1].test_acc,
                    mean("time_train"), mean("time_fit"), mean("time_decode"),
                    mean("time_eval"))


@dataclass
class BareStats:
    seconds: float
    samples: int
    steps: int


def bare_sgd(cfg: Config, round_: int = 1, max_steps: int = 0, warmup: int = 10) -> BareStats:
    """One model, one thread, ``torch.optim.SGD`` over round ``round_``'s batches of every
    client (fedmpi's schedule), inputs converted to float beforehand; the timed loop is
    gather batch, forward, cross-entropy, backward, step."""
    loaded = data.load(cfg)
    parts = data.partition(loaded, cfg)
    info = data.info(cfg.data)
    norm = data.Normalizer(info)
    xs = [norm(torch.from_numpy(loaded.train.x[p])) for p in parts]
    ys = [torch.from_numpy(loaded.train.y[p]) for p in parts]
    steps = [(c, torch.from_numpy(idx)) for c, p in enumerate(parts)
             for idx in batch_schedule(len(p), cfg, round_, c)]
    if max_steps:
        steps = steps[:max_steps]
    module = build_module(cfg.model, info.input_shape, info.num_classes, cfg.run.seed)
    opt = torch.optim.SGD(module.parameters(), lr=cfg.client.lr)
    before = torch.get_num_threads()
    torch.set_num_threads(1)

    def step(c: int, idx: torch.Tensor) -> None:
        opt.zero_grad()
        F.cross_entropy(module(xs[c][idx]), ys[c][idx]).backward()
        opt.step()

    try:
        for c, idx in steps[:warmup]:
            step(c, idx)
        t0 = time.perf_counter()
        for c, idx in steps:
            step(c, idx)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    return BareStats(seconds, sum(int(idx.numel()) for _, idx in steps), len(steps))


#: appended to the measured code: the child's own peak RSS in KiB. VmHWM belongs to the
#: address space made by exec; ``ru_maxrss`` (and ``os.wait4``) would also keep the peak
#: of the pre-exec copy of this (large, torch-importing) process
_REPORT_HWM = """
import resource, sys
try:
    with open("/proc/self/status") as fh:
        kib = next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sys.stdout.write(str(kib))
"""


def child_peak_rss_mb(code: str = "import torch", repeat: int = 3) -> float:
    """Median peak RSS (MiB) of a fresh ``python -c CODE``, measured at its end."""
    env = launch.environment()
    values = []
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, "-c", code + "\n" + _REPORT_HWM], env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"python -c {code!r} exited {proc.returncode}: "
                               f"{proc.stderr[-2000:]}")
        values.append(int(proc.stdout.strip()) / 1024.0)
    return statistics.median(values)


def floor_rss(n: int, job: Job, samples: int, timeout: float
              ) -> tuple[list[float], list[float]]:
    """:mod:`fedmpi.bench.floor` at ``-n n`` with the job's MLP, each rank training on
    ``samples`` samples: per-rank peak RSS (MiB) after MPI init and after training."""
    info = data.info(job.config().data)
    dims = [int(np.prod(info.input_shape)), job.hidden, job.hidden, info.num_classes]
    share = max(1, samples)
    _, proc = mpirun(n, "fedmpi.bench.floor",
                     ["--dims", ",".join(map(str, dims)), "--samples", str(share),
                      "--batch", str(job.batch_size)], timeout)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return [float(v) for v in got["init"]], [float(v) for v in got["trained"]]


# ---------------------------------------------------------------------------- the table


@dataclass
class Results:
    job: str  #: Job.describe() of the main job
    cores: int
    reference: RefStats
    layouts: list[Layout]  #: item 1, in measuring order
    per_sample_flops: int
    bare: BareStats
    scaling_clients: int
    small: Layout  #: item 3, -n 3
    big: Layout  #: item 3 and 4, -n N+1
    bare_torch_mb: float
    #: fedmpi.bench.floor at the big run's -n: per-rank peak RSS after MPI init, after training
    floor_init: list[float] = field(default_factory=list)
    floor_trained: list[float] = field(default_factory=list)
    quick: bool = False
    load: float = float("nan")  #: 1-minute load average at the start
    settings: list[str] = field(default_factory=list)

    @property
    def best(self) -> Layout:
        return min(self.layouts, key=lambda lay: lay.stats.seconds)


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


WIDTH = 60  #: label column of the table


def _row(label: str, value: str, note: str = "") -> str:
    return f"   {label:<{WIDTH}}{value:>12}" + (f"   {note}" if note else "")


def render(res: Results) -> str:
    """The benchmark's table (every line, whatever the numbers)."""
    best = res.best
    st = best.stats
    title = "fedmpi perf" + (" --quick (a small job: not the issue's numbers)" if res.quick
                             else "")
    lines = [f"{title}: {res.job}",
             f"machine: {res.cores} cores, torch {torch.__version__}, 1-minute load average "
             f"{res.load:.2f} at the start",
             "-" * 100]

    # 1 ----------------------------------------------------------------------------
    ref = res.reference
    lines.append(f"1. seconds per round (fedmpi: mean of rounds 1..{st.rounds}, round 0 is "
                 f"warm-up; reference: mean of {ref.rounds} round(s))")
    lines.append(_row(f"reference: official 3SFC loop, 1 process, {ref.threads} thread(s)",
                      f"{ref.seconds:.2f} s", f"acc {ref.test_acc:.4f} after round "
                      f"{ref.rounds}; train "
                      f"{ref.train:.2f}, fit {ref.fit:.2f}, decode {ref.decode:.2f}, eval "
                      f"{ref.eval:.2f}"))
    for lay in res.layouts:
        s = lay.stats
        lines.append(_row(f"fedmpi {lay.label}", f"{s.seconds:.2f} s",
                          f"acc {s.acc_after(ref.rounds):.4f} after round {ref.rounds}; "
                          f"train {s.train:.2f}, encode "
                          f"{s.encode:.2f}, decode {s.decode:.2f}, eval {s.eval:.2f}"
                          + ("  <- fastest" if lay is best else "")))
    speedup = ref.seconds / st.seconds
    lines.append(f"   speed-up vs reference: {speedup:.1f}x   (fedmpi {best.label}; target "
                 f">= {TARGET_SPEEDUP:.0f}x: {_verdict(speedup >= TARGET_SPEEDUP)})")

    # 2 ----------------------------------------------------------------------------
    bare_rate = training_flops(res.per_sample_flops, res.bare.samples) / res.bare.seconds
    threads = best.threads(res.cores)
    rate = training_flops(res.per_sample_flops, st.samples) / st.train
    per_unit = rate / (best.training_ranks * threads)
    eff = per_unit / bare_rate
    lines.append(f"2. local-training FLOP/s ({res.per_sample_flops:,} FLOP per sample forward, "
                 f"x 3, x {st.samples:,} samples per round)")
    lines.append(_row(f"bare SGD loop, 1 thread, same batches ({res.bare.steps:,} steps)",
                      f"{bare_rate / 1e9:.1f} GFLOP/s"))
    lines.append(_row(f"fedmpi {best.label}, in a round (time_train)",
                      f"{rate / 1e9:.1f} GFLOP/s",
                      f"{best.training_ranks} training rank(s) x {threads} thread(s)"))
    lines.append(_row("fedmpi per rank-thread", f"{per_unit / 1e9:.1f} GFLOP/s"))
    lines.append(f"   training efficiency vs bare loop: {eff:.1%}   (target >= "
                 f"{TARGET_EFFICIENCY:.0%}: {_verdict(eff >= TARGET_EFFICIENCY)})")

    # 3 ----------------------------------------------------------------------------
    small, big = res.small.stats, res.big.stats
    ratio = big.seconds / small.seconds
    lines.append(f"3. seconds per round, the same job with {res.scaling_clients} clients "
                 f"(mean of {big.rounds} round(s) after warm-up)")
    for lay in (res.small, res.big):
        ls = lay.stats
        slots = max(ls.compute_slots, default=0)
        pools = sorted({p for p in ls.fit_pool_size if p})
        how = (f"gate {slots} slot(s)" if slots else "no gate") + (
            f", fit pools of {'/'.join(map(str, pools))}" if pools else "")
        lines.append(_row(f"fedmpi {lay.label}", f"{ls.seconds:.2f} s",
                          f"train {ls.train:.2f}, encode {ls.encode:.2f}; {how}"))
    lines.append(f"   {res.big.label} / {res.small.label}: {ratio:.2f}x   (target <= "
                 f"{TARGET_SCALING}x: {_verdict(ratio <= TARGET_SCALING)})")

    # 4 ----------------------------------------------------------------------------
    n = res.big.n
    total = float(sum(big.peak_rss_mb))
    floor = n * res.bare_torch_mb
    top = max(big.peak_rss_mb, default=float("nan"))
    lines.append(f"4. peak RSS at {res.big.label} (MiB)")
    lines.append(_row(f"summed over the {len(big.peak_rss_mb)} ranks", f"{total:,.0f}",
                      f"largest rank {top:,.0f}"))
    if big.pss_mb:
        lines.append(_row("(PSS at the end, summed: the job's physical memory)",
                          f"{sum(big.pss_mb):,.0f}", "shared pages counted once, not per rank"))
    lines.append(_row(f"{n} x bare `python -c \"import torch\"` ({res.bare_torch_mb:,.0f})",
                      f"{floor:,.0f}", f"sum / that = {total / floor:.2f}x"))
    budget = floor + RSS_SLACK_MB
    lines.append(_row(f"budget: {n} x bare + 1 GiB", f"{budget:,.0f}",
                      _verdict(total <= budget)))
    if res.floor_init and res.floor_trained:
        k = len(res.floor_init)
        init, trained = float(sum(res.floor_init)), float(sum(res.floor_trained))
        lines.append(_row(f"floor, {k} ranks: import torch + MPI init", f"{init:,.0f}",
                          f"{(init - floor) / k:+.1f} MiB per rank over bare torch"))
        lines.append(_row(f"floor, {k} ranks: + a bare hand-written MLP SGD loop",
                          f"{trained:,.0f}",
                          f"{(trained - init) / k:+.1f} MiB per rank; budget - floor = "
                          f"{budget - trained:+,.0f}"))
        lines.append(_row("fedmpi over that floor", f"{total - trained:+,.0f}",
                          f"{(total - trained) / k:+.1f} MiB per rank"))

    # 5 ----------------------------------------------------------------------------
    lines.append(f"5. share of a round outside compute (MPI + HDF5 + bookkeeping), fedmpi "
                 f"{best.label}")
    lines.append(f"   (time_round - train - encode - decode - eval) / time_round: "
                 f"{st.outside:.1%}   (target < {TARGET_OUTSIDE:.0%}: "
                 f"{_verdict(st.outside < TARGET_OUTSIDE)})")
    if st.outside < 0:
        lines.append("   (below 0: time_train and time_encode are each the slowest rank's, and "
                     "the two can be different ranks)")

    lines.append("-" * 100)
    lines.append("fedmpi runs: " + _launcher(res) + " -n N python -m mpi4py -m fedmpi.train "
                 + " ".join(f"--set {s}" for s in res.settings)
                 + " [--set run.server_trains=true] --set run.rounds=R")
    runs = [(lay, "") for lay in res.layouts]
    for lay in (res.small, res.big):
        if not any(lay is other for other, _ in runs):
            runs.append((lay, f", data.num_clients={res.scaling_clients}"))
    for lay, what in runs:
        lines.append(f"   {lay.label + what:<{WIDTH}}R = {lay.stats.rounds + 1:<4} wall "
                     f"{lay.wall:.1f} s (start-up included)")
    return "\n".join(lines)


def _launcher(res: Results) -> str:
    for lay in (*res.layouts, res.small, res.big):
        if lay.command:
            return os.path.basename(lay.command[0])
    return "mpiexec"


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fedmpi.bench perf",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small job (tests; seconds)")
    p.add_argument("--rounds", type=int, default=0,
                   help="measured fedmpi rounds, after round 0 (default 5; --quick 1)")
    p.add_argument("--ref-rounds", type=int, default=0,
                   help="reference rounds (default 2; --quick 1)")
    p.add_argument("--ref-threads", type=int, default=1,
                   help="torch threads of the reference (0 = torch's default)")
    p.add_argument("--max-ranks", type=int, default=0,
                   help="cap the scaling run's -n (default 41; --quick 5)")
    p.add_argument("--scaling-clients", type=int, default=0,
                   help="clients of the scaling job (default 40; --quick 4)")
    p.add_argument("--cores", type=int, default=0,
                   help="cores to lay ranks out for (default: this process's CPU affinity)")
    p.add_argument("--bare-steps", type=int, default=0,
                   help="cap the bare SGD loop's steps (default: a whole round's)")
    p.add_argument("--root", default="", help="folder holding MNIST/raw (default "
                   "$FEDMPI_DATA_ROOT, else the repository's data/)")
    p.add_argument("--out", default="", help="keep the run files here (default: a "
                   "temporary folder, removed)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per fedmpi run")
    p.add_argument("--write", default="", metavar="FILE",
                   help="also write the table into FILE's generated perf block (e.g. "
                        "docs/performance.md; fedmpi.bench.report)")
    args = p.parse_args(argv)
    for key in ("rounds", "ref_rounds", "ref_threads", "max_ranks", "scaling_clients", "cores",
                "bare_steps"):
        if getattr(args, key) < 0:
            p.error(f"--{key.replace('_', '-')} must be >= 0")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    root = args.root or default_root()
    if not (Path(root) / "MNIST" / "raw").is_dir():
        print(f"perf: no MNIST files under {root}/MNIST/raw (use --root or "
              "$FEDMPI_DATA_ROOT)", file=sys.stderr)
        return 2
    q = args.quick
    job = quick_job(root) if q else full_job(root)
    measured = args.rounds or (1 if q else 5)
    ref_rounds = args.ref_rounds or (1 if q else 2)
    scaling = replace(job, num_clients=args.scaling_clients or (4 if q else 40))
    max_ranks = args.max_ranks or (5 if q else 41)
    cores = args.cores or usable_cores()
    if max_ranks < 4:
        print("perf: --max-ranks must be >= 4 (the scaling run compares with -n 3)",
              file=sys.stderr)
        return 2
    cfg = job.config()
    load0 = os.getloadavg()[0]
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="fedmpi-perf-")
    out = args.out or tmp.name
    os.makedirs(out, exist_ok=True)
    saved_root = os.environ.get("FEDMPI_DATA_ROOT")
    os.environ["FEDMPI_DATA_ROOT"] = root  # it wins over data.root: every side reads root
    try:
        def say(message: str) -> None:  # progress on stderr; the table goes to stdout
            if not q:
                print(f"perf: {message}", file=sys.stderr, flush=True)

        rounds = measured + 1
        layouts = []
        for lay in (Layout(cores + 1), Layout(max(1, cores), server_trains=True)):
            say(f"fedmpi {lay.label} ...")
            name = f"perf_n{lay.n}{'_st' if lay.server_trains else ''}"
            layouts.append(run_fedmpi(job, lay, rounds, out, name, args.timeout))
        say(f"reference, {ref_rounds} round(s) ...")
        reference = run_reference(cfg, ref_rounds,
                                  args.ref_threads or torch.get_num_threads())
        say("bare SGD loop ...")
        bare = bare_sgd(cfg, round_=1, max_steps=args.bare_steps)
        big_n = min(scaling.num_clients + 1, max_ranks)
        say(f"{scaling.num_clients}-client job at -n 3 and -n {big_n} ...")
        same = [lay for lay in layouts if lay.n == 3 and not lay.server_trains]
        if scaling == job and same:  # --quick: the scaling job is the main job
            small = same[0]
        else:
            small = run_fedmpi(scaling, Layout(3), rounds, out, "perf_scaling_n3",
                               args.timeout)
        big = run_fedmpi(scaling, Layout(big_n), rounds, out, f"perf_scaling_n{big_n}",
                         args.timeout)
        bare_torch = child_peak_rss_mb()
        say(f"memory floor at -n {big_n} ...")
        floor_init, floor_trained = floor_rss(
            big_n, scaling, big.stats.train_samples // max(1, big_n - 1), args.timeout)
    finally:
        if saved_root is None:
            os.environ.pop("FEDMPI_DATA_ROOT", None)
        else:
            os.environ["FEDMPI_DATA_ROOT"] = saved_root
        if tmp is not None:
            tmp.cleanup()
    res = Results(job.describe(), cores, reference, layouts, model_flops(cfg), bare,
                  scaling.num_clients, small, big, bare_torch, floor_init, floor_trained,
                  quick=q,
                  load=load0, settings=job.settings())
    table = render(res)
    print(table, flush=True)
    if args.write:
        report.write(args.write, "perf" + ("-quick" if q else ""),
                     report.command("python -m fedmpi.bench perf", argv, args.write), table)
    return 0
