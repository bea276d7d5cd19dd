"""End-to-end runs of ``fedmpi.train`` under mpiexec: invariance, bytes, HDF5, errors."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedmpi import config, launch
from fedmpi.metrics import CLIENT_METRICS, ROUND_METRICS, open_run
from fedmpi.progress import fmt_bytes

from .conftest import REPO, SMALL, mnist_root, run_and_open, run_train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same small job at 1, 3 and 5 ranks."""
    tmp = tmp_path_factory.mktemp("inv")
    return {n: run_and_open(tmp, n, SMALL, name=f"n{n}") for n in (1, 3, 5)}


def test_rank_count_invariance(runs):
    base = runs[1]
    for n in (3, 5):
        for metric in ("test_acc", "test_loss", "train_loss", "efficiency_mean"):
            assert np.array_equal(runs[n].rounds[metric], base.rounds[metric]), (n, metric)
        assert np.array_equal(runs[n].clients["train_loss"], base.clients["train_loss"])


def test_measured_bytes_equal_payload_bytes(runs):
    for n, run in runs.items():
        r, d = run.rounds, run.attrs["num_params"]
        assert np.array_equal(r["uplink_bytes"], r["uplink_payload_bytes"])
        assert np.array_equal(r["uplink_bytes"], run.clients["uplink_bytes"].sum(axis=1))
        assert (run.clients["uplink_bytes"] == 4 * d).all()  # identity: 4 d per client
        client_ranks = 1 if n == 1 else n - 1
        assert (r["transport_downlink_bytes"] == 4 * d * client_ranks).all()
        assert (r["downlink_payload_bytes"] == 4 * d * 6).all()  # 6 participating clients
        assert np.allclose(r["compression_ratio_up"], 1.0)


def test_hdf5_schema_and_completion(runs):
    run = runs[3]
    assert run.complete and len(run) == 3
    assert set(ROUND_METRICS) <= set(run.rounds) and set(CLIENT_METRICS) <= set(run.clients)
    assert np.array_equal(run.rounds["round"], [0, 1, 2])
    assert run.attrs["mpi_size"] == 3 and len(run.attrs["peak_rss_mb"]) == 3
    # PSS at the end <= RSS <= peak RSS; torch's shared libraries make it clearly smaller
    pss, peak = run.attrs["pss_mb"], run.attrs["peak_rss_mb"]
    assert len(pss) == 3 and (pss > 0).all() and (pss < peak).all()
    assert run.partition.shape == (6, 10) and run.partition.sum() > 0
    assert (run.clients["participation"] == 1).all()
    cfg = run.config
    assert cfg == config.load(None, [*SMALL[1::2], "run.name=n3",
                                     f"run.out_dir={cfg.run.out_dir}"])
    assert np.isfinite(run.rounds["test_acc"]).all()
    assert np.isnan(run.rounds["sharpness_lmax"]).all()


def test_server_trains_uses_rank_0_and_changes_nothing(tmp_path, runs):
    run = run_and_open(tmp_path, 2, [*SMALL, "--set", "run.server_trains=true"], name="st")
    owners = eval(run.attrs["owners"])  # {rank: [clients]}, written by train.py
    assert set(owners) == {0, 1} and all(owners.values())
    for metric in ("test_acc", "test_loss", "train_loss"):
        assert np.array_equal(run.rounds[metric], runs[1].rounds[metric]), metric
    assert (run.rounds["transport_downlink_bytes"] == 2 * 4 * run.attrs["num_params"]
            ).all()


def test_one_client_per_rank(tmp_path):
    run = run_and_open(tmp_path, 7, SMALL, name="n7")
    assert run.complete and len(run) == 3


def test_more_client_ranks_than_clients_fails_cleanly(tmp_path):
    t0 = time.monotonic()
    proc = run_train(tmp_path, 5, [*SMALL, "--set", "data.num_clients=3"], check=False)
    assert proc.returncode != 0
    assert "data.num_clients" in proc.stderr and "4 client ranks" in proc.stderr
    assert proc.stderr.count("fedmpi: error") == 1  # reported once, by rank 0
    assert not list(Path(tmp_path).glob("*.h5"))
    assert time.monotonic() - t0 < 60


