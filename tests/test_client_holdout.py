"""data.client_holdout (a seeded share of every client's shard held out of its training and
scored every eval round) and client.lr_decay_first: the 3SFC code's protocol."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedmpi import config, data
from fedmpi.client import client_lr
from fedmpi.compress import Identity, ModelSpec
from fedmpi.data import ArrayDataset, DataError
from fedmpi.models import FlatModel, build_module
from fedmpi.server import Server
from tests.conftest import SMALL, run_and_open


def cfg_with(**data_keys) -> config.Config:
    return config.from_dict({"data": {"dataset": "mnist", "partition": "iid",
                                      "num_clients": 4, **data_keys}})


def test_holdout_is_a_seeded_share_of_each_shard():
    parts = [np.arange(0, 50), np.arange(50, 61), np.arange(61, 200, 2), np.array([7, 9])]
    cfg = cfg_with(client_holdout=0.2)
    train, held = data.hold_out(parts, cfg)
    for p, tr, ho in zip(parts, train, held, strict=True):
        assert len(tr) == int(len(p) * 0.8)  # the code's int(n * train_frac)
        assert np.array_equal(np.sort(np.concatenate([tr, ho])), p)
        assert not set(tr) & set(ho)
    again, _ = data.hold_out(parts, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(train, again, strict=True))
    other, _ = data.hold_out(parts, dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, seed=1)))
    assert not np.array_equal(other[0], train[0])
    # client i's split does not depend on the other clients (nor on ranks)
    alone, _ = data.hold_out(parts[:1], cfg)
    assert np.array_equal(alone[0], train[0])


def test_no_holdout_keeps_every_sample():
    parts = [np.arange(10), np.arange(10, 13)]
    train, held = data.hold_out(parts, cfg_with())
    assert train is parts and [len(h) for h in held] == [0, 0]


def test_a_holdout_that_leaves_a_client_nothing_is_refused():
    with pytest.raises(DataError, match="client 1"):
        data.hold_out([np.arange(10), np.array([3])], cfg_with(client_holdout=0.5))


def test_client_holdout_range_is_checked():
    with pytest.raises(config.ConfigError, match="data.client_holdout"):
        cfg_with(client_holdout=1.0)


def test_lr_decay_first_decays_before_the_first_training():
    c = config.ClientConfig(lr=0.01, lr_decay=0.99)
    assert [client_lr(c, n) for n in (0, 1, 2)] == pytest.approx([0.01, 0.0099, 0.009801])
    c = dataclasses.replace(c, lr_decay_first=True)
    assert [client_lr(c, n) for n in (0, 1)] == pytest.approx([0.0099, 0.009801])


def test_server_scores_every_clients_holdout():
    cfg = config.from_dict({"data": {"num_clients": 3}, "model": {"name": "logreg"}})
    module = build_module(cfg.model, (5,), 3, seed=0)
    model = FlatModel(module)
    spec = ModelSpec(d=model.d, shapes=model.shapes)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=20).astype(np.int64)
    owner = np.array([0] * 8 + [2] * 12)  # client 1 holds nothing out
    server = Server(cfg, model, Identity(Identity.Config(), spec), spec,
                    ArrayDataset(x, y), lambda v: v, (ArrayDataset(x, y), owner))
    got = server.client_accuracy()
    pred = module(torch.from_numpy(x)).argmax(1).numpy()
    assert got[0] == pytest.approx(np.mean(pred[:8] == y[:8]))
    assert np.isnan(got[1])
    assert got[2] == pytest.approx(np.mean(pred[8:] == y[8:]))
    assert server.evaluate()[0] == pytest.approx(np.mean(pred == y))


def test_holdout_runs_are_rank_invariant_and_recorded(tmp_path):
    args = [*SMALL, "--set", "data.client_holdout=0.25", "--set", "client.lr_decay=0.9",
            "--set", "client.lr_decay_first=true"]
    one = run_and_open(tmp_path, 1, args, name="one")
    three = run_and_open(tmp_path, 3, args, name="three")
    acc1, acc3 = one.clients["acc"][:], three.clients["acc"][:]
    assert acc1.shape == (3, 6) and np.isfinite(acc1).all()
    np.testing.assert_array_equal(acc1, acc3)
    np.testing.assert_array_equal(one.rounds["test_acc"][:], three.rounds["test_acc"][:])
    np.testing.assert_allclose(one.rounds["client_acc_mean"][:], acc1.mean(axis=1))
    plain = run_and_open(tmp_path, 1, SMALL, name="plain")
    assert np.isnan(plain.clients["acc"][:]).all()
    # clients trained on 75% of their shards: the partition table counts what they train on
    assert one.partition.sum() == sum(int(n * 0.75) for n in plain.partition.sum(axis=1))
