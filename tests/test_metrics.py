"""HDF5 run file: schema, rows, completion flag, readers for live and crashed files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from fedmpi import config
from fedmpi.metrics import CLIENT_METRICS, ROUND_METRICS, RunWriter, open_run


def _writer(path, swmr=True, n=3):
    cfg = config.load(None, ["data.num_clients=3"])
    return RunWriter(str(path), cfg, mpi_size=2, num_clients=n,
                     partition=np.arange(n * 2).reshape(n, 2), swmr=swmr)


@pytest.mark.parametrize("swmr", [True, False])
def test_rows_schema_and_complete(tmp_path, swmr):
    w = _writer(tmp_path / "r.h5", swmr)
    for r in range(4):
        w.append({"round": r, "test_acc": 0.1 * r, "uplink_bytes": 10 * r},
                 {"participation": np.array([1, 0, 1], np.int8)})
    assert not open_run(str(tmp_path / "r.h5")).complete  # readable mid-run
    w.close(complete=True, attrs={"peak_rss_mb": np.array([1.0, 2.0])})
    run = open_run(str(tmp_path / "r.h5"))
    assert run.complete and len(run) == 4
    assert set(run.rounds) == set(ROUND_METRICS) and set(run.clients) == set(CLIENT_METRICS)
    assert np.array_equal(run.rounds["round"], np.arange(4))
    assert np.allclose(run.rounds["test_acc"], [0, 0.1, 0.2, 0.3])
    assert np.isnan(run.rounds["test_loss"]).all()  # not computed -> NaN
    assert run.clients["participation"].shape == (4, 3)
    assert np.array_equal(run.partition, np.arange(6).reshape(3, 2))
    assert run.config == config.load(None, ["data.num_clients=3"])
    assert list(run.attrs["peak_rss_mb"]) == [1.0, 2.0] and run.attrs["mpi_size"] == 2


def test_unknown_metric_rejected(tmp_path):
    w = _writer(tmp_path / "r.h5")
    with pytest.raises(KeyError, match="bogus"):
        w.append({"bogus": 1.0}, {})
    w.close(complete=False)


def test_live_reader_in_another_process(tmp_path):
    path = tmp_path / "live.h5"
    w = _writer(path)
    w.append({"round": 0}, {})
    code = f"from fedmpi.metrics import open_run; r = open_run({str(path)!r}); " \
           "print(len(r), r.complete)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["1", "False"], out.stderr
    w.close(complete=True)


WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    from fedmpi import config
    from fedmpi.metrics import RunWriter
    w = RunWriter(sys.argv[1], config.load(None), 1, 2, np.zeros((2, 2)),
                  swmr=sys.argv[2] == "1")
    r = 0
    while True:
        w.append({"round": r, "test_acc": r / 1000}, {})
        r += 1
        if r == 3:
            print("ready", flush=True)
        time.sleep(0.002)
""")


@pytest.mark.parametrize("swmr", ["1", "0"])
def test_sigkilled_writer_leaves_a_readable_file(tmp_path, swmr):
    path = tmp_path / "crash.h5"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), swmr],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    run = open_run(str(path))
    assert len(run) >= 3 and not run.complete
    assert np.array_equal(run.rounds["round"], np.arange(len(run)))
    with h5py.File(path, "r", swmr=True) as f:
        assert "complete" not in f.attrs
