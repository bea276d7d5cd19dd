"""Sweeps: expansion (grid, zip, cases, seeds, when rules), run names, validation errors,
the --list / --local / --dry-run CLI, and the sweeps shipped in jobs/."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedmpi import config, sweep
from fedmpi.config import ConfigError
from fedmpi.metrics import RunWriter, open_run

from .conftest import REPO

TINY = {  # the conftest SMALL job as a base config
    "run": {"rounds": 3, "threads": 1},
    "data": {"num_clients": 6},
    "client": {"local_steps": 3},
    "model": {"hidden": 32},
}


def doc(sweep_table: dict, out_dir: str = "runs/t", **sections) -> dict:
    base = {k: dict(v) for k, v in TINY.items()}
    base["run"]["out_dir"] = out_dir
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    base["sweep"] = sweep_table
    return base


FULL = {
    "seeds": [0, 1],
    "cases": {"method": {"fedavg": {"compressor.name": "identity"},
                         "topk": {"compressor.name": "topk", "compressor.ef": True}}},
    "zip": [{"data.syn_dim": [20, 40], "model.hidden": [16, 32]}],
    "grid": {"client.lr": [0.05, 0.1]},
}


def test_expand_product_order_and_names():
    sw = sweep.expand(doc(FULL), "t")
    assert len(sw.points) == 2 * 2 * 2 * 2
    names = [p.name for p in sw.points]
    assert names[:5] == [
        "method-fedavg_syn_dim-20_hidden-16_lr-0.05_seed-0",
        "method-fedavg_syn_dim-20_hidden-16_lr-0.05_seed-1",
        "method-fedavg_syn_dim-20_hidden-16_lr-0.1_seed-0",
        "method-fedavg_syn_dim-20_hidden-16_lr-0.1_seed-1",
        "method-fedavg_syn_dim-40_hidden-32_lr-0.05_seed-0",
    ]
    assert names[-1] == "method-topk_syn_dim-40_hidden-32_lr-0.1_seed-1"
    assert len(set(names)) == len(names)
    assert [p.index for p in sw.points] == list(range(16))
    # stable: the same file expands to the same names in the same order
    assert [p.name for p in sweep.expand(doc(FULL), "t").points] == names
    p = sw.points[-1]
    assert p.config.compressor.name == "topk" and p.config.compressor.ef
    assert p.config.data.syn_dim == 40 and p.config.model.hidden == 32
    assert p.config.client.lr == 0.1 and p.config.run.seed == 1
    assert p.config.run.name == p.name and p.config.run.out_dir == "runs/t"
    assert p.path == os.path.join("runs/t", p.name + ".h5")
    assert p.config_path == os.path.join("runs/t", "configs", p.name + ".toml")
    assert p.labels == {"method": "topk", "data.syn_dim": 40, "model.hidden": 32,
                        "client.lr": 0.1, "seed": 1}
    # the base config reaches every point
    assert all(pt.config.run.rounds == 3 and pt.config.data.num_clients == 6
               for pt in sw.points)


def test_default_out_dir_seed_and_labels():
    d = doc({"grid": {"client.lr": [0.1], "server.lr": [1.0, 0.5]},
             "labels": {"server.lr": "glr"}})
    del d["run"]["out_dir"]
    sw = sweep.expand(d, "mysweep")
    assert sw.out_dir == os.path.join("runs", "mysweep")
    # default seed is [run] seed's default; server.lr relabelled, client.lr keeps "lr"
    assert [p.name for p in sw.points] == ["lr-0.1_glr-1.0_seed-0", "lr-0.1_glr-0.5_seed-0"]
    # two keys with the same last part and no label: the whole key
    sw = sweep.expand(doc({"grid": {"client.lr": [0.1], "server.lr": [1.0]}}), "x")
    assert sw.points[0].name == "client.lr-0.1_server.lr-1.0_seed-0"
    # *.name keys are named after their section
    sw = sweep.expand(doc({"grid": {"model.name": ["mlp", "logreg"]}}), "x")
    assert [p.name for p in sw.points] == ["model-mlp_seed-0", "model-logreg_seed-0"]


def test_when_rules_set_derived_keys_without_renaming():
    d = doc({**FULL, "when": [
        {"match": {"method": "topk", "client.lr": 0.1}, "set": {"compressor.ratio": 0.5}},
        {"match": {"model.hidden": [16], "run.rounds": 3}, "set": {"client.batch_size": 8}},
    ]})
    sw = sweep.expand(d, "t")
    assert [p.name for p in sw.points] == [p.name for p in sweep.expand(doc(FULL), "t").points]
    for p in sw.points:
        topk_fast = p.labels["method"] == "topk" and p.labels["client.lr"] == 0.1
        if p.config.compressor.name == "topk":
            assert p.config.compressor.params.ratio == (0.5 if topk_fast else 0.01)
        assert ("compressor.ratio" in p.overrides) == topk_fast
        assert p.config.client.batch_size == (8 if p.labels["model.hidden"] == 16 else 32)


@pytest.mark.parametrize("table, key", [
    ({"bogus": 1}, "sweep.bogus"),
    ({"grid": {"client.lr": []}}, "sweep.grid.client.lr"),
    ({"grid": {"client.lr": 0.1}}, "sweep.grid.client.lr"),
    ({"grid": {"lr": [0.1]}}, "sweep.grid.lr"),
    ({"grid": {"nosuch.lr": [0.1]}}, "sweep.grid.nosuch.lr"),
    ({"grid": {"run.seed": [1, 2]}}, "sweep.grid.run.seed"),
    ({"zip": [{"client.lr": [0.1, 0.2], "server.lr": [1.0]}]}, "sweep.zip[0]"),
    ({"grid": {"client.lr": [0.1]}, "zip": [{"client.lr": [0.2]}]}, "sweep.zip[0]"),
    ({"cases": {"m": {"a": {"client.lr": 0.1}}}, "grid": {"client.lr": [0.2]}},
     "sweep.grid.client.lr"),
    ({"seeds": [0, 0]}, "sweep.seeds"),
    ({"seeds": [-1]}, "sweep.seeds"),
    ({"labels": {"client.lr": "x"}}, "sweep.labels.client.lr"),
    ({"when": [{"match": {"nosuch": 1}, "set": {"client.lr": 0.1}}]}, "sweep.when[0]"),
    ({"when": [{"match": {}}]}, "sweep.when[0]"),
    ({"grid": {"client.lrr": [0.1]}}, "lrr-0.1_seed-0: client.lrr"),
    ({"grid": {"data.dataset": ["a b", "a-b"]}}, "sweep"),
])
def test_sweep_errors_name_the_key(table, key):
    with pytest.raises(ConfigError) as err:
        sweep.expand(doc(table), "t")
    assert err.value.key == key


def test_invalid_point_is_named():
    with pytest.raises(ConfigError) as err:
        sweep.expand(doc({"grid": {"client.lr": [0.1, -1.0]}}), "t")
    assert err.value.key == "lr--1.0_seed-0: client.lr"
    assert "must be > 0" in str(err.value)


def test_run_name_and_seed_in_base_are_rejected():
    for key in ("name", "seed"):
        d = doc({})
        d["run"][key] = "x" if key == "name" else 3
        with pytest.raises(ConfigError) as err:
            sweep.expand(d, "t")
        assert err.value.key == f"run.{key}"
    with pytest.raises(ConfigError) as err:
        sweep.expand({k: v for k, v in doc({}).items() if k != "sweep"}, "t")
    assert err.value.key == "sweep"


def test_written_configs_round_trip(tmp_path):
    sw = sweep.expand(doc(FULL, out_dir=str(tmp_path)), "t")
    sweep.write_configs(sw, sw.points[:3])
    for p in sw.points[:3]:
        assert config.load(p.config_path) == p.config
    assert not os.path.exists(sw.points[3].config_path)


def _fake_run(point: sweep.Point, complete: bool, rows: int = 1) -> None:
    os.makedirs(os.path.dirname(point.path), exist_ok=True)
    n = point.config.data.num_clients
    w = RunWriter(point.path, point.config, 1, n, np.zeros((n, 2)), swmr=False)
    for r in range(rows):
        w.append({"round": r}, {})
    w.close(complete=complete)


def test_state_reads_run_files(tmp_path):
    sw = sweep.expand(doc({"seeds": [0, 1, 2]}, out_dir=str(tmp_path)), "t")
    _fake_run(sw.points[0], complete=True, rows=3)
    _fake_run(sw.points[1], complete=False, rows=2)
    states = [sweep.state(p) for p in sw.points]
    assert [(s.status, s.rows, s.rounds) for s in states] == [
        ("complete", 3, 3), ("partial", 2, 3), ("pending", 0, 3)]


def run_cli(*args, cwd=REPO, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "fedmpi.sweep", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def write_sweep(path: Path, out_dir: Path, seeds="[0, 1]") -> Path:
    path.write_text(f"""
