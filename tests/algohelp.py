"""Helpers of the algorithm tests (tests/test_fedprox.py, tests/test_scaffold.py): a tiny
linear model, its hand-computed gradient, a client group around it, run comparisons."""

from __future__ import annotations

import numpy as np
import torch

from fedmpi import compress, config, sam
from fedmpi.client import ClientGroup, Shard, batch_schedule
from fedmpi.data import DatasetInfo, Normalizer
from fedmpi.models import FlatModel, build_module

D_IN, CLASSES = 5, 3
#: columns that measure time, or the simulator's transport (they change with the rank
#: count); every other /rounds and /clients column must agree bit for bit
SKIP = ("time_", "wall_time", "transport_")


def linear_group(overrides: list[str], n: int = 23):
    """A logreg (one Linear layer) client 5 on random data: (cfg, group, shard)."""
    cfg = config.load(None, ["model.name=logreg", *overrides])
    info = DatasetInfo("t", (D_IN,), CLASSES)
    g = torch.Generator().manual_seed(3)
    shard = Shard(torch.randn(n, D_IN, generator=g),
                  torch.randint(0, CLASSES, (n,), generator=g))
    model = FlatModel(build_module(cfg.model, info.input_shape, CLASSES, seed=2))
    spec = compress.ModelSpec(d=model.d, shapes=model.shapes, input_shape=(D_IN,),
                              num_classes=CLASSES)
    group = ClientGroup(cfg, {5: shard}, model, compress.build(cfg.compressor, spec), spec,
                        Normalizer(info), sam.build(cfg, spec))
    return cfg, group, shard


def linear_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """By hand: the mean cross-entropy gradient of logits = x W^T + b at the flat
    w = [W (row-major), b]."""
    W, b = w[:CLASSES * D_IN].reshape(CLASSES, D_IN), w[CLASSES * D_IN:]
    z = x @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return np.concatenate([(p.T @ x).reshape(-1), p.sum(0)])


def hand_sgd(cfg, shard, w0: np.ndarray, round_: int, client: int, extra) -> np.ndarray:
    """Local SGD by hand: ``w <- w - lr (grad(w) + extra(w))`` over the client's batches."""
    w = w0.copy()
    x, y = shard.x.double().numpy(), shard.y.numpy()
    for idx in batch_schedule(len(shard), cfg, round_, client):
        w = w - cfg.client.lr * (linear_grad(w, x[idx], y[idx]) + extra(w))
    return w


def assert_same_runs(a, b) -> None:
    """Two run files agree bit for bit in every column but times and transport bytes."""
    assert len(a) == len(b)
    for group_a, group_b in ((a.rounds, b.rounds), (a.clients, b.clients)):
        for k, v in group_a.items():
            if k.startswith(SKIP):
                continue
            assert np.array_equal(v, group_b[k], equal_nan=True), k
