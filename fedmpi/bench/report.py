"""Benchmark numbers into the documentation: ``--write FILE`` replaces one generated block
of a markdown file (``<!-- bench:NAME:start -->`` ... ``<!-- bench:NAME:end -->``) with
what the benchmark just printed, headed by when, where and on which commit it ran. The
file's prose around the block is the reader's guide; the numbers are always the last
run's, never edited by hand."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command(prog: str, argv: list[str], written: str) -> str:
    """The command line that made a block: ``prog`` and its arguments, less ``--write FILE``
    (or ``--write=FILE``)."""
    shown = [a for a in argv if a not in ("--write", written) and not a.startswith("--write=")]
    return " ".join([prog, *shown])


def block(name: str, command: str, text: str) -> str:
    """The generated block: its command, provenance and the benchmark's output verbatim."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    head = (f"Measured {when} by `{command}` on {platform.node()} ({platform.machine()}, "
            f"{os.cpu_count()} cores, 1-minute load {load:.2f} at the end), fedmpi "
            f"{commit()}, torch {torch.__version__}:")
    return (f"<!-- bench:{name}:start (written by {command} --write; do not edit) -->\n"
            f"{head}\n\n```\n{text.rstrip()}\n```\n<!-- bench:{name}:end -->")


def write(path: str, name: str, command: str, text: str) -> None:
    """Replace block ``name`` of ``path`` (appended at the end when the file has none)."""
    p = Path(path)
    old = p.read_text() if p.exists() else ""
    new = block(name, command, text)
    start, end = f"<!-- bench:{name}:start", f"<!-- bench:{name}:end -->"
    if start in old and end in old:
        a, b = old.index(start), old.index(end) + len(end)
        old = old[:a] + new + old[b:]
    else:
        old = old.rstrip() + ("\n\n" if old else "") + new + "\n"
    p.write_text(old)
