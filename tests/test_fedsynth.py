"""FedSynth baseline: replayed synthetic batches, larger payload, bit-exact server decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmpi import synth
from fedmpi.compress.fedsynth import FedSynth
from fedmpi.config import ConfigError
from tests.conftest import run_and_open
from tests.test_sfc3 import (
    E2E,
    MNIST,
    build,
    contexts,
    load_cfg,
    make_model,
    make_server,
    need_mnist,
    real_updates,
    scrambled_replica,
    spec_of,
)

SMALL = ["compressor.batches=4", "compressor.s_steps=5"]


@pytest.mark.parametrize("k, m", [(4, 1), (3, 2)])
def test_payload_bytes_and_parse(k, m):
    model = make_model()
    comp, _ = build(model, f"compressor.batches={k}", f"compressor.m={m}",
                    "compressor.s_steps=1", name="fedsynth")
    assert isinstance(comp, FedSynth)  # no EF wrapper by default
    w = model.params.clone()
    (payload, _), = comp.encode_many(real_updates(model, w, 1), [None],
                                     contexts([0], w, model))
    assert payload.nbytes == 4 * (k * m * (784 + 10) + 1)
    assert payload.nbytes > 4 * (m * (784 + 10) + 1)  # larger than 3SFC at the same M
    back = comp.parse(payload.to_bytes(), contexts([0], w, model)[0])
    assert all(np.array_equal(back[f], payload[f]) for f in payload.fields)


def test_defaults():
    comp, _ = build(make_model(), name="fedsynth")
    assert (comp.cfg.batches, comp.cfg.inner_lr, comp.cfg.optimizer) == (20, 0.01, "gd")
    assert 4 * comp.payload_floats == 4 * (20 * 794 + 1) == 63_524


@pytest.mark.parametrize("sets, key", [
    (["compressor.batches=0"], "compressor.batches"),
    (["compressor.inner_lr=0.0"], "compressor.inner_lr"),
    (["compressor.m=0"], "compressor.m"),
    (["compressor.budget=900"], "compressor.budget"),  # fedsynth has no budget key
])
def test_bad_keys_are_named(sets, key):
    with pytest.raises(ConfigError) as err:
        load_cfg(*sets, name="fedsynth")
    assert err.value.key == key


def test_decode_is_the_scaled_replay_and_the_fit_helps():
    model = make_model()
    w = model.params.clone()
    comp, _ = build(model, *SMALL, name="fedsynth")
    u = real_updates(model, w, 1)[0]
    (payload, _, decoded, target), = comp.compress_many([u], [None], contexts([0], w, model))
    k = comp.cfg.batches
    x = torch.from_numpy(payload["x"]).view(k, 1, *MNIST)
    y = torch.from_numpy(payload["y"]).view(k, 1, 10)
    replay = synth.Replay(synth.SynthModel(model), k, 1, MNIST, 10, comp.cfg.inner_lr)
    delta = replay(w, x, y)
    s = float(payload["scale"][0])
    assert s == float(np.float32(float(torch.dot(delta, u)) / float(torch.dot(delta, delta))))
    assert torch.equal(decoded, delta * s)
    # the fitted batches match u better than the random start they came from
    x0, y0 = synth.init_xy(contexts([0], w, model)[0].torch_generator(comp.tag),
                           replay.x_shape, replay.y_shape)
    start = abs(float(F.cosine_similarity(replay(w, x0, y0), u, 0)))
    assert abs(float(F.cosine_similarity(decoded, target, 0))) > start + 0.05


def test_server_decode_is_bitwise_the_clients_decode():
    server_model = make_model()
    w = server_model.params.clone()
    spec = spec_of(server_model)
    comp, cfg = build(server_model, *SMALL, "compressor.ef=true", name="fedsynth")
    out = comp.compress_many(real_updates(server_model, w, 2),
                             [comp.init_state(c) for c in range(2)],
                             contexts(range(2), w.clone(), scrambled_replica(), spec=spec))
    server = make_server(cfg, server_model, comp, spec)
    got = server.decode(0, [0, 1], [p.nbytes for p, *_ in out],
                        np.concatenate([p.to_bytes() for p, *_ in out]))
    for c, (_, state, decoded, target) in enumerate(out):
        assert torch.equal(got[c], decoded)
        assert torch.equal(state.residual, target - decoded)


@pytest.mark.slow
def test_e2e_mnist_fedsynth_runs_with_the_larger_payload(tmp_path):
    args = [*E2E, *need_mnist(), "--set", "run.rounds=2", "--set", "model.hidden=32",
            "--set", "compressor.name=fedsynth", "--set", "compressor.batches=4",
            "--set", "compressor.s_steps=3"]
    run = run_and_open(tmp_path, 1, args, name="fedsynth")
    r = run.rounds
    assert run.complete and run.config.compressor.ef is False
    assert np.all(r["uplink_bytes"] == 5 * 4 * (4 * 794 + 1))
    assert np.all(r["uplink_bytes"] > 5 * 3_180)
    assert np.all(np.isfinite(r["test_loss"]))
    assert np.all(np.isfinite(run.clients["efficiency"]))
