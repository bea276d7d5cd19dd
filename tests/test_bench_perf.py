"""The performance benchmark's pieces (``python -m fedmpi.bench perf``): the official-3SFC
reference computes what fedmpi computes, the FLOP and sample counts are the hand counts,
run files are read without the warm-up round, the table prints every line with the
right ratios, and ``--quick`` runs end to end. Nothing here asserts a timing."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedmpi import config, data, metrics
from fedmpi.bench import __main__ as dispatcher
from fedmpi.bench import perf
from fedmpi.bench import reference3sfc as ref3
from fedmpi.client import batch_schedule
from tests import datagen
from tests.conftest import REPO, run_and_open


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> str:
    """A generated MNIST (600 train, 100 test) in torchvision's on-disk format."""
    root = tmp_path_factory.mktemp("mnist")
    datagen.mnist_like(str(root), n_train=600, n_test=100)
    return str(root)


@pytest.fixture
def tiny_env(tiny_root, monkeypatch) -> str:
    monkeypatch.setenv("FEDMPI_DATA_ROOT", tiny_root)  # it wins over data.root
    return tiny_root


def tiny_job(root: str, **kw) -> perf.Job:
    """3 clients on 480 samples (train_frac 0.8: the test set comes from the train split),
    a 16-wide MLP, 2 epochs of batch 16, 3SFC with S = 2 LBFGS steps of 4 iterations."""
    base = dict(num_clients=3, local_epochs=2, batch_size=16, lr=0.05, hidden=16, s_steps=2,
                max_iter=4)
    return perf.Job(root, **{**base, **kw})


def test_dispatcher_finds_the_perf_benchmark():
    assert dispatcher.benchmarks()["perf"] == "fedmpi.bench.perf"


# ---------------------------------------------------------------------------- counting


def test_flops_equal_the_hand_count_of_the_mlp():
    forward = 2 * (784 * 200 + 200 * 200 + 200 * 10)  # multiply-adds x 2, biases aside
    assert perf.model_flops(perf.Job("unused").config()) == forward == 397_600
    assert perf.model_flops(perf.Job("unused", hidden=16).config()) == 2 * (
        784 * 16 + 16 * 16 + 16 * 10)
    assert perf.training_flops(forward, 240_000) == 3 * 397_600 * 240_000


def test_samples_per_round_by_epochs_and_by_steps():
    sizes = [100, 37, 5]
    epochs = config.ClientConfig(local_epochs=5, local_steps=0, batch_size=64)
    assert perf.samples_per_round(sizes, epochs) == 5 * 142
    steps = config.ClientConfig(local_steps=3, batch_size=64)
    assert perf.samples_per_round(sizes, steps) == 3 * (64 + 37 + 5)


def test_job_settings_are_the_3sfc_mnist_job():
    cfg = perf.full_job("/data").config()
    assert (cfg.data.dataset, cfg.data.partition, cfg.data.alpha, cfg.data.num_clients,
            cfg.data.train_frac) == ("mnist", "dirichlet", 1.0, 10, 0.8)
    assert (cfg.client.local_epochs, cfg.client.batch_size, cfg.client.lr) == (5, 64, 0.01)
    p = cfg.compressor.params
    assert (cfg.compressor.name, cfg.compressor.ef, p.m, p.s_steps, p.max_iter,
            p.optimizer) == ("3sfc", True, 1, 10, 20, "lbfgs")
    # 48,000 samples x 5 epochs at batch 64: the 3,750 steps per round
    assert perf.samples_per_round([48_000], cfg.client) // 64 == 3750


# ---------------------------------------------------------------------------- run files


def fake_run(cfg: config.Config, time_round, train, encode, decode, evals, rss, counts):
    n = len(time_round)
    rounds = {"round": np.arange(n), "time_round": np.asarray(time_round, float),
              "time_train": np.asarray(train, float), "time_encode": np.asarray(encode, float),
              "time_decode": np.asarray(decode, float), "time_eval": np.asarray(evals, float),
              "test_acc": np.linspace(0.1, 0.9, n)}
    return metrics.Run("fake.h5", {"config": config.to_toml(cfg), "peak_rss_mb": np.asarray(rss)},
                       rounds, {}, np.asarray(counts))


