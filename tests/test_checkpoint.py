"""Checkpoint / resume: a killed or signalled run, resumed on any number of ranks, equals
the uninterrupted run exactly (CPU, one thread per rank)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from fedmpi import checkpoint, config, launch
from fedmpi.metrics import open_run

from .conftest import REPO, SMALL, run_train
from .test_reliability import run_faulty

#: state everywhere: EF residuals, per-client lr decay, partial participation (missed-round
#: cache), a compressed downlink (replicas lag the server by the pending payload)
STATEFUL = [*SMALL, "--set", "run.rounds=6", "--set", "compressor.ef=true",
            "--set", "client.lr_decay=0.9", "--set", "server.participation=0.5",
            "--set", "compressor.downlink=same", "--set", "checkpoint.every=2"]
METRICS = ("test_acc", "test_loss", "train_loss", "uplink_bytes", "downlink_payload_bytes",
           "efficiency_mean")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    run_train(tmp, 3, STATEFUL, name="f")
    return open_run(str(tmp / "f.h5"))


def assert_same(a, b):
    assert len(a) == len(b)
    for m in METRICS:
        assert np.array_equal(a.rounds[m], b.rounds[m], equal_nan=True), m
    for m in ("train_loss", "participation", "uplink_bytes"):
        assert np.array_equal(a.clients[m], b.clients[m], equal_nan=True), m


@pytest.mark.parametrize("n_resume", [2, 4])
def test_killed_run_resumes_identically_on_other_rank_counts(tmp_path, reference, n_resume):
    proc, _ = run_faulty(tmp_path, 3, "kill:1:5", STATEFUL[len(SMALL):])
    assert proc.returncode != 0
    assert checkpoint.load(str(tmp_path / "f.ckpt"))["round"] == 4
    assert len(open_run(str(tmp_path / "f.h5"))) == 5  # row 4 is redone after resuming
    run_train(tmp_path, n_resume, [*STATEFUL, "--resume"], name="f")
    resumed = open_run(str(tmp_path / "f.h5"))
    assert resumed.complete and list(resumed.attrs["resumed_at_rounds"]) == [4]
    assert_same(resumed, reference)


def test_signal_checkpoints_and_exits_for_requeue(tmp_path):
    args = [*SMALL, "--set", "run.rounds=100000", "--set", f"run.out_dir={tmp_path}",
            "--set", "run.name=s", "--quiet"]
    proc = subprocess.Popen(launch.command(3, "fedmpi.train", args), cwd=str(REPO),
                            env=launch.environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        path = tmp_path / "s.h5"
        try:
            if path.exists() and len(open_run(str(path))) >= 3:
                break
        except (OSError, KeyError):
            pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # mpiexec forwards it to every rank
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == checkpoint.EXIT_REQUEUE, err
    state = checkpoint.load(str(tmp_path / "s.ckpt"))
    run = open_run(str(tmp_path / "s.h5"))
    assert not run.complete and len(run) == state["round"] >= 3
    # resuming (with fewer rounds requested) completes the run from there
    run_train(tmp_path, 2, [*SMALL, "--set", f"run.rounds={state['round'] + 2}", "--resume"],
              name="s")
    done = open_run(str(tmp_path / "s.h5"))
    assert done.complete and len(done) == state["round"] + 2


def test_resume_of_a_complete_run_does_nothing(tmp_path):
    run_train(tmp_path, 1, SMALL, name="c")
    before = os.path.getmtime(tmp_path / "c.h5")
    proc = run_train(tmp_path, 1, [*SMALL, "--resume"], name="c")
    assert "already complete" in proc.stdout
    assert os.path.getmtime(tmp_path / "c.h5") == before


def test_resume_without_checkpoint_starts_afresh(tmp_path):
    run_train(tmp_path, 2, [*SMALL, "--resume"], name="fresh")
    assert open_run(str(tmp_path / "fresh.h5")).complete


def test_different_config_is_refused(tmp_path):
    proc, _ = run_faulty(tmp_path, 3, "kill:1:5", STATEFUL[len(SMALL):])
    for change in (["--set", "client.lr=0.2"], ["--set", "compressor.ef=false"]):
        bad = run_train(tmp_path, 2, [*STATEFUL, *change, "--resume"], name="f", check=False)
        assert bad.returncode == 2 and "different config" in bad.stderr, bad.stderr
        key = change[1].split("=")[0]
        assert key in bad.stderr
    assert not open_run(str(tmp_path / "f.h5")).complete  # untouched


def test_config_differences_ignore_free_keys():
    a = config.load(None)
    b = config.load(None, ["run.rounds=99", "run.threads=4", "checkpoint.every=5"])
    assert checkpoint.differences(a, b) == []
    c = config.load(None, ["client.lr=0.3"])
    assert checkpoint.differences(a, c) == ["client.lr: 0.05 != 0.3"]
