"""Perturbation accuracy (fedmpi.perturbation): the per-client cosine against a direct
computation, the measurement's footprint (none on training or counted bytes), the
official FedLESAM's ascent absent in round 0 and equal to the previous global update
after, FedSynSAM's fit cosine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmpi import config, data, perturbation, sharpness
from fedmpi.client import batch_schedule
from fedmpi.models import build_module
from fedmpi.train import TAG_INIT
from tests.conftest import SMALL, run_and_open

#: 6 synthetic clients, 3 of them a round, the true gradient on 120 samples every round
PROBE = [*SMALL, "--set", "server.participation=0.5", "--set", "eval.perturbation_every=1",
         "--set", "eval.perturbation_samples=120", "--set", "sam.rho=0.1"]


def sets(args: list[str]) -> list[str]:
    return [args[i + 1] for i in range(0, len(args), 2)]


def direct_round0(overrides: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """cos(local minibatch gradient at w^0, grad F(w^0)) of every client, computed here
    from the definitions: F over 120 rows drawn with [subset_seed, TAG_SHARPNESS_DATA]
    from the union of the clients' rows, w^0 from [seed, TAG_INIT], each client's first
    batch of round 0, plain autograd. Also returns the union."""
    cfg = config.load(None, overrides)
    loaded = data.load(cfg)
    parts = data.partition(loaded, cfg)
    info = data.info(cfg.data)
    norm = data.Normalizer(info)
    init_seed = int(np.random.default_rng([cfg.run.seed, TAG_INIT]).integers(2**31))
    module = build_module(cfg.model, info.input_shape, info.num_classes, init_seed)
    params = list(module.parameters())

    def grad_at(x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        loss = F.cross_entropy(module(norm(torch.from_numpy(x))), torch.from_numpy(y))
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    rows = np.unique(np.concatenate(parts))
    rng = np.random.default_rng([cfg.eval.subset_seed, sharpness.TAG_SHARPNESS_DATA])
    pick = rows[np.sort(rng.choice(len(rows), size=min(120, len(rows)), replace=False))]
    g_true = grad_at(loaded.train.x[pick], loaded.train.y[pick])
    cos = np.full(len(parts), np.nan)
    for c, p in enumerate(parts):
        first = p[batch_schedule(len(p), cfg, 0, c)[0]]
        g = grad_at(loaded.train.x[first], loaded.train.y[first])
        cos[c] = float(torch.dot(g, g_true) / (g.norm() * g_true.norm()))
    return cos, rows


@pytest.mark.slow
def test_fedsam_cosine_equals_a_direct_computation(tmp_path):
    """3 ranks (the true gradient broadcast to 2 client ranks, the cosines gathered back)
    against the cosines computed here from the definitions, in round 0."""
    args = [*PROBE, "--set", "sam.name=fedsam"]
    run = run_and_open(tmp_path, 3, args)
    want, _ = direct_round0(sets(args))
    took = run.clients["participation"][0] == 1
    got = run.clients["perturb_cos"][0]
    assert took.sum() == 3 and np.all(np.isnan(got[~took]))  # only participants measure
    np.testing.assert_allclose(got[took], want[took], atol=2e-5)
    assert np.all(np.abs(want[took]) > 0.05)  # a real, not a vanishing, comparison
    for r in range(len(run)):  # the round column is the participants' mean
        assert run.rounds["perturb_cos"][r] == pytest.approx(
            np.nanmean(run.clients["perturb_cos"][r]), abs=1e-12)


def test_subset_draws_from_the_union_of_the_clients_rows():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = np.arange(100)
    parts = [np.array([5, 7, 9]), np.array([7, 20, 21, 90]), np.array([42])]
    sub = perturbation.subset(x, y, parts, 5, seed=0)
    assert set(sub.y.tolist()) <= {5, 7, 9, 20, 21, 42, 90} and len(sub.y) == 5
    assert len(perturbation.subset(x, y, parts, 50, seed=0).y) == 7  # the union, once each
    everyone = [np.arange(0, 60), np.arange(60, 100)]  # every row held: the sharpness rows
    assert torch.equal(perturbation.subset(x, y, everyone, 30, seed=3).y,
                       sharpness.fixed_subset(x, y, 30, seed=3).y)


def test_measurement_rounds():
    ev = config.load(None, ["eval.perturbation_every=2"]).eval
    assert [r for r in range(5) if perturbation.due(ev, r, 5)] == [1, 3, 4]
    off = config.load(None).eval
    assert not any(perturbation.due(off, r, 5) for r in range(5))


#: every round column that neither times nor measures the perturbation
UNTOUCHED = ("test_acc", "test_loss", "train_loss", "participants", "uplink_bytes",
             "uplink_payload_bytes", "transport_downlink_bytes", "downlink_payload_bytes",
             "transport_meta_bytes", "efficiency_mean")


@pytest.mark.slow
def test_measuring_changes_neither_training_nor_counted_bytes(tmp_path):
    args = [*PROBE, "--set", "sam.name=fedsynsam", "--set", "sam.m=2",
            "--set", "sam.s_steps=2"]
    on = run_and_open(tmp_path, 3, args, name="on")
    off = run_and_open(tmp_path, 3, [*args, "--set", "eval.perturbation_every=0"],
                       name="off")
    for k in UNTOUCHED:
        assert np.array_equal(on.rounds[k], off.rounds[k], equal_nan=True), k
    for k in ("train_loss", "uplink_bytes", "efficiency"):
        assert np.array_equal(on.clients[k], off.clients[k], equal_nan=True), k
    assert np.all(np.isnan(off.rounds["perturb_cos"]))
    assert np.all(np.isnan(off.clients["perturb_cos"]))
    # FedSynSAM climbs from round 1 (round 0 has no S); its fit is recorded every round
    assert np.isnan(on.rounds["perturb_cos"][0]) and np.all(np.isfinite(
        on.rounds["perturb_cos"][1:]))
    for run in (on, off):
        fit = run.rounds["synth_fit_cos"]
        assert np.isnan(fit[0]) and np.all((fit[1:] > 0) & (fit[1:] <= 1))
    assert np.array_equal(on.rounds["synth_fit_cos"], off.rounds["synth_fit_cos"],
                          equal_nan=True)


@pytest.mark.slow
def test_official_fedlesam_has_no_ascent_in_round0_then_climbs_the_previous_update(
        tmp_path):
    """Every participant of round t >= 1 climbs w^{t-1} - w^t, whether or not it took part
    before: its cosine is the previous update's (rank 0's own column); the client-side
    form has nothing for a client's first round."""
    run = run_and_open(tmp_path, 3, [*PROBE, "--set", "sam.name=fedlesam"], name="server")
    took = run.clients["participation"] == 1
    cos = run.clients["perturb_cos"]
    assert np.all(np.isnan(cos[0])) and np.isnan(run.rounds["perturb_cos_update"][0])
    for r in range(1, len(run)):
        assert np.all(np.isfinite(cos[r][took[r]]))
        np.testing.assert_allclose(cos[r][took[r]], run.rounds["perturb_cos_update"][r],
                                   atol=1e-6)
    local = run_and_open(tmp_path, 3, [*PROBE, "--set", "sam.name=fedlesam",
                                       "--set", "sam.lesam_source=client"], name="client")
    took = local.clients["participation"] == 1
    seen = np.cumsum(took, axis=0) - took  # rounds each client trained before this one
    cos = local.clients["perturb_cos"]
    assert np.array_equal(np.isfinite(cos) & took, took & (seen > 0))
    assert (took & (seen == 0))[1:].any()  # a first-timer after round 0 was checked
