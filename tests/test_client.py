"""Local training: batch schedules, flat parameters, SGD equal to a torch.optim reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmpi import compress, config, sam
from fedmpi.client import ClientGroup, Shard, batch_schedule
from fedmpi.data import DatasetInfo, Normalizer
from fedmpi.models import FlatModel, build_module


def test_local_steps_schedule_is_k_batches_and_seeded():
    cfg = config.load(None, ["client.local_steps=7", "client.batch_size=4"])
    a = batch_schedule(10, cfg, 3, 2)
    assert len(a) == 7 and all(len(b) == 4 for b in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, batch_schedule(10, cfg, 3, 2),
                                                    strict=True))
    assert not np.array_equal(np.concatenate(a), np.concatenate(batch_schedule(10, cfg, 4, 2)))
    # the stream is a sequence of permutations: the first 10 indices cover the shard once
    assert sorted(np.concatenate(a)[:10]) == list(range(10))


def test_local_epochs_cover_every_sample_once_per_epoch():
    cfg = config.load(None, ["client.local_steps=0", "client.local_epochs=2",
                             "client.batch_size=4"])
    sched = batch_schedule(10, cfg, 0, 0)
    assert [len(b) for b in sched] == [4, 4, 2, 4, 4, 2]
    assert sorted(np.concatenate(sched[:3])) == list(range(10))
    assert sorted(np.concatenate(sched[3:])) == list(range(10))


def test_batch_never_exceeds_shard():
    cfg = config.load(None, ["client.local_steps=3", "client.batch_size=64"])
    assert all(len(b) == 5 for b in batch_schedule(5, cfg, 0, 0))


def _group(cfg, n=37, d_in=6, classes=3):
    info = DatasetInfo("t", (d_in,), classes)
    g = torch.Generator().manual_seed(0)
    shard = Shard(torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,),
                                                                    generator=g))
    model = FlatModel(build_module(cfg.model, info.input_shape, classes, seed=1))
    spec = compress.ModelSpec(d=model.d, shapes=model.shapes, input_shape=(d_in,),
                              num_classes=classes)
    comp = compress.build(cfg.compressor, spec)
    group = ClientGroup(cfg, {5: shard}, model, comp, spec, Normalizer(info),
                        sam.build(cfg, spec))
    return group, shard


@pytest.mark.parametrize("backprop", ["autograd", "dense"])
def test_local_training_equals_torch_sgd_reference(backprop):
    cfg = config.load(None, ["client.local_steps=6", "client.batch_size=8", "client.lr=0.1",
                             "client.momentum=0.9", "client.weight_decay=0.01",
                             "client.grad_clip=0.5", "model.hidden=16",
                             f"client.backprop={backprop}"])
    group, shard = _group(cfg)
    assert (group.model.dense is not None) == (backprop == "dense")
    w0 = group.model.params.clone()
    group.set_global(w0)
    update, loss, steps = group.local_train(5, round_=2)

    ref = build_module(cfg.model, (6,), 3, seed=1)
    torch.nn.utils.vector_to_parameters(w0.clone(), ref.parameters())  # no aliasing
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    losses = []
    for idx in batch_schedule(len(shard), cfg, 2, 5):
        opt.zero_grad()
        out = F.cross_entropy(ref(shard.x[idx]), shard.y[idx])
        out.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        losses.append(float(out.detach()))
    expect = torch.nn.utils.parameters_to_vector(ref.parameters()) - w0
    assert steps == 6
    torch.testing.assert_close(update, expect, rtol=1e-5, atol=1e-6)
    assert abs(loss - np.mean(losses)) < 1e-5


@pytest.mark.parametrize("extra", [[], ["sam.name=fedsam", "sam.rho=0.05"],
                                   ["client.momentum=0.5", "client.grad_clip=0.3"]],
                         ids=["sgd", "fedsam", "momentum-clip"])
def test_dense_backprop_trains_like_autograd(extra):
    """``client.backprop``: the hand-written dense-chain gradient and autograd give the
    same updates and losses to float tolerance over 40 steps, SAM's ascent included."""
    out = {}
    for backprop in ("autograd", "dense"):
        cfg = config.load(None, ["client.local_steps=40", "client.batch_size=8",
                                 "client.lr=0.05", "model.hidden=32",
                                 f"client.backprop={backprop}", *extra])
        group, _ = _group(cfg, n=64)
        group.set_global(group.model.params.clone())
        out[backprop] = group.local_train(5, round_=1)
    (ua, la, _), (ud, ld, _) = out["autograd"], out["dense"]
    assert float(ua.norm()) > 0
    torch.testing.assert_close(ud, ua, rtol=1e-4, atol=1e-4 * float(ua.abs().max()))
    assert abs(ld - la) < 1e-5


