"""FedProx (fedmpi/algorithms/fedprox.py): the proximal step by hand on a linear model,
convergence, any compressor, rank invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmpi import config

from .algohelp import assert_same_runs, hand_sgd, linear_group
from .conftest import SMALL, run_and_open


def test_local_steps_equal_the_proximal_sgd_by_hand():
    """w <- w - lr (grad f(w) + mu (w - w^t)), K steps, Delta = w_K - w^t uploaded."""
    cfg, group, shard = linear_group(["algorithm.name=fedprox", "algorithm.mu=0.7",
                                      "client.local_steps=5", "client.batch_size=6",
                                      "client.lr=0.3"])
    w0 = group.model.params.clone()
    group.set_global(w0)
    (res,) = group.run_round(2, [5])
    base = w0.double().numpy()
    expect = hand_sgd(cfg, shard, base, 2, 5, lambda w: 0.7 * (w - base)) - base
    got = torch.from_numpy(res.payloads["update"]["values"]).double().numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
    # mu = 0 is FedAvg exactly
    _, plain, _ = linear_group(["client.local_steps=5", "client.batch_size=6",
                                "client.lr=0.3"])
    _, prox0, _ = linear_group(["algorithm.name=fedprox", "algorithm.mu=0",
                                "client.local_steps=5", "client.batch_size=6",
                                "client.lr=0.3"])
    for g in (plain, prox0):
        g.set_global(w0)
    a = plain.run_round(1, [5])[0].payload["values"]
    b = prox0.run_round(1, [5])[0].payload["values"]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_config_keys_are_the_algorithms_own():
    cfg = config.load(None, ["algorithm.name=fedprox", "algorithm.mu=0.1"])
    assert cfg.algorithm.params.mu == 0.1
    assert "mu = 0.1" in config.to_toml(cfg)
    assert config.loads(config.to_toml(cfg)) == cfg
    with pytest.raises(config.ConfigError, match="algorithm.mu"):
        config.load(None, ["algorithm.name=fedprox", "algorithm.mu=-1"])
    with pytest.raises(config.ConfigError, match="algorithm.mu"):
        config.load(None, ["algorithm.mu=0.1"])  # fedavg has no mu
    with pytest.raises(config.ConfigError, match="client.execution"):
        config.load(None, ["algorithm.name=fedprox", "client.execution=batched"])


PROX = [*SMALL, "--set", "algorithm.name=fedprox", "--set", "algorithm.mu=0.01"]


def test_fedprox_learns(tmp_path):
    run = run_and_open(tmp_path, 1, [*PROX, "--set", "run.rounds=8"])
    acc = run.rounds["test_acc"]
    assert run.rounds["test_loss"][-1] < run.rounds["test_loss"][0]
    assert acc[-1] > 0.2  # 10 classes: chance is 0.1
    d = int(run.attrs["num_params"])
    assert (run.clients["uplink_bytes"][0] == 4 * d).all()  # one dense payload


@pytest.mark.parametrize("comp", [["compressor.name=topk", "compressor.ef=true"],
                                  ["compressor.name=qsgd"]], ids=["topk-ef", "qsgd"])
def test_any_compressor_and_rank_invariance(tmp_path, comp):
    args = [*PROX, *(x for c in comp for x in ("--set", c))]
    one = run_and_open(tmp_path, 1, args, name="one")
    three = run_and_open(tmp_path, 3, args, name="three")
    assert_same_runs(one, three)
    d = int(one.attrs["num_params"])
    assert 0 < one.rounds["uplink_payload_bytes"][0] < 6 * 4 * d
    assert np.isfinite(one.rounds["test_loss"]).all()