def test_run_stats_leave_out_round_0_and_sum_rank_rss():
    cfg = perf.Job("unused", local_epochs=2).config()
    run = fake_run(cfg, [50.0, 4.0, 6.0], [40, 3.0, 4.0], [5, 0.5, 1.0], [1, 0.1, 0.1],
                   [1, 0.2, 0.4], [300.0, 250.0, 260.5], [[3, 2], [5, 0]])
    st = perf.run_stats(run)
    assert st.rounds == 2
    assert st.seconds == pytest.approx(5.0) and st.train == pytest.approx(3.5)
    assert st.encode == pytest.approx(0.75) and st.eval == pytest.approx(0.3)
    assert st.outside == pytest.approx((5.0 - 3.5 - 0.75 - 0.1 - 0.3) / 5.0)
    assert st.samples == 2 * 10  # epochs x all clients' samples
    assert sum(st.peak_rss_mb) == pytest.approx(810.5)
    assert st.pss_mb == []  # (a run file from before pss_mb)
    assert st.train_samples == 10  # the partition's samples: the floor run's share
    assert st.test_acc == pytest.approx([0.1, 0.5, 0.9])
    assert st.acc_after(2) == pytest.approx(0.5) and np.isnan(st.acc_after(4))


def test_layouts_count_training_ranks_and_threads():
    assert perf.Layout(3).training_ranks == 2 and perf.Layout(3).threads(2) == 1
    assert perf.Layout(2, server_trains=True).training_ranks == 2
    assert perf.Layout(1).training_ranks == 1 and perf.Layout(1).threads(4) == 4
    assert perf.Layout(41).threads(2) == 1
    assert perf.Layout(2, server_trains=True).label == "-n 2 run.server_trains=true"


# ---------------------------------------------------------------------------- the table


def stats(seconds, train=0.0, encode=0.0, decode=0.0, evals=0.0, samples=240_000, rss=()):
    return perf.RunStats(5, seconds, train, encode, decode, evals, samples, list(rss),
                         [0.5, 0.7, 0.9])


def results(**over) -> perf.Results:
    bare_seconds = 3 * 397_600 * 1000 / 100e9  # 1,000 samples at 100 GFLOP/s
    base = dict(
        job="test job", cores=2,
        reference=perf.RefStats(30.0, 2, 1, 1.0, 0.8, 20.0, 8.0, 0.5, 1.5),
        layouts=[perf.Layout(3, stats=stats(3.0, 2.4, 0.3)),
                 perf.Layout(2, True, stats=stats(2.5, 2.0, 0.3, 0.05, 0.05))],
        per_sample_flops=397_600, bare=perf.BareStats(bare_seconds, 1000, 16),
        scaling_clients=40, small=perf.Layout(3, stats=stats(3.0)),
        big=perf.Layout(41, stats=dataclasses.replace(
            stats(3.6, 1.0, 2.0, rss=[13_000 / 41] * 41), compute_slots=[2] * 41,
            fit_pool_size=[0] + [20] * 40)),
        bare_torch_mb=300.0, settings=["data.dataset=mnist"])
    return perf.Results(**{**base, **over})


def test_table_prints_every_line_with_its_ratio():
    out = perf.render(results())
    lines = out.splitlines()
    for n in range(1, 6):
        assert any(line.startswith(f"{n}. ") for line in lines), n
    assert re.search(r"reference: official 3SFC loop, 1 process, 1 thread\(s\)\s+30\.00 s"
                     r"   acc 0\.8000 after round 2; train 20\.00, fit 8\.00, decode 0\.50, "
                     r"eval 1\.50", out)
    assert re.search(r"fedmpi -n 3\s+3\.00 s   acc 0\.7000 after round 2; train 2\.40", out)
    assert "speed-up vs reference: 12.0x" in out  # 30 s / 2.5 s (the fastest layout)
    assert "(fedmpi -n 2 run.server_trains=true; target >= 10x: met)" in out
    fastest = [line for line in lines if "<- fastest" in line]
    assert len(fastest) == 1 and "-n 2 run.server_trains=true" in fastest[0]
    # 3 x 397,600 x 240,000 / 2.0 s = 143.1 GFLOP/s over 2 ranks x 1 thread = 71.6 each
    assert re.search(r"bare SGD loop.*\s100\.0 GFLOP/s", out)
    assert re.search(r"in a round \(time_train\)\s+143\.1 GFLOP/s", out)
    assert re.search(r"per rank-thread\s+71\.6 GFLOP/s", out)
    assert "training efficiency vs bare loop: 71.6%   (target >= 80%: NOT met)" in out
    assert "-n 41 / -n 3: 1.20x   (target <= 1.3x: met)" in out
    assert re.search(r"fedmpi -n 41\s+3\.60 s   train 1\.00, encode 2\.00; gate 2 slot\(s\), "
                     r"fit pools of 20", out)
    assert re.search(r"fedmpi -n 3\s+3\.00 s   train 0\.00, encode 0\.00; no gate$", out,
                     re.MULTILINE)
    assert re.search(r"summed over the 41 ranks\s+13,000", out)
    assert "PSS" not in out  # a run file without pss_mb: no line
    assert re.search(r"41 x bare `python -c \"import torch\"` \(300\)\s+12,300", out)
    assert re.search(r"budget: 41 x bare \+ 1 GiB\s+13,324\s+met", out)
    assert "floor" not in out  # no floor run: no floor lines
    assert "/ time_round: 4.0%   (target < 5%: met)" in out  # (2.5 - 2.4) / 2.5
    assert "below 0" not in out
    assert "--set data.dataset=mnist" in out