[run]
rounds = 3
threads = 1
out_dir = "{out_dir}"
[data]
num_clients = 6
[client]
local_steps = 3
[model]
hidden = 32
[sweep]
seeds = {seeds}
[sweep.cases.method]
fedavg = {{ "compressor.name" = "identity" }}
topk = {{ "compressor.name" = "topk", "compressor.ef" = true }}
""")
    return path


def main_cli(capsys, *args):
    """``python -m fedmpi.sweep ARGS`` in this process: (exit status, stdout, stderr)."""
    code = sweep.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_and_dry_run(tmp_path, capsys):
    out = tmp_path / "out"
    f = write_sweep(tmp_path / "s.toml", out)
    sw = sweep.load(str(f))
    _fake_run(sw.points[1], complete=True, rows=3)
    _fake_run(sw.points[2], complete=False, rows=1)
    code, out_text, err = main_cli(capsys, f, "--list")
    assert code == 0, err
    lines = out_text.splitlines()
    assert "4 runs" in lines[0] and "[1 complete, 1 partial, 2 pending]" in lines[0]
    assert lines[1].split()[:3] == ["0", "method-fedavg_seed-0", "-"]
    assert lines[2].split()[:3] == ["1", "method-fedavg_seed-1", "done"]
    assert lines[3].split()[:3] == ["2", "method-topk_seed-0", "1/3"]

    code, out_text, err = main_cli(capsys, f, "--local", "-n", "2", "--dry-run")
    assert code == 0, err
    cmds = [ln for ln in out_text.splitlines() if "fedmpi.train" in ln]
    assert len(cmds) == 3  # the complete run is skipped
    assert "skip method-fedavg_seed-1: complete" in out_text
    assert all(" -n 2 " in c and c.endswith("--resume --quiet") for c in cmds)
    code, out_text, _ = main_cli(capsys, f, "--local", "--dry-run", "--restart")
    assert code == 0 and "--restart --quiet" in out_text
    assert cmds[0].split()[-3] == str(out / "configs" / "method-fedavg_seed-0.toml")
    assert not (out / "configs").exists()  # a dry run writes nothing


def test_cli_errors(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text('[sweep]\ngrid = { "client.lr" = [0.1, -2.0] }\n')
    code, _, err = main_cli(capsys, f, "--list")
    assert code == 2
    assert "lr--2.0_seed-0: client.lr" in err and "must be > 0" in err
    code, _, err = main_cli(capsys, tmp_path / "missing.toml", "--list")
    assert code == 2 and "not found" in err
    ok = write_sweep(tmp_path / "s.toml", tmp_path / "o")
    code, _, err = main_cli(capsys, ok, "--local", "-n", "9", "--dry-run")
    assert code == 2 and "num_clients" in err  # 8 client ranks, 6 clients


@pytest.mark.slow
def test_local_runs_pending_and_skips_complete(tmp_path):
    out = tmp_path / "out"
    f = write_sweep(tmp_path / "s.toml", out, seeds="[0]")
    sw = sweep.load(str(f))
    fedavg, topk = sw.points
    _fake_run(topk, complete=True, rows=0)  # a complete run must be left alone
    _fake_run(fedavg, complete=False, rows=1)  # a partial one without a checkpoint ...
    proc = run_cli(f, "--local", "-n", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # ... is not restarted silently
    assert "skip method-topk_seed-0: complete" in proc.stdout
    assert f"[1/1] FAIL {fedavg.name}: exit 2" in proc.stdout
    assert "has 1 round(s) but there is no checkpoint" in proc.stdout  # the job's message
    assert len(open_run(fedavg.path)) == 1
    proc = run_cli(f, "--local", "-n", "1", "--restart")  # ... unless asked to
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert re.search(rf"^\[1/1\] run  {fedavg.name} \(1/3 rounds on disk; sweep \S+, "
                     r"ETA \?\)$", "\n".join(lines), re.M), proc.stdout
    # the job's own round lines, prefixed with the run's place in the sweep
    assert sum(line.startswith("[1/1] round ") and "ETA" in line for line in lines) == 3
    assert f"[1/1] done {fedavg.name}" in proc.stdout
    run = open_run(fedavg.path)
    assert run.complete and len(run) == 3
    assert list(run.rounds["round"]) == [0, 1, 2]
    assert run.config == fedavg.config
    assert len(open_run(topk.path)) == 0  # untouched
    assert config.load(fedavg.config_path) == fedavg.config
    proc = run_cli(f, "--local")  # everything complete: nothing runs
    assert proc.returncode == 0 and "0 to run" in proc.stdout


@pytest.mark.slow
def test_local_sweep_ctrl_c_checkpoints_the_job_and_stops(tmp_path):
    """SIGINT to a real --local sweep (a terminal's Ctrl-C reaches only the driver: the
    job runs in its own process group): the driver passes it on, the job checkpoints at
    its round boundary and exits 75, the sweep stops cleanly (no traceback, no next run)
    with exit 75; the same command later continues from the checkpoint."""
    out = tmp_path / "out"
    f = write_sweep(tmp_path / "s.toml", out, seeds="[0]")
    f.write_text(f.read_text().replace("rounds = 3", "rounds = 100000"))
    first, second = sweep.load(str(f)).points
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    log = tmp_path / "sweep.out"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "fedmpi.sweep", str(f), "--local"],
                                stdout=fh, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env=env)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if len(open_run(first.path)) >= 2:
                        break
                except (OSError, KeyError):
                    pass
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == sweep.EXIT_INTERRUPTED, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert f"sweep s: SIGINT: {first.name} stopped with exit 75" in text
    assert "(checkpointed)" in text and "rerun the same command to continue" in text
    assert "[1/2] round    1/100000" in text
    saved = checkpoint_round(first)
    assert not open_run(first.path).complete and len(open_run(first.path)) == saved >= 2
    assert not os.path.exists(second.path)  # the sweep stopped after the interrupted run
    # continue (with a shorter run.rounds: a free key) and finish both runs
    f.write_text(f.read_text().replace("rounds = 100000", f"rounds = {saved + 1}"))
    proc = run_cli(f, "--local", "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = open_run(first.path)
    assert done.complete and list(done.attrs["resumed_at_rounds"]) == [saved]
    assert open_run(second.path).complete


def checkpoint_round(point) -> int:
    from fedmpi import checkpoint

    return int(checkpoint.load(os.path.join(point.config.run.out_dir,
                                            f"{point.name}.ckpt"))["round"])


SHIPPED = {"3sfc_table2.toml": 5 * 9 * 3 * 3, "3sfc_table2_standard.toml": 5 * 9 * 3 * 3,
           "3sfc_table3.toml": 2 * 3 * 2 * 3, "3sfc_table4.toml": 2 * 3 * 2 * 3,
           "3sfc_mnist_mlp.toml": 9 * 3}
#: 3SFC's floats per synthetic sample, D_in + C, by dataset
FLOATS = {"mnist": 784 + 10, "fmnist": 784 + 10, "emnist": 784 + 62, "cifar10": 3072 + 10,
          "cifar100": 3072 + 100}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_sweeps_expand_and_validate(name):
    sw = sweep.load(str(REPO / "jobs" / name))
    assert len(sw.points) == SHIPPED[name]
    assert sw.out_dir == f"runs/{name[:-5]}"
    for p in sw.points:  # the paper's protocol, as its authors' code runs it, reaches every run
        c = p.config
        assert c.run.rounds == 200 and c.client.lr == 0.01 and c.client.batch_size == 256
        assert c.data.partition == "dirichlet" and c.data.alpha == 1.0
        assert c.client.lr_decay == 0.99 and c.client.lr_decay_first
        assert c.data.train_frac == 0.8 and c.data.client_holdout == 0.2
        assert c.server.participation == 1.0 and c.server.aggregation == "mean"
        assert len(p.name) <= sweep.MAX_NAME


def budget_matches_3sfc(p, m: int = 1) -> None:
    """The compressor built for this point sends at most 3SFC's bytes with M = m, and
    within one entry per tensor of them (the code's per-tensor int(n p) floors each)."""
    from fedmpi import compress, data, models

    c = p.config
    info = data.info(c.data)
    module = models.build_module(c.model, info.input_shape, info.num_classes, 0)
    shapes = [tuple(t.shape) for t in module.parameters()]
    spec = compress.ModelSpec(d=sum(int(np.prod(s)) for s in shapes), shapes=shapes,
                              input_shape=info.input_shape, num_classes=info.num_classes)
    comp = compress.build(c.compressor, spec)
    inner = getattr(comp, "inner", comp)
    per_entry = 4 + compress.wire.index_width(spec.d)
    sfc3 = 4 * (m * FLOATS[c.data.dataset] + 1)
    assert c.compressor.params.budget_bytes == sfc3
    sent = getattr(inner, "k", None) or sum(inner.final_counts)
    assert sfc3 - per_entry * len(shapes) < sent * per_entry <= sfc3


@pytest.mark.parametrize("name,dgc,names", [
    ("3sfc_table2.toml", "dgc", {"fedavg", "3sfc", "dgc", "signsgd", "stc"}),
    ("3sfc_table2_standard.toml", "dgc-std",
     {"fedavg", "3sfc", "dgc-std", "signsgd-std", "stc-std"})])
def test_table2_matches_budgets_to_3sfc(name, dgc, names):
    sw = sweep.load(str(REPO / "jobs" / name))
    by = {}
    for p in sw.points:
        by.setdefault(p.labels["method"], []).append(p)
    assert set(by) == names
    for p in by[dgc]:
        if p.config.data.num_clients == 10 and p.config.run.seed == 0:
            budget_matches_3sfc(p)
    assert {p.config.data.num_clients for p in sw.points} == {10, 20, 40}
    assert {(p.config.data.dataset, p.config.model.name) for p in sw.points} == {
        ("mnist", "mlp"), ("emnist", "mlp"), ("fmnist", "mlp"), ("fmnist", "mnistnet"),
        ("cifar10", "convnet"), ("cifar10", "resnet18"), ("cifar10", "regnetx_200mf"),
        ("cifar100", "resnet18"), ("cifar100", "regnetx_200mf")}
    assert all(p.config.compressor.params.m == 1 for p in by["3sfc"])
    for p in sw.points:  # the ICCV code's EMNIST: byclass, 50k train / 10k test
        emnist = p.config.data.dataset == "emnist"
        assert (p.config.data.max_train, p.config.data.max_test) == (
            (50000, 10000) if emnist else (0, 0))
    if name == "3sfc_table2.toml":  # the authors' baselines
        assert {by[m][0].config.compressor.name for m in ("dgc", "signsgd", "stc")} == {
            "topk_3sfc", "signsgd_3sfc", "stc_3sfc"}


def test_table3_budgets_match_3sfcs_bytes_for_each_m():
    sw = sweep.load(str(REPO / "jobs" / "3sfc_table3.toml"))
    for p in sw.points:
        m = int(p.labels["budget"][1:])
        if p.labels["method"] == "3sfc":
            assert p.config.compressor.params.m == m
        elif p.config.run.seed == 0:
            budget_matches_3sfc(p, m)


def test_table4_ablates_ef_and_k():
    sw = sweep.load(str(REPO / "jobs" / "3sfc_table4.toml"))
    assert {(p.config.compressor.ef, p.config.client.local_epochs) for p in sw.points} == {
        (ef, k) for ef in (True, False) for k in (1, 5, 10)}
