"""What rank 0 prints while a run goes and when it ends: the per-round line (with elapsed
time and ETA), the ``done:`` / ``stopped:`` summary, and the optional TensorBoard events.

Every figure printed is a property of the federated job, never of the simulator's layout:
"up" is the bytes the participating clients sent, "down" the bytes they had to download
(``downlink_payload_bytes``); the transport's counters (broadcast bytes x client ranks,
headers) stay in the run file as ``transport_*`` and are not printed. The round line is
one plain line per round (no carriage returns, so logs and SLURM ``.out`` files stay
readable); on a terminal it is cut to the terminal's width by leaving out the least
important fields.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Sequence

import numpy as np

#: the time phases of a round, as stored in ``/rounds/time_<phase>``
PHASES = ("train", "encode", "comm", "decode", "eval", "sharpness")


def fmt_bytes(n: float) -> str:
    """Bytes with an adaptive decimal unit: ``812 B``, ``217.6 KB``, ``1.6 MB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    raise AssertionError("unreachable")


def num(x: float) -> str:
    """A metric on the round line: 4 decimals, or "-" where the round did not measure it."""
    return f"{x:.4f}" if math.isfinite(x) else "-"


def fmt_duration(seconds: float) -> str:
    """``4.2s``, ``3m05s``, ``2h07m``; ``?`` when not finite."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def fit(fields: Sequence[tuple[int, str]], width: int | None) -> str:
    """Join ``(priority, text)`` fields with two spaces; with a ``width``, leave out the
    fields of the highest priority number (least important) until the line fits."""
    keep = list(fields)
    while width is not None and len("  ".join(t for _, t in keep)) > width and len(keep) > 1:
        worst = max(p for p, _ in keep)
        i = max(i for i, (p, _) in enumerate(keep) if p == worst)
        del keep[i]
    return "  ".join(t for _, t in keep)


def terminal_width(stream=None) -> int | None:
    """The terminal's width when ``stream`` (default stdout) is a terminal, else None;
    ``$FEDMPI_COLUMNS`` wins (``fedmpi.sweep --local`` sets it for the jobs it runs)."""
    if os.environ.get("FEDMPI_COLUMNS", "").isdigit():
        return int(os.environ["FEDMPI_COLUMNS"])
    stream = stream or sys.stdout
    try:
        if not stream.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    return shutil.get_terminal_size().columns - 1


class Progress:
    """Rank 0's per-round line. ``first`` is the round this process started at (a resumed
    run's ETA comes from the rounds this process has run, its elapsed time from the whole
    run's wall time)."""

    def __init__(self, rounds: int, first: int, width: int | None = None):
        self.rounds, self.first = rounds, first
        self.width = width
        self.t0 = time.perf_counter()

    def eta(self, done_round: int) -> float:
        """Seconds left after round ``done_round`` (0-based) at this process's pace."""
        ran = done_round + 1 - self.first
        left = self.rounds - done_round - 1
        return (time.perf_counter() - self.t0) / ran * left if ran > 0 else float("nan")

    def line(self, row: dict) -> str:
        rnd = int(row["round"])
        ratio = row["compression_ratio_up"]
        fields = [
            (0, f"round {rnd + 1:4d}/{self.rounds}"),
            (1, f"acc {num(row['test_acc'])}"),  # "-" in a round without evaluation
            (3, f"loss {num(row['test_loss'])}"),
            (5, f"train {row['train_loss']:.4f}"),
            (2, f"up {fmt_bytes(row['uplink_payload_bytes'])}"
                + (f" (x{ratio:.1f})" if math.isfinite(ratio) else " (x-)")),  # NaN: none sent
            (2, f"down {fmt_bytes(row['downlink_payload_bytes'])}"),
            (4, f"{row['time_round']:.2f} s"),
            (1, f"[{fmt_duration(row['wall_time'])}, ETA {fmt_duration(self.eta(rnd))}]"),
        ]
        return fit(fields, self.width)


def summary(path: str, name: str, stopped: str | None = None) -> str:
    """The ``done:`` line of a run, read from its run file (so a resumed run counts all
    its rounds and bytes); ``stopped`` (why the run stopped early) makes it ``stopped:``."""
    from fedmpi.metrics import open_run

    run = open_run(path)
    r = run.rounds
    n = len(run)
    acc = np.asarray(r["test_acc"], dtype=float)
    acc = acc[np.isfinite(acc)]
    final, best = (acc[-1], acc.max()) if acc.size else (float("nan"), float("nan"))
    wall = float(r["wall_time"][-1]) if n else 0.0
    phases = {p: float(np.nansum(r[f"time_{p}"])) for p in PHASES if f"time_{p}" in r}
    split = "  ".join(f"{p} {v:.1f}s" for p, v in phases.items())
    head = f"stopped: {name} ({stopped})" if stopped else f"done: {name}"
    total = run.config.run.rounds
    return (f"{head}: final acc {final:.4f} (best {best:.4f}), "
            f"uplink {fmt_bytes(float(np.sum(r['uplink_payload_bytes'])))}, "
            f"downlink {fmt_bytes(float(np.sum(r['downlink_payload_bytes'])))}, "
            f"{n}{'' if n == total else f' of {total}'} rounds in {fmt_duration(wall)} "
            f"({wall / max(1, n):.2f} s/round: {split}) -> {path}")


# ---------------------------------------------------------------------------- TensorBoard

#: /rounds metrics written as TensorBoard scalars: tag -> (metric, scale)
TB_SCALARS = {
    "accuracy/test": ("test_acc", 1.0), "loss/test": ("test_loss", 1.0),
    "loss/train": ("train_loss", 1.0), "compression/efficiency": ("efficiency_mean", 1.0),
    "compression/ratio_up": ("compression_ratio_up", 1.0),
    "bytes/uplink": ("uplink_payload_bytes", 1.0),
    "bytes/downlink": ("downlink_payload_bytes", 1.0),
    "time/round_s": ("time_round", 1.0),
    "sharpness/lambda_max": ("sharpness_lmax", 1.0),
    "sharpness/trace": ("sharpness_trace", 1.0),
}


def tensorboard_dir(h5_path: str) -> str:
    """The event folder next to the run file: ``runs/x.h5`` -> ``runs/x.tb``."""
    return os.path.splitext(h5_path)[0] + ".tb"


class TensorBoard:
    """Rank 0's TensorBoard event writer (``run.tensorboard = true``): one scalar per
    round metric, with the round (1-based) as the step. A resumed run
    purges the events of the rounds it redoes; a fresh run those of an earlier run of the
    same name. Without the ``tensorboard`` package it says so once and writes nothing."""

    def __init__(self, h5_path: str, first: int, config_toml: str, warn=None):
        self.writer = None
        self.logdir = tensorboard_dir(h5_path)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            (warn or _stderr)(
                f"fedmpi: warning: run.tensorboard = true, but TensorBoard is not "
                f"available ({exc}); install it with pip install -e '.[tensorboard]'. "
                "The run goes on without event files (the HDF5 file has every metric).")
            return
        self.writer = SummaryWriter(self.logdir, purge_step=first)
        if first == 0:
            self.writer.add_text("config", "```\n" + config_toml + "\n```", 0)

    def add(self, row: dict) -> None:
        if self.writer is None:
            return
        step = int(row["round"]) + 1
        for tag, (key, scale) in TB_SCALARS.items():
            v = float(row.get(key, float("nan")))
            if math.isfinite(v):
                self.writer.add_scalar(tag, v * scale, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
