"""Failures end the whole job promptly and never leave a corrupt or "complete" result.

Each case runs a real MPI job. Times are measured (and printed with ``-s``) for the
README's "Failure behaviour" table; the assertions only bound them generously, to catch
hangs, not to benchmark.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fedmpi import launch
from fedmpi.metrics import open_run

from .conftest import REPO, SMALL, mnist_root, run_train

FAULTY = str(Path(__file__).with_name("faulty.py"))


def run_faulty(tmp_path, n, fault, args=(), timeout=120):
    cmd = [*launch.command(n, "fedmpi.train")[:-2], FAULTY, *SMALL,  # python -m mpi4py FILE
           "--set", "run.rounds=6", "--set", f"run.out_dir={tmp_path}", "--set", "run.name=f",
           "--quiet", *args]
    env = launch.environment()
    env["FEDMPI_TEST_FAULT"] = fault
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(REPO))
    took = time.monotonic() - t0
    print(f"\n[timing] {fault}: exit {proc.returncode} after {took:.1f} s")
    return proc, took


def test_exception_on_one_rank_aborts_everyone(tmp_path):
    proc, took = run_faulty(tmp_path, 5, "raise:2:3")
    assert proc.returncode != 0
    assert "rank 2 of 5 failed" in proc.stderr and "injected failure" in proc.stderr
    assert took < 30
    run = open_run(str(tmp_path / "f.h5"))
    assert len(run) == 3 and not run.complete


def test_sigkilled_client_rank_ends_the_job(tmp_path):
    proc, took = run_faulty(tmp_path, 5, "kill:3:2")
    assert proc.returncode != 0 and took < 60
    run = open_run(str(tmp_path / "f.h5"))
    assert len(run) == 2 and not run.complete and "complete" not in run.attrs
    assert np.array_equal(run.rounds["round"], [0, 1])


@pytest.mark.parametrize("swmr", ["true", "false"])
def test_rank0_killed_while_writing_leaves_a_readable_file(tmp_path, swmr):
    proc, took = run_faulty(tmp_path, 3, "killwrite:0:3", ["--set", f"run.hdf5_swmr={swmr}"])
    assert proc.returncode != 0 and took < 60
    run = open_run(str(tmp_path / "f.h5"))
    assert len(run) >= 3 and not run.complete
    assert np.array_equal(run.rounds["round"][:3], [0, 1, 2])
    assert np.isfinite(run.rounds["test_acc"][:3]).all()


def test_nan_update_stops_the_run_and_is_recorded(tmp_path):
    proc, _ = run_faulty(tmp_path, 3, "nan:1:2")
    assert proc.returncode == 3
    assert "round 3/6: client 1: client update is not finite" in proc.stderr  # 1-based
    summary = proc.stdout.splitlines()[-1]  # "stopped", not "done"
    assert summary.startswith("stopped: f (round 3/6: client 1: client update is not finite")
    assert " 3 of 6 rounds in " in summary
    run = open_run(str(tmp_path / "f.h5"))
    assert not run.complete and "client 1" in run.attrs["stopped"]
    assert len(run) == 3 and run.clients["diverged"][2, 1] == 2
    assert run.rounds["diverged_clients"].tolist() == [0, 0, 1]


def test_nan_update_skipped_by_config(tmp_path):
    proc, _ = run_faulty(tmp_path, 3, "nan:1:2", ["--set", "run.on_divergence=skip"])
    assert proc.returncode == 0, proc.stderr
    run = open_run(str(tmp_path / "f.h5"))
    assert run.complete and len(run) == 6
    assert run.clients["diverged"][2].tolist() == [0, 2, 0, 0, 0, 0]
    assert np.isfinite(run.rounds["test_loss"]).all()


def test_exploding_loss_is_detected(tmp_path):
    proc = run_train(tmp_path, 3, [*SMALL, "--set", "client.lr=1e8"], check=False)
    assert proc.returncode == 3
    assert "is not finite" in proc.stderr and "round 1/3" in proc.stderr


# ---------------------------------------------------------------- bad input catalogue


def _mnist_copy(tmp_path: Path, mutate) -> str:
    src = Path(mnist_root()) / "MNIST" / "raw"
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, raw / f.name)
    mutate(raw)
    return str(tmp_path / "data")


def _truncate_gz(raw: Path) -> None:
    for f in raw.iterdir():
        if not f.name.endswith(".gz"):
            f.unlink()
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:1000])


def _bad_magic(raw: Path) -> None:
    f = raw / "train-labels-idx1-ubyte"
    data = bytearray(f.read_bytes())
    data[:4] = b"\x00\x00\x07\x07"
    f.write_bytes(bytes(data))
    with gzip.open(raw / "train-labels-idx1-ubyte.gz", "wb") as g:
        g.write(bytes(data))


CASES = {
    "unknown key": (["--set", "client.lrr=0.1"], "client.lrr"),
    "wrong type": (["--set", "client.lr='fast'"], "client.lr"),
    "negative lr": (["--set", "client.lr=-0.1"], "client.lr"),
    "zero rounds": (["--set", "run.rounds=0"], "run.rounds"),
    "zero batch size": (["--set", "client.batch_size=0"], "client.batch_size"),
    "zero clients": (["--set", "data.num_clients=0"], "data.num_clients"),
    "alpha <= 0": (["--set", "data.alpha=0"], "data.alpha"),
    "unknown compressor": (["--set", "compressor.name=zip"], "compressor.name"),
    "budget below one synthetic sample": (["--set", "compressor.name=3sfc", "--set",
                                           "compressor.budget=10"], "compressor.budget"),
    "unknown model": (["--set", "model.name=gpt"], "model.name"),
    "unknown dataset": (["--set", "data.dataset=imagenet"], "data.dataset"),
    "more client ranks than clients": (["--set", "data.num_clients=2"], "data.num_clients"),
    "--set unknown section": (["--set", "nosuch.key=1"], "nosuch.key"),
    "--set malformed": (["--set", "client.lr"], "client.lr"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(tmp_path, case):
    args, key = CASES[case]
    t0 = time.monotonic()
    proc = run_train(tmp_path, 4, [*SMALL, *args], check=False)
    took = time.monotonic() - t0
    print(f"\n[timing] bad input {case!r}: exit {proc.returncode} after {took:.1f} s")
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and proc.stderr.count("fedmpi: error") == 1
    assert "Traceback" not in proc.stderr
    assert not list(Path(tmp_path).rglob("*.h5"))
    assert took < 60


def test_output_dir_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_train(blocker / "out", 3, SMALL, check=False)  # out_dir under a plain file
    assert proc.returncode == 2 and "run.out_dir" in proc.stderr, proc.stderr
    assert str(blocker / "out") in proc.stderr and "Traceback" not in proc.stderr


def test_toml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nrounds = 3\nname = \n")
    proc = run_train(tmp_path, 2, [str(bad)], check=False)
    assert proc.returncode == 2 and "bad.toml" in proc.stderr and "line 3" in proc.stderr


def test_output_file_exists(tmp_path):
    (tmp_path / "run.h5").write_bytes(b"not a run")
    proc = run_train(tmp_path, 2, SMALL, check=False)
    assert proc.returncode == 2 and "run.h5 exists" in proc.stderr
    assert (tmp_path / "run.h5").read_bytes() == b"not a run"


@pytest.mark.skipif(mnist_root() is None, reason="real MNIST files not present")
@pytest.mark.parametrize("name, mutate, words", [
    ("missing", lambda raw: shutil.rmtree(raw), ["not found", "MNIST/raw"]),
    ("truncated gz", _truncate_gz, ["MNIST"]),
    ("wrong magic", _bad_magic, ["MNIST"]),
])
def test_bad_dataset_files(tmp_path, monkeypatch, name, mutate, words):
    root = _mnist_copy(tmp_path, mutate)
    monkeypatch.setenv("FEDMPI_DATA_ROOT", root)
    t0 = time.monotonic()
    proc = run_train(tmp_path, 3, [*SMALL, "--set", "data.dataset=mnist", "--set",
                                   "data.partition=iid"], check=False)
    print(f"\n[timing] dataset {name}: exit {proc.returncode} after "
          f"{time.monotonic() - t0:.1f} s")
    assert proc.returncode == 2, proc.stderr
    assert root in proc.stderr and all(w in proc.stderr for w in words), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(Path(tmp_path).rglob("*.h5"))


def test_data_root_unwritable_for_download(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("FEDMPI_DATA_ROOT", str(blocker / "data"))
    proc = run_train(tmp_path, 2, [*SMALL, "--set", "data.dataset=mnist", "--set",
                                   "data.partition=iid", "--set", "data.download=true"],
                     check=False)
    assert proc.returncode == 2 and str(blocker / "data") in proc.stderr, proc.stderr
    assert not list(Path(tmp_path).rglob("*.h5"))