def test_existing_output_is_refused_without_overwrite(tmp_path):
    run_train(tmp_path, 1, SMALL, name="x")
    proc = run_train(tmp_path, 1, SMALL, name="x", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    run_train(tmp_path, 1, [*SMALL, "--overwrite"], name="x")


def test_eval_every_leaves_nan_between(tmp_path):
    run = run_and_open(tmp_path, 1, [*SMALL, "--set", "run.rounds=5", "--set", "eval.every=2"])
    acc = run.rounds["test_acc"]
    assert np.isnan(acc[[0, 2]]).all() and np.isfinite(acc[[1, 3, 4]]).all()


def test_partial_participation_is_rank_invariant(tmp_path):
    args = [*SMALL, "--set", "server.participation=0.5", "--set", "server.aggregation=weighted"]
    a = run_and_open(tmp_path, 1, args, name="p1")
    b = run_and_open(tmp_path, 3, args, name="p3")
    assert (a.clients["participation"].sum(axis=1) == 3).all()
    assert np.array_equal(a.clients["participation"], b.clients["participation"])
    assert np.array_equal(a.rounds["test_loss"], b.rounds["test_loss"])
    assert np.isnan(a.clients["train_loss"][a.clients["participation"] == 0]).all()


def test_file_is_readable_while_the_run_goes(tmp_path):
    cmd = launch.command(2, "fedmpi.train", [*SMALL, "--set", "run.rounds=400", "--set",
                                             f"run.out_dir={tmp_path}", "--set", "run.name=live",
                                             "--quiet"])
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=launch.environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        path, seen = tmp_path / "live.h5", None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                try:
                    run = open_run(str(path))
                except (OSError, KeyError):
                    run = None
                if run is not None and 0 < len(run) < 400:
                    seen = run
                    break
            time.sleep(0.2)
        assert seen is not None, "never saw a partial run"
        assert not seen.complete
        assert np.array_equal(seen.rounds["round"], np.arange(len(seen)))
    finally:
        proc.wait(timeout=300)
    final = open_run(str(tmp_path / "live.h5"))
    assert proc.returncode == 0 and final.complete and len(final) == 400


def test_default_job_prints_rounds_and_summary(tmp_path):
    """``python -m fedmpi.train`` (the embedded quickstart, here shortened): one plain line
    per round with elapsed time and ETA (stdout is a pipe: no carriage returns, no
    cutting), the summary with every phase, sharpness included."""
    proc = subprocess.run(
        launch.command(1, "fedmpi.train", ["--set", "run.rounds=4", "--set",
                                           f"run.out_dir={tmp_path}"]),
        capture_output=True, text=True, timeout=300, cwd=str(REPO), env=launch.environment())
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout
    lines = proc.stdout.splitlines()
    rounds = [line for line in lines if line.startswith("round ")]
    assert len(rounds) == 4
    duration = r"[0-9]+(\.[0-9]s|m[0-9]{2}s|h[0-9]{2}m)"  # 4.2s, 3m05s, 2h07m
    assert all(re.search(rf"  \[{duration}, ETA {duration}\]$", line) for line in rounds), rounds
    assert rounds[-1].endswith("ETA 0.0s]")
    assert lines[-1].startswith("done: quickstart: final acc")
    assert "sharpness 0.0s" in lines[-1] and "eval " in lines[-1]
    assert open_run(str(tmp_path / "quickstart.h5")).complete


def printed_bytes(tmp_path, n: int) -> tuple[list[str], str, object]:
    """The "down" figure of every round line and the done line's up/downlink, at -n n."""
    name = f"p{n}"
    proc = run_train(tmp_path, n, SMALL, name=name, quiet=False)
    lines = proc.stdout.splitlines()
    downs = [re.search(r"  down (\S+ \S+)  ", line).group(1) for line in lines
             if line.startswith("round ")]
    done = re.search(r"uplink \S+ \S+, downlink \S+ \S+,", lines[-1]).group(0)
    return downs, done, open_run(str(tmp_path / f"{name}.h5"))


def test_printed_bytes_are_the_jobs_not_the_layout(tmp_path):
    """The same 6-client job at -n 1 and -n 3 (1 and 2 client ranks): the transport
    broadcasts to 1 or 2 ranks, but what is printed is what the 6 participants download,
    the same on both, and equal to the run file's downlink_payload_bytes."""
    one, three = printed_bytes(tmp_path, 1), printed_bytes(tmp_path, 3)
    assert one[:2] == three[:2]
    run = one[2]
    assert one[0] == [fmt_bytes(b) for b in run.rounds["downlink_payload_bytes"]]
    assert one[1] == (f"uplink {fmt_bytes(run.rounds['uplink_payload_bytes'].sum())}, "
                      f"downlink {fmt_bytes(run.rounds['downlink_payload_bytes'].sum())},")
    # the transport counters differ with the layout: they stay in the file, not on screen
    assert (three[2].rounds["transport_downlink_bytes"]
            == 2 * one[2].rounds["transport_downlink_bytes"]).all()
    for n, r in ((1, one[2]), (3, three[2])):
        summary = subprocess.run([sys.executable, str(REPO / "analysis" / "summary.py"),
                                  r.path], capture_output=True, text=True, cwd=str(REPO))
        assert summary.returncode == 0, summary.stderr
        line = next(x for x in summary.stdout.splitlines() if x.startswith("bytes"))
        total = r.rounds["downlink_payload_bytes"].sum()
        assert f"downlink {fmt_bytes(total)}" in line and "metadata" not in line, (n, line)


def test_legacy_transport_names_are_read(tmp_path):
    """Run files written before the transport counters were renamed read the same."""
    run_train(tmp_path, 1, SMALL, name="old")
    path = str(tmp_path / "old.h5")
    with h5py.File(path, "r+") as f:
        f.move("rounds/transport_downlink_bytes", "rounds/downlink_bytes")
        f.move("rounds/transport_meta_bytes", "rounds/meta_bytes")
    run = open_run(path)
    assert "downlink_bytes" not in run.rounds
    assert (run.rounds["transport_downlink_bytes"] == 4 * run.attrs["num_params"]).all()
    assert (run.rounds["transport_meta_bytes"] == 0).all()  # one rank: nothing moved


HELP_COMMANDS = {
    "train": ["-m", "fedmpi.train"], "config": ["-m", "fedmpi.config"],
    "sweep": ["-m", "fedmpi.sweep"],
    **{s: [str(REPO / "analysis" / f"{s}.py")]
       for s in ("table", "curves", "efficiency", "sharpness", "summary")},
    "submit": [str(REPO / "slurm" / "submit.py")],
}


@pytest.mark.parametrize("name", sorted(HELP_COMMANDS))
def test_help_is_plain_text(name):
    """Every command's --help exits 0 and shows text, not reStructuredText markup."""
    proc = subprocess.run([sys.executable, *HELP_COMMANDS[name], "--help"],
                          capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ") and len(proc.stdout.splitlines()) > 5
    for markup in ("``", ":mod:", ":func:", ":data:", ":class:"):
        assert markup not in proc.stdout, (name, markup, proc.stdout)


@pytest.mark.skipif(mnist_root() is None, reason="real MNIST files not present")
def test_real_mnist_fedavg_learns(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMPI_DATA_ROOT", mnist_root())
    run = run_and_open(tmp_path, 3, [
        "--set", "data.dataset=mnist", "--set", "data.partition=dirichlet",
        "--set", "data.alpha=1.0", "--set", "data.num_clients=10", "--set", "run.rounds=5",
        "--set", "client.local_steps=20", "--set", "client.batch_size=32",
        "--set", "client.lr=0.1", "--set", "run.threads=1"], name="mnist")
    acc = run.rounds["test_acc"]
    assert acc[-1] > 0.7 and acc[-1] > acc[0], acc  # chance is 0.1
    assert run.attrs["num_params"] == 199_210
    assert run.partition.sum() == 60_000
