"""Checkpoint / resume: a killed or signalled run, resumed on any number of ranks, equals
the uninterrupted run exactly (CPU, one thread per rank)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fedmpi import checkpoint, config, launch, train
from fedmpi.metrics import open_run
from fedmpi.progress import fmt_bytes

from .conftest import REPO, SMALL, run_train
from .test_reliability import FAULTY, run_faulty

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
    c = config.load(None, ["client.lr=0.3", "run.name=quickstart"])
    assert checkpoint.differences(a, c) == ["client.lr: 0.05 != 0.3"]


# ---------------------------------------------------------------------------- Ctrl-C


class Job:
    """``fedmpi.train`` with an injected fault (tests/faulty.py) in the background, through
    mpiexec or as one process; its stderr lines are collected as they come."""

    def __init__(self, tmp_path, n: int, fault: str, args=(), mpi: bool = True):
        cmd = [*launch.command(n, "fedmpi.train")[:-2], FAULTY, *SMALL, "--set",
               f"run.out_dir={tmp_path}", "--set", "run.name=h", *args]
        if not mpi:
            cmd = cmd[cmd.index(sys.executable):]  # python -m mpi4py FILE: a singleton
        env = launch.environment()
        env["FEDMPI_TEST_FAULT"] = fault
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        self.out = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(text in line for line in self.err):
                return
            time.sleep(0.05)
        raise AssertionError(f"never saw {text!r}; stderr:\n{''.join(self.err)}")

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        try:
            self.out = self.proc.stdout.read()
            self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
        self._reader.join(timeout=10)
        return self.proc.returncode, self.out, "".join(self.err)


@pytest.mark.parametrize("mpi", [True, False], ids=["mpiexec-n2", "one-process"])
def test_ctrl_c_checkpoints_at_the_round_boundary_and_resume_counts_everything(tmp_path, mpi):
    """SIGINT (what Ctrl-C sends; mpiexec passes it on to every rank) while a client rank
    is inside round 3 (it waits there for the signal): the round still ends, then the run
    checkpoints and exits 75, and its summary says "stopped". Resumed, the summary counts
    every round and byte of the run, read from the run file."""
    job = Job(tmp_path, 2, "pause:1:2" if mpi else "pause:0:2", ["--set", "run.rounds=5"],
              mpi=mpi)
    job.wait_for("paused")
    job.proc.send_signal(signal.SIGINT)
    code, out, err = job.finish()
    assert code == checkpoint.EXIT_REQUEUE, err
    assert "SIGINT: the run checkpoints at the end of this round" in err
    assert "Traceback" not in err
    assert checkpoint.load(str(tmp_path / "h.ckpt"))["round"] == 3  # round 3 ended first
    assert "stopped: h (SIGINT: checkpointed before round 4" in out
    assert " 3 of 5 rounds in " in out
    run = open_run(str(tmp_path / "h.h5"))
    assert not run.complete and len(run) == 3 and "SIGINT" in run.attrs["stopped"]
    proc = run_train(tmp_path, 1, [*SMALL, "--set", "run.rounds=5", "--resume"], name="h",
                     quiet=False)
    run = open_run(str(tmp_path / "h.h5"))
    assert run.complete and len(run) == 5 and list(run.attrs["resumed_at_rounds"]) == [3]
    done = proc.stdout.splitlines()[-1]
    assert done.startswith("done: h: ") and " 5 rounds in " in done, done
    assert f"uplink {fmt_bytes(run.rounds['uplink_payload_bytes'].sum())}," in done
    assert f"({run.rounds['wall_time'][-1] / 5:.2f} s/round" in done


@pytest.mark.parametrize("mpi", [True, False], ids=["mpiexec-n2", "one-process"])
def test_second_ctrl_c_aborts_at_once(tmp_path, mpi):
    """A rank holds round 3 open for 10 minutes: the first SIGINT cannot reach a round
    boundary, the second ends the job (mpiexec aborts it; a single process dies of the
    signal) long before, without a checkpoint."""
    job = Job(tmp_path, 2, "hold:1:2" if mpi else "hold:0:2", ["--set", "run.rounds=5"],
              mpi=mpi)
    job.wait_for("holding")
    job.proc.send_signal(signal.SIGINT)
    job.wait_for("Ctrl-C again aborts at once")
    job.proc.send_signal(signal.SIGINT)
    code, out, err = job.finish(timeout=60)
    assert code not in (0, checkpoint.EXIT_REQUEUE), (code, err)
    if not mpi:
        assert code == -signal.SIGINT and "SIGINT again: aborting now" in err
    assert not (tmp_path / "h.ckpt").exists()
    run = open_run(str(tmp_path / "h.h5"))
    assert not run.complete and len(run) == 2


def test_resume_with_rounds_but_no_checkpoint_is_refused(tmp_path):
    """A run killed before its first checkpoint: --resume must not start it afresh
    silently; --restart does, on purpose."""
    proc, _ = run_faulty(tmp_path, 2, "kill:1:3")
    assert proc.returncode != 0 and not (tmp_path / "f.ckpt").exists()
    before = os.path.getmtime(tmp_path / "f.h5")
    args = [*SMALL, "--set", "run.rounds=6"]
    bad = run_train(tmp_path, 2, [*args, "--resume"], name="f", check=False)
    assert bad.returncode == 2, bad.stderr
    assert "has 3 round(s) but there is no checkpoint" in bad.stderr
    assert "--restart" in bad.stderr
    assert os.path.getmtime(tmp_path / "f.h5") == before
    ok = run_train(tmp_path, 2, [*args, "--restart"], name="f")
    assert "starting again from round 1" in ok.stdout
    run = open_run(str(tmp_path / "f.h5"))
    assert run.complete and len(run) == 6 and "resumed_at_rounds" not in run.attrs


def test_checkpoints_by_wall_time(tmp_path, reference):
    """checkpoint.every_seconds: with a tiny interval every round boundary is due, so a
    run killed in round 6 resumes from the checkpoint taken at its top."""
    assert STATEFUL[-2:] == ["--set", "checkpoint.every=2"]
    args = [*STATEFUL[len(SMALL):-2], "--set", "checkpoint.every_seconds=1e-9"]
    proc, _ = run_faulty(tmp_path, 3, "kill:1:5", args)
    assert proc.returncode != 0
    assert checkpoint.load(str(tmp_path / "f.ckpt"))["round"] == 5
    run_train(tmp_path, 2, [*SMALL, *args, "--resume"], name="f")
    resumed = open_run(str(tmp_path / "f.h5"))
    assert resumed.complete and list(resumed.attrs["resumed_at_rounds"]) == [5]
    assert_same(resumed, reference)


@pytest.mark.parametrize("every, seconds, rnd, since, due", [
    (0, 600.0, 5, 599.0, False), (0, 600.0, 5, 600.0, True),  # by wall time
    (0, 0.0, 5, 1e9, False),  # both off: signals only
    (2, 0.0, 4, 0.0, True), (2, 0.0, 5, 0.0, False),  # every N rounds
    (2, 600.0, 3, 0.0, False), (2, 600.0, 3, 700.0, True),
    (1, 1e-9, 7, 1.0, False),  # never at the round this process started at (7)
])
def test_checkpoint_due(every, seconds, rnd, since, due):
    ck = config.CheckpointConfig(every=every, every_seconds=seconds)
    assert train.checkpoint_due(ck, rnd, 7 if rnd == 7 else 0, since) is due
