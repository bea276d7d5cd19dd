"""What rank 0 shows while a run goes: the round line (fields, terminal width, ETA),
byte and duration units, and the optional TensorBoard events of a real run."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from fedmpi import progress
from fedmpi.metrics import open_run

from .conftest import SMALL, run_train

ROW = {"round": 9, "test_acc": 0.8123, "test_loss": 0.5123, "train_loss": 0.4312,
       "uplink_payload_bytes": 12_345, "downlink_payload_bytes": 2_176_400,
       "compression_ratio_up": 31.0, "time_round": 0.52, "wall_time": 65.0}


@pytest.mark.parametrize("n, text", [(812, "812 B"), (217_640, "217.6 KB"),
                                     (1_632_000, "1.6 MB"), (3.2e9, "3.2 GB")])
def test_fmt_bytes(n, text):
    assert progress.fmt_bytes(n) == text


@pytest.mark.parametrize("s, text", [(4.24, "4.2s"), (185, "3m05s"), (7620, "2h07m"),
                                     (math.inf, "?")])
def test_fmt_duration(s, text):
    assert progress.fmt_duration(s) == text


def test_round_line_fits_the_terminal():
    p = progress.Progress(rounds=200, first=0)
    full = p.line(ROW)
    assert full.startswith("round   10/200  acc 0.8123  loss 0.5123  train 0.4312  up 12.3 KB "
                           "(x31.0)  down 2.2 MB  0.52 s  [1m05s, ETA ")
    p.width = 60  # a narrow terminal: the least important fields go first
    narrow = p.line(ROW)
    assert len(narrow) <= 60 and narrow.startswith("round   10/200  acc 0.8123  ")
    assert "ETA" in narrow and "train" not in narrow
    p.width = 10
    assert p.line(ROW) == "round   10/200"  # the round number always stays


def test_eta_uses_this_processs_pace():
    p = progress.Progress(rounds=100, first=40)  # resumed at round 41
    p.t0 -= 20.0  # 20 s for rounds 41..50 -> 2 s a round, 50 left
    assert 99 < p.eta(49) < 101
    assert math.isnan(progress.Progress(10, 5).eta(4))


def test_terminal_width_off_a_terminal(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMPI_COLUMNS", raising=False)
    with open(tmp_path / "log", "w") as fh:
        assert progress.terminal_width(fh) is None  # a log file: full lines
    monkeypatch.setenv("FEDMPI_COLUMNS", "77")
    assert progress.terminal_width() == 77


TB = ["--set", "run.tensorboard=true", "--set", "run.rounds=4"]


def test_tensorboard_events_match_the_run_file(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(tmp_path, 2, [*SMALL, *TB], name="tb")
    logdir = tmp_path / "tb.tb"  # next to tb.h5
    assert logdir.is_dir() and list(logdir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(logdir))
    events.Reload()
    run = open_run(str(tmp_path / "tb.h5"))
    acc = events.Scalars("accuracy/test")
    assert [e.step for e in acc] == [1, 2, 3, 4]
    assert np.allclose([e.value for e in acc], run.rounds["test_acc"])
    down = events.Scalars("bytes/downlink")
    assert [e.value for e in down] == list(run.rounds["downlink_payload_bytes"])
    assert "config/text_summary" in events.Tags()["tensors"]


def test_tensorboard_absent_degrades_with_a_message(tmp_path):
    """Without the tensorboard package the run goes on, says so once, writes no events."""
    fake = tmp_path / "site"
    (fake / "tensorboard").mkdir(parents=True)
    (fake / "tensorboard" / "__init__.py").write_text(
        'raise ImportError("No module named \'tensorboard\' (test)")\n')
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{fake}{os.pathsep}{old}"
    try:
        proc = run_train(tmp_path, 1, [*SMALL, *TB], name="notb")
    finally:
        os.environ["PYTHONPATH"] = old
    assert proc.stderr.count("TensorBoard is not available") == 1, proc.stderr
    assert "pip install -e '.[tensorboard]'" in proc.stderr
    assert open_run(str(tmp_path / "notb.h5")).complete
    assert not Path(tmp_path / "notb.tb").exists()


def test_summary_counts_every_phase_sharpness_included(tmp_path):
    """A run that spends much of its time measuring sharpness: the done line lists that
    time with the other phases, as the run file has them."""
    sharp = ["--set", "eval.sharpness_every=1", "--set", "eval.sharpness_samples=256",
             "--set", "eval.sharpness_iters=20", "--set", "eval.sharpness_trace_samples=20"]
    proc = run_train(tmp_path, 1, [*SMALL, *sharp], name="sh")
    run = open_run(str(tmp_path / "sh.h5"))
    done = proc.stdout.splitlines()[-1]
    total = float(np.nansum(run.rounds["time_sharpness"]))
    assert total > 0 and f"  sharpness {total:.1f}s) -> " in done, done
    assert done == progress.summary(str(tmp_path / "sh.h5"), "sh")


def test_a_round_without_evaluation_shows_dashes_not_nan():
    row = {"round": 2, "test_acc": float("nan"), "test_loss": float("nan"),
           "train_loss": 0.5, "uplink_payload_bytes": 1000, "compression_ratio_up": 4.0,
           "downlink_payload_bytes": 4000, "time_round": 0.1, "wall_time": 0.3}
    line = progress.Progress(10, 0).line(row)
    assert "acc -" in line and "loss -" in line and "nan" not in line
    row.update(test_acc=0.91234, test_loss=0.3)
    assert "acc 0.9123" in progress.Progress(10, 0).line(row)
