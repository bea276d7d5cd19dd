"""Per-rank memory: MPICH defaults of fedmpi.launch.environment, and which modules the
ranks of a real run load (a heavy import on every client rank costs its resident memory
once per rank: ``python -m fedmpi.bench perf`` sums peak RSS over 41 ranks)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedmpi import launch

from . import datagen
from .conftest import REPO
from .test_data import HEAVY


def fake_launcher(tmp_path: Path, name: str, version: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{version}\nEOF\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


HYDRA = ("HYDRA build details:\n    Version:                                 5.0.2\n"
         "    Configure options:                       --with-device=ch4:ucx,ofi")
OPEN_MPI = "mpirun (Open MPI) 5.0.3\n\nReport bugs to https://www.open-mpi.org/community/help/"


def test_mpich_defaults_are_added_for_mpich_only_and_the_user_wins(tmp_path):
    mpich = fake_launcher(tmp_path, "mpiexec.hydra", HYDRA)
    env = launch.environment({"PATH": "/bin"}, launcher=mpich)
    for key, value in launch.MPICH_DEFAULTS.items():
        assert env[key] == value
    assert env["PATH"] == "/bin" and env["OMPI_ALLOW_RUN_AS_ROOT"] == "1"
    user = {"MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_NUM_CELLS": "64", "UCX_TLS": "all"}
    env = launch.environment(user, launcher=mpich)
    assert env["MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_NUM_CELLS"] == "64"
    assert env["UCX_TLS"] == "all"
    assert env["UCX_MM_FIFO_SIZE"] == launch.MPICH_DEFAULTS["UCX_MM_FIFO_SIZE"]
    assert user == {"MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_NUM_CELLS": "64", "UCX_TLS": "all"}
    ompi = launch.environment({}, launcher=fake_launcher(tmp_path, "mpirun", OPEN_MPI))
    assert not set(launch.MPICH_DEFAULTS) & set(ompi)
    gone = launch.environment({}, launcher=str(tmp_path / "no-such-mpiexec"))
    assert not set(launch.MPICH_DEFAULTS) & set(gone)


def test_default_environment_follows_the_real_launcher(monkeypatch):
    for key in launch.MPICH_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    env = launch.environment()
    if launch.is_mpich(launch.mpiexec()):
        assert all(env[k] == v for k, v in launch.MPICH_DEFAULTS.items())
    else:
        assert not set(launch.MPICH_DEFAULTS) & set(env)


#: runs fedmpi.train and, before it exits, writes each rank's sys.modules to OUT/modules.R
WRAPPER = """
import os, sys
from fedmpi import train

finish = train.finalize_and_exit


def finalize_and_exit(code):
    from mpi4py import MPI
    with open(os.path.join(os.environ["MODULES_OUT"],
                           f"modules.{MPI.COMM_WORLD.Get_rank()}"), "w") as fh:
        fh.write("\\n".join(sorted(sys.modules)))
    finish(code)


train.finalize_and_exit = finalize_and_exit
train.main(sys.argv[1:])
"""


def test_ranks_of_a_3sfc_mnist_run_import_nothing_heavy(tmp_path):
    """-n 3 on MNIST-format files with 3SFC: no rank imports torchvision (or what it pulls
    in), and client ranks do not import h5py either (only rank 0 writes the run file)."""
    datagen.mnist_like(str(tmp_path), "MNIST", 120, 40)
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    settings = ["data.dataset=mnist", f"data.root={tmp_path}", "data.partition=iid",
                "data.num_clients=2", "model.name=mlp", "model.hidden=16",
                "compressor.name=3sfc", "compressor.s_steps=1", "compressor.max_iter=2",
                "client.local_steps=2", "run.rounds=2", "run.threads=1", "run.name=mods",
                f"run.out_dir={tmp_path}"]
    cmd = [launch.mpiexec(), *(["--oversubscribe"] if launch.is_open_mpi(launch.mpiexec())
                               else []),
           "-n", "3", sys.executable, "-m", "mpi4py", str(script), "--quiet",
           *[a for s in settings for a in ("--set", s)]]
    env = launch.environment()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["MODULES_OUT"] = str(tmp_path)
    env.pop("FEDMPI_DATA_ROOT", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "mods.h5").exists()
    for rank in range(3):
        modules = set((tmp_path / f"modules.{rank}").read_text().split())
        assert "fedmpi.synth" in modules  # the run did go through 3SFC
        forbidden = [m for m in HEAVY if m != "h5py" or rank > 0]
        heavy = sorted(m for m in modules if m.split(".")[0] in forbidden
                       or any(m == f or m.startswith(f + ".") for f in forbidden))
        assert not heavy, f"rank {rank} imported {heavy[:10]}"
    assert "h5py" in set((tmp_path / "modules.0").read_text().split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