def test_table_prints_the_memory_floor_and_fedmpi_over_it():
    big = perf.Layout(41, stats=dataclasses.replace(stats(3.6, rss=[13_000 / 41] * 41),
                                                    pss_mb=[100.0] * 41))
    out = perf.render(results(big=big, floor_init=[310.0] * 41, floor_trained=[315.0] * 41))
    assert re.search(r"\(PSS at the end, summed: the job's physical memory\)\s+4,100", out)
    # 41 x 310 = 12,710: +10 per rank over bare torch (300)
    assert re.search(r"floor, 41 ranks: import torch \+ MPI init\s+12,710   \+10\.0 MiB per "
                     r"rank over bare torch", out)
    # 41 x 315 = 12,915; budget 13,324 - 12,915 = +409
    assert re.search(r"floor, 41 ranks: \+ a bare hand-written MLP SGD loop\s+12,915   "
                     r"\+5\.0 MiB per rank; budget - floor = \+409", out)
    assert re.search(r"fedmpi over that floor\s+\+85   \+2\.1 MiB per rank", out)  # 13,000


def test_floor_ranks_report_their_peak_rss_before_and_after_training():
    """fedmpi.bench.floor at -n 2 (a real launch): one JSON row per rank; training only
    adds to the peak; an MPI rank with torch holds more than a bare torch import."""
    import json
    _, proc = perf.mpirun(2, "fedmpi.bench.floor", ["--dims", "20,8,3", "--samples", "50",
                                                     "--steps", "5", "--batch", "16"], 300)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got["init"]) == len(got["trained"]) == 2
    bare = perf.child_peak_rss_mb("import torch", repeat=1)
    for init, trained in zip(got["init"], got["trained"], strict=True):
        assert trained >= init > 0.9 * bare


def test_floor_loop_trains():
    """The floor's hand-written loop is a real SGD loop: it fits 16 random samples."""
    from fedmpi.bench import floor
    first = floor.train([20, 16, 3], 16, 1, 16, seed=0, lr=0.5)
    later = floor.train([20, 16, 3], 16, 500, 16, seed=0, lr=0.5)
    assert later < 0.5 * first


def test_table_reports_missed_targets():
    res = results(reference=perf.RefStats(20.0, 2, 1, 1.0, 0.8),
                  big=perf.Layout(41, stats=stats(4.2, rss=[400.0] * 41)))
    out = perf.render(res)
    assert "speed-up vs reference: 8.0x   (fedmpi -n 2 run.server_trains=true; target >= " \
           "10x: NOT met)" in out
    assert "-n 41 / -n 3: 1.40x   (target <= 1.3x: NOT met)" in out
    assert re.search(r"budget: 41 x bare \+ 1 GiB\s+13,324\s+NOT met", out)
    # the slowest rank in training and the slowest in encoding need not be the same rank
    overlap = perf.Layout(2, True, stats=stats(2.5, 2.0, 0.55))
    out = perf.render(results(layouts=[overlap]))
    assert "/ time_round: -2.0%   (target < 5%: met)" in out and "(below 0: " in out


# ---------------------------------------------------------------------------- reference


def test_reference_uses_fedmpis_shards_test_set_and_initial_model(tiny_env):
    import fedmpi.train

    cfg = tiny_job(tiny_env).config()
    ref = ref3.Reference(cfg)
    loaded = data.load(cfg)
    parts = data.partition(loaded, cfg)
    for client, part in zip(ref.clients, parts, strict=True):
        xs = torch.stack([client.loader.dataset[i][0] for i in range(len(part))])
        assert torch.equal(xs, torch.from_numpy(loaded.train.x[part]).float() / 255)
        assert [client.loader.dataset[i][1] for i in range(len(part))] == \
            loaded.train.y[part].tolist()
    test = ref.server.loader.dataset
    assert len(test) == len(loaded.test) == 120
    assert [test[i][1] for i in range(len(test))] == loaded.test.y.tolist()
    seed = int(np.random.default_rng([0, fedmpi.train.TAG_INIT]).integers(2**31))
    assert ref3.TAG_INIT == fedmpi.train.TAG_INIT and ref3.init_seed(0) == seed