def test_lr_decays_per_round_trained():
    cfg = config.load(None, ["client.local_steps=1", "client.lr_decay=0.5", "model.hidden=8"])
    group, _ = _group(cfg)
    group.set_global(group.model.params.clone())
    u0, _, _ = group.local_train(5, 0)
    u1, _, _ = group.local_train(5, 0)  # same batch (same round), half the lr
    torch.testing.assert_close(u1, u0 * 0.5)


def test_run_round_reports_identity_efficiency_one():
    cfg = config.load(None, ["model.hidden=8"])
    group, _ = _group(cfg)
    group.set_global(group.model.params.clone())
    (res,) = group.run_round(0, [5])
    assert res.client == 5 and res.payload.nbytes == 4 * group.spec.d
    assert abs(res.efficiency - 1.0) < 1e-6
    assert group.run_round(0, [4]) == []


def test_flat_model_views():
    cfg = dataclasses.replace(config.load(None).model, hidden=4)
    m = FlatModel(build_module(cfg, (3,), 2, seed=0))
    assert m.d == sum(p.numel() for p in m.module.parameters())
    m.params.fill_(0.5)
    assert all(bool((p == 0.5).all()) for p in m.module.parameters())
    m.params.copy_(torch.randn(m.d, generator=torch.Generator().manual_seed(0)))
    F.cross_entropy(m(torch.randn(4, 3)), torch.tensor([0, 1, 1, 0])).backward()
    expect = torch.cat([p.grad.reshape(-1) for p in m.module.parameters()])
    assert torch.equal(m.grad, expect) and float(m.grad.abs().sum()) > 0


def _multi_group(cfg, sizes=(37, 37, 12, 37)):
    d_in, classes = 6, 3
    info = DatasetInfo("t", (d_in,), classes)
    g = torch.Generator().manual_seed(0)
    shards = {cid: Shard(torch.randn(n, d_in, generator=g),
                         torch.randint(0, classes, (n,), generator=g))
              for cid, n in enumerate(sizes)}
    model = FlatModel(build_module(cfg.model, info.input_shape, classes, seed=1))
    spec = compress.ModelSpec(d=model.d, shapes=model.shapes, input_shape=(d_in,),
                              num_classes=classes)
    group = ClientGroup(cfg, shards, model, compress.build(cfg.compressor, spec), spec,
                        Normalizer(info), sam.build(cfg, spec))
    group.set_global(model.params.clone())
    return group


@pytest.mark.parametrize("extra", [
    [], ["client.momentum=0.9", "client.weight_decay=0.01", "client.grad_clip=0.5"],
    ["client.local_steps=0", "client.local_epochs=2", "client.lr_decay=0.7"],
])
def test_batched_execution_equals_sequential(extra):
    base = ["client.local_steps=5", "client.batch_size=8", "client.lr=0.1", "model.hidden=16",
            "data.num_clients=4", *extra]
    seq = _multi_group(config.load(None, [*base, "client.execution=sequential"]))
    bat = _multi_group(config.load(None, [*base, "client.execution=batched"]))
    for rnd in range(2):  # round 1 checks the per-client lr decay state too
        a = seq.run_round(rnd, [0, 1, 2, 3])
        b = bat.run_round(rnd, [0, 1, 2, 3])
        for ra, rb in zip(a, b, strict=True):
            assert ra.client == rb.client and ra.steps == rb.steps
            torch.testing.assert_close(torch.from_numpy(rb.payload["values"]),
                                       torch.from_numpy(ra.payload["values"]),
                                       rtol=1e-4, atol=1e-6)
            assert abs(ra.train_loss - rb.train_loss) < 1e-5


def test_batched_execution_refuses_sam():
    with pytest.raises(config.ConfigError, match="client.execution"):
        config.load(None, ["client.execution=batched", "sam.name=fedsam"])


@pytest.mark.parametrize("clients, batch, chunks", [
    (7, 3, [2, 2, 3]), (5, 16, [5]), (6, 2, [2, 2, 2]), (4, 1, [1, 1, 1, 1]),
])
def test_auto_execution_encodes_in_equal_chunks(clients, batch, chunks):
    """auto encodes in chunks of at most compressor.batch_clients, as equal as possible
    (20 clients by 16 are 10 + 10, not 16 + 4: a batched fit costs about the same for 4
    problems as for 10), in client-id order."""
    cfg = config.load(None, ["client.local_steps=1", "client.batch_size=4", "model.hidden=8",
                             f"data.num_clients={clients}", "compressor.name='3sfc'",
                             "compressor.s_steps=1", "compressor.max_iter=2",
                             f"compressor.batch_clients={batch}"])
    group = _multi_group(cfg, sizes=(9,) * clients)
    seen = []
    real = group.compressor.compress_many

    def spy(updates, states, ctxs):
        seen.append([c.client for c in ctxs])
        return real(updates, states, ctxs)

    group.compressor.compress_many = spy
    results = group.run_round(0, list(range(clients)))
    assert [len(c) for c in seen] == chunks
    assert [c for chunk in seen for c in chunk] == list(range(clients))
    assert [r.client for r in results] == list(range(clients))