@pytest.mark.parametrize("ef", [True, False])
def test_reference_rounds_compute_what_fedmpi_computes(tmp_path, tiny_env, ef):
    """Two rounds of the reference and of fedmpi (-n 1, one thread) on the same tiny job:
    the same per-client training losses, compression cosines and test loss and accuracy,
    to float tolerance. (Few LBFGS iterations: over hundreds, the two LBFGS codes'
    rounding differences grow until the fitted samples differ.)"""
    job = tiny_job(tiny_env)
    extra = [] if ef else ["compressor.ef=false"]
    cfg = job.config(*extra)
    assert cfg.compressor.ef is ef
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = ref3.Reference(cfg)
        rounds = [ref.round(r) for r in range(2)]
    finally:
        torch.set_num_threads(before)
    args = [a for s in [*job.settings(), *extra, "run.rounds=2", "run.threads=1"]
            for a in ("--set", s)]
    run = run_and_open(tmp_path, 1, args)
    for r, res in enumerate(rounds):
        assert res.train_loss == pytest.approx(run.clients["train_loss"][r].tolist(), rel=1e-4)
        assert res.cos == pytest.approx(run.clients["efficiency"][r].tolist(), abs=1e-3)
        assert res.test_loss == pytest.approx(run.rounds["test_loss"][r], rel=1e-4)
        assert res.test_acc == pytest.approx(run.rounds["test_acc"][r], abs=1.5 / 120)
    assert rounds[1].test_loss != rounds[0].test_loss  # the model moved
    for res in rounds:
        phases = res.time_train + res.time_fit + res.time_decode + res.time_eval
        assert 0 < phases <= res.seconds and min(res.time_train, res.time_fit) > 0


def test_reference_refuses_what_it_does_not_implement(tiny_env):
    job = tiny_job(tiny_env)
    with pytest.raises(ValueError, match="LBFGS"):
        ref3.Reference(job.config("compressor.optimizer=gd"))
    with pytest.raises(ValueError, match="local epochs"):
        ref3.Reference(job.config("client.local_epochs=0", "client.local_steps=3"))


def test_bare_loop_trains_a_whole_rounds_batches(tiny_env):
    cfg = tiny_job(tiny_env).config()
    sizes = [len(p) for p in data.partition(data.load(cfg), cfg)]
    bare = perf.bare_sgd(cfg, round_=1, warmup=2)
    assert bare.steps == sum(len(batch_schedule(n, cfg, 1, c)) for c, n in enumerate(sizes))
    assert bare.samples == perf.samples_per_round(sizes, cfg.client) == 2 * 480
    assert bare.seconds > 0
    assert perf.bare_sgd(cfg, max_steps=5, warmup=0).steps == 5


def test_bare_torch_rss_is_torchs_import_cost():
    torch_mb = perf.child_peak_rss_mb("import torch", repeat=1)
    python_mb = perf.child_peak_rss_mb("pass", repeat=1)
    assert torch_mb > python_mb + 50  # torch maps hundreds of MB of libraries


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_quick_mode_prints_every_line(tiny_root):
    proc = subprocess.run([sys.executable, "-m", "fedmpi.bench", "perf", "--quick", "--root",
                           tiny_root, "--max-ranks", "4", "--bare-steps", "20"],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^   speed-up vs reference: \d+\.\dx ", out, re.M)
    assert re.search(r"training efficiency vs bare loop: \d+\.\d%", out)
    assert re.search(r"^   -n 4 / -n 3: \d+\.\d\dx", out, re.M)
    assert re.search(r"summed over the 4 ranks\s+[\d,]+", out)
    assert re.search(r"budget: 4 x bare \+ 1 GiB", out)
    assert re.search(r"floor, 4 ranks: \+ a bare hand-written MLP SGD loop\s+[\d,]+", out)
    assert re.search(r"/ time_round: -?\d+\.\d%", out)
    assert "fedmpi -n 3 " in out and "fedmpi -n 2 run.server_trains=true" in out
    assert "--set data.num_clients=4" in out


def test_cli_refuses_a_missing_dataset(tmp_path, capsys):
    assert dispatcher.main(["perf", "--root", str(tmp_path)]) == 2
    assert "no MNIST files" in capsys.readouterr().err


def test_results_best_is_the_fastest_layout():
    res = results()
    assert res.best is res.layouts[1]
    slow = dataclasses.replace(res.layouts[1], stats=stats(9.0, 1.0))
    assert perf.render(dataclasses.replace(res, layouts=[res.layouts[0], slow])).count(
        "speed-up vs reference: 10.0x") == 1  # 30 s / 3.0 s
