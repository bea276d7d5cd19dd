"""The compressor zoo (topk, randk, dgc, signsgd, stc, qsgd): wire round trips from bytes,
byte formulas, error feedback, and each method's defining property (docs/algorithms.md §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpi import compress, config, downlink
from fedmpi.compress import Context, ErrorFeedback, ModelSpec, wire
from fedmpi.compress.dgc import warmup_ratio
from fedmpi.config import ConfigError

SHAPES = [(32, 50), (32,), (10, 32), (10,)]
SPEC = ModelSpec(d=sum(math.prod(s) for s in SHAPES), shapes=SHAPES)  # d = 1962
MLP_SHAPES = [(200, 784), (200,), (200, 200), (200,), (10, 200), (10,)]
MLP = ModelSpec(d=199_210, shapes=MLP_SHAPES)

#: (name, keys) of every variant a test runs over
VARIANTS = [
    ("topk", {}),
    ("topk", {"per_layer": False, "ratio": 0.05}),
    ("topk", {"value_dtype": "fp16", "ratio": 0.1}),
    ("topk", {"budget_bytes": 700}),
    ("randk", {}),
    ("randk", {"shared_seed": False, "scaled": False, "ratio": 0.1}),
    ("randk", {"budget_bytes": 400, "value_dtype": "fp16"}),
    ("dgc", {"ratio": 0.05}),
    ("dgc", {"ratio": 0.01, "momentum": 0.9, "nesterov": True, "clip_norm": 1.0,
             "warmup_rounds": 3, "sample_ratio": 0.05}),
    ("dgc", {"budget_bytes": 350, "momentum": 0.5, "momentum_masking": False}),
    ("signsgd", {}),
    ("signsgd", {"scale": "none"}),
    ("signsgd", {"per_layer": False}),
    ("stc", {}),
    ("stc", {"ratio": 0.1, "per_layer": False}),
    ("qsgd", {}),
    ("qsgd", {"levels": 1, "bucket": 0}),
    ("qsgd", {"levels": 300, "bucket": 100}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in VARIANTS]


def make(name: str, spec: ModelSpec = SPEC, **keys):
    """Build through the config machinery, as a run does."""
    cfg = config.from_dict({"compressor": {"name": name, **keys}})
    return compress.build(cfg.compressor, spec)


def ctx(round_: int = 0, client: int = 0, spec: ModelSpec = SPEC) -> Context:
    return Context(round=round_, client=client, seed=5, spec=spec)


def vec(seed: int, d: int = SPEC.d) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def wire_trip(comp, x, state=None, c=None):
    """encode, then decode on a fresh instance from the bytes alone."""
    c = c or ctx()
    state = comp.init_state(c.client) if state is None else state
    payload, new = comp.encode(x, state, c)
    buf = payload.to_bytes()
    assert buf.dtype == np.uint8 and buf.size == payload.nbytes
    server = type(comp)(comp.cfg, comp.spec)
    server_ctx = Context(round=c.round, client=c.client, seed=c.seed, spec=c.spec)
    decoded = server.decode(server.parse(buf, server_ctx), server_ctx)
    return payload, new, decoded


def stc_bytes(decoded: torch.Tensor, n_mu: int) -> int:
    pos = np.flatnonzero(decoded.numpy())
    k = pos.size
    b = wire.golomb_parameter(k / decoded.numel())
    gaps = np.diff(np.concatenate([[-1], pos]))
    bits = sum(math.ceil(int(g) / 2**b) for g in gaps) + b * k
    return 4 * n_mu + math.ceil(k / 8) + math.ceil(bits / 8)


def expected_bytes(name: str, keys: dict, decoded: torch.Tensor, spec: ModelSpec) -> int:
    """The documented byte formula of each compressor, computed here independently."""
    d, sizes = spec.d, spec.sizes
    w = max(1, math.ceil((d - 1).bit_length() / 8))
    v = 2 if keys.get("value_dtype") == "fp16" else 4
    ratio = keys.get("ratio")
    if name == "topk":
        ratio = ratio or 0.01
        if "budget_bytes" in keys:
            return keys["budget_bytes"] // (v + w) * (v + w)
        if keys.get("per_layer", True):
            return sum(math.ceil(round(ratio * n, 9)) for n in sizes) * (v + w)
        return math.ceil(ratio * d) * (v + w)
    if name == "randk":
        shared = keys.get("shared_seed", True)
        if "budget_bytes" in keys:
            k = (keys["budget_bytes"] - 8) // v if shared else keys["budget_bytes"] // (v + w)
        else:
            k = math.ceil((ratio or 0.01) * d)
        return v * k + 8 if shared else k * (v + w)
    if name == "dgc":
        return int((decoded != 0).sum()) * (v + w)
    if name == "signsgd":
        n_scales = 0 if keys.get("scale") == "none" else (
            len(sizes) if keys.get("per_layer", True) else 1)
        return math.ceil(d / 8) + 4 * n_scales
    if name == "stc":
        return stc_bytes(decoded, len(sizes) if keys.get("per_layer", True) else 1)
    if name == "qsgd":
        s, b = keys.get("levels", 15), keys.get("bucket", 512) or d
        return math.ceil(d * (1 + math.ceil(math.log2(s + 1))) / 8) + 4 * math.ceil(d / b)
    raise AssertionError(name)


# ---------------------------------------------------------------------------- every variant


@pytest.mark.parametrize("name,keys", VARIANTS, ids=IDS)
def test_decode_of_encode_from_bytes(name, keys):
    comp = make(name, **keys)
    x = vec(1)
    payload, _, decoded = wire_trip(comp, x)
    assert decoded.shape == (SPEC.d,) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, comp.decode(payload, ctx()), rtol=0, atol=0)
    assert payload.nbytes == expected_bytes(name, keys, decoded, SPEC)
    assert payload.nbytes < 4 * SPEC.d
    if "budget_bytes" in keys:
        assert payload.nbytes <= keys["budget_bytes"]
    assert float(torch.dot(decoded, x)) > 0  # points the same way as the update


@pytest.mark.parametrize("name,keys", VARIANTS, ids=IDS)
def test_parse_rejects_truncated_and_padded_bytes(name, keys):
    comp = make(name, **keys)
    buf = comp.encode(vec(2), comp.init_state(0), ctx())[0].to_bytes()
    with pytest.raises(ValueError):
        comp.decode(comp.parse(buf[:-1], ctx()), ctx())
    with pytest.raises(ValueError):
        comp.decode(comp.parse(np.concatenate([buf, np.zeros(3, np.uint8)]), ctx()), ctx())


@pytest.mark.parametrize("name,keys", [v for v in VARIANTS if v[0] != "dgc"],
                         ids=[i for i, v in zip(IDS, VARIANTS, strict=True) if v[0] != "dgc"])
def test_error_feedback_invariant(name, keys):
    """decoded + new residual == update + old residual, round after round."""
    comp = make(name, ef=True, **keys)
    assert isinstance(comp, ErrorFeedback)
    state = comp.init_state(3)
    for r in range(4):
        x = vec(10 + r)
        old = state.residual.clone()
        payload, state, decoded, target = comp.compress(x, state, ctx(r, 3))
        torch.testing.assert_close(target, x + old)
        scale = max(float(decoded.abs().max()), float(target.abs().max()))
        torch.testing.assert_close(decoded + state.residual, x + old, rtol=0,
                                   atol=4 * torch.finfo(torch.float32).eps * scale)
        torch.testing.assert_close(comp.decode(comp.parse(payload.to_bytes(), ctx(r, 3)),
                                               ctx(r, 3)), decoded, rtol=0, atol=0)


def test_mlp_byte_counts_of_the_spec():
    """docs/algorithms.md §4: MLP signSGD 24,926 B; top-k 1% with 3-byte indices."""
    x = vec(3, MLP.d)
    assert make("signsgd", MLP).encode(x, None, ctx(spec=MLP))[0].nbytes == 24_926
    k = 1568 + 2 + 400 + 2 + 20 + 1  # ceil(1% of each tensor)
    assert make("topk", MLP).encode(x, None, ctx(spec=MLP))[0].nbytes == k * 7
    assert make("topk", MLP, per_layer=False).encode(x, None, ctx(spec=MLP))[0].nbytes == (
        1993 * 7)
    assert make("randk", MLP).encode(x, None, ctx(spec=MLP))[0].nbytes == 4 * 1993 + 8


def test_resnet18_byte_counts_of_the_spec():
    """d = 11,169,162 in 42 tensors: top-k 1% 781,844 B (24-bit indices), signSGD
    1,396,314 B, QSGD s = 1 2,879,551 B."""
    d = 11_169_162
    spec = ModelSpec(d=d, shapes=[(d - 41,)] + [(1,)] * 41)
    x = vec(4, d)
    c = ctx(spec=spec)
    assert make("topk", spec, per_layer=False).encode(x, None, c)[0].nbytes == 781_844
    assert make("signsgd", spec).encode(x, None, c)[0].nbytes == 1_396_314
    assert make("qsgd", spec, levels=1).encode(x, None, c)[0].nbytes == 2_879_551


# ---------------------------------------------------------------------------- top-k


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.001, 1.0), st.booleans())
def test_topk_keeps_exactly_the_k_largest(seed, ratio, per_layer):
    comp = make("topk", ratio=ratio, per_layer=per_layer)
    x = vec(seed)
    _, _, decoded = wire_trip(comp, x)
    blocks = SPEC.sizes if per_layer else [SPEC.d]
    off = 0
    for n in blocks:
        k = max(1, math.ceil(round(ratio * n, 9)))
        xs, ds = x[off:off + n], decoded[off:off + n]
        kept = torch.nonzero(ds).reshape(-1)
        assert kept.numel() == k
        torch.testing.assert_close(ds[kept], xs[kept], rtol=0, atol=0)
        # every kept magnitude >= every dropped one
        dropped = torch.ones(n, dtype=torch.bool)
        dropped[kept] = False
        if dropped.any():
            assert float(xs[kept].abs().min()) >= float(xs[dropped].abs().max())
        off += n


def test_topk_fp16_values_on_the_wire():
    comp = make("topk", value_dtype="fp16", ratio=0.1)
    payload, _, decoded = wire_trip(comp, vec(5))
    assert payload["values"].dtype == np.float16
    kept = torch.nonzero(decoded).reshape(-1)
    torch.testing.assert_close(decoded[kept], vec(5)[kept], rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------- random-k


def test_randk_shared_seed_sends_values_and_seed_only():
    comp = make("randk", ratio=0.05, scaled=False)
    k = math.ceil(0.05 * SPEC.d)
    x = vec(6)
    payload, _, decoded = wire_trip(comp, x, c=ctx(7, 2))
    assert list(payload.fields) == ["values", "seed"] and payload.nbytes == 4 * k + 8
    kept = torch.nonzero(decoded).reshape(-1)
    assert kept.numel() == k
    torch.testing.assert_close(decoded[kept], x[kept], rtol=0, atol=0)
    # another round or client draws another subset
    _, _, other = wire_trip(comp, x, c=ctx(8, 2))
    assert not torch.equal(torch.nonzero(other).reshape(-1), kept)


def test_randk_scaled_is_unbiased():
    comp = make("randk", ratio=0.1)
    x = vec(7)[:SPEC.d]
    draws = 3000
    total = torch.zeros(SPEC.d)
    for r in range(draws):
        total += comp.decode(comp.encode(x, None, ctx(r))[0], ctx(r))
    mean = total / draws
    # per coordinate: x_j (d/k) Bernoulli(k/d): std |x_j| sqrt(d/k - 1)
    k = math.ceil(0.1 * SPEC.d)
    se = x.abs() * math.sqrt(SPEC.d / k - 1) / math.sqrt(draws)
    assert bool(((mean - x).abs() <= 5 * se + 1e-6).all())


# ---------------------------------------------------------------------------- signSGD


@pytest.mark.parametrize("per_layer", [True, False])
def test_sign_payload_magnitudes_equal_the_l1_scale(per_layer):
    comp = make("signsgd", per_layer=per_layer)
    x = vec(8)
    x[:40] = 0.0  # exact zeros get a random sign
    payload, _, decoded = wire_trip(comp, x)
    blocks = SPEC.sizes if per_layer else [SPEC.d]
    off = 0
    for i, n in enumerate(blocks):
        scale = float(x[off:off + n].abs().sum()) / n
        assert payload["scales"][i] == pytest.approx(scale, rel=1e-6)
        torch.testing.assert_close(decoded[off:off + n].abs(),
                                   torch.full((n,), float(payload["scales"][i])))
        off += n
    nz = x != 0
    assert torch.equal(torch.sign(decoded[nz]), torch.sign(x[nz]))
    assert {1.0, -1.0} <= set(torch.sign(decoded[:40]).tolist())


def test_sign_none_is_bare_signs():
    payload, _, decoded = wire_trip(make("signsgd", scale="none"), vec(9))
    assert list(payload.fields) == ["signs"]
    assert torch.equal(decoded, torch.sign(vec(9)))


# ---------------------------------------------------------------------------- STC


@pytest.mark.parametrize("per_layer", [True, False])
def test_stc_is_sparse_ternary_with_the_mean_magnitude(per_layer):
    ratio = 0.05
    comp = make("stc", ratio=ratio, per_layer=per_layer)
    x = vec(11)
    payload, _, decoded = wire_trip(comp, x)
    blocks = SPEC.sizes if per_layer else [SPEC.d]
    off = 0
    for i, n in enumerate(blocks):
        k = max(1, math.ceil(round(ratio * n, 9)))
        xs, ds = x[off:off + n], decoded[off:off + n]
        top = torch.topk(xs.abs(), k).indices
        mu = float(xs[top].abs().mean())
        assert payload["mu"][i] == pytest.approx(mu, rel=1e-6)
        expect = torch.zeros(n)
        expect[top] = torch.sign(xs[top]) * float(payload["mu"][i])
        torch.testing.assert_close(ds, expect, rtol=0, atol=0)
        off += n
    assert payload.nbytes == stc_bytes(decoded, len(blocks))


# ---------------------------------------------------------------------------- QSGD


@pytest.mark.parametrize("levels,bucket", [(1, 0), (4, 8)])
def test_qsgd_is_unbiased_with_the_stated_variance(levels, bucket):
    spec = ModelSpec(d=24, shapes=[(24,)])
    comp = make("qsgd", spec, levels=levels, bucket=bucket)
    x = vec(12, 24)
    draws = 4000
    samples = torch.stack([comp.decode(comp.parse(
        comp.encode(x, None, ctx(r, spec=spec))[0].to_bytes(), ctx(spec=spec)), ctx(spec=spec))
        for r in range(draws)])
    b = bucket or 24
    norms = torch.repeat_interleave(x.reshape(-1, b).norm(dim=1), b)
    r = levels * x.abs() / norms
    p = r - torch.floor(r)
    std = norms / levels * torch.sqrt(p * (1 - p))  # Var of one draw, per coordinate
    assert bool(((samples.mean(0) - x).abs() <= 5 * std / math.sqrt(draws) + 1e-6).all())
    # every value is norm * sign * l / s with an integer level in {floor(r), floor(r) + 1}
    level = samples.abs() * levels / norms
    torch.testing.assert_close(level, level.round(), rtol=0, atol=1e-4)
    assert bool((level.round() - torch.floor(r) >= 0).all())
    assert bool((level.round() - torch.floor(r) <= 1).all())


# ---------------------------------------------------------------------------- DGC


def test_dgc_warmup_schedule_values():
    """W = 4 at ratio 0.001: 75%, 93.75%, 98.4%, 99.6%, then 99.9% sparsity."""
    got = [warmup_ratio(0.001, e, 4) for e in range(7)]
    want = [10 ** (-3 * (e + 1) / 5) for e in range(4)] + [0.001] * 3
    assert got == pytest.approx(want, rel=1e-12)
    assert [round(100 * (1 - g), 1) for g in got[:5]] == [74.9, 93.7, 98.4, 99.6, 99.9]
    assert warmup_ratio(0.01, 0, 0) == 0.01


def test_dgc_sends_the_warmup_counts_per_round():
    comp = make("dgc", ratio=0.01, warmup_rounds=3, sample_ratio=1.0)
    state = comp.init_state(0)
    for r in range(5):
        p = 0.01 ** ((r + 1) / 4) if r < 3 else 0.01
        want = sum(max(1, math.ceil(round(p * n, 9))) for n in SPEC.sizes)
        payload, state, decoded = wire_trip(comp, vec(20 + r), state, ctx(r))
        assert int((decoded != 0).sum()) == want == len(payload["values"])


def reference_dgc(gs, m, nesterov, masking, k_per_tensor):
    """DGC's memory rule written out per entry, exact top-k (sample_ratio = 1)."""
    u = torch.zeros(SPEC.d)
    v = torch.zeros(SPEC.d)
    sent = []
    for g in gs:
        if nesterov:
            u = (u + g) * m
            v = v + u + g
        else:
            u = m * u + g
            v = v + u
        out = torch.zeros(SPEC.d)
        off = 0
        for n, k in zip(SPEC.sizes, k_per_tensor, strict=True):
            top = torch.topk(v[off:off + n].abs(), k).indices + off
            out[top] = v[top]
            v[top] = 0
            if masking:
                u[top] = 0
            off += n
        sent.append(out)
    return sent


@pytest.mark.parametrize("m,nesterov,masking", [(0.0, False, True), (0.9, False, True),
                                                (0.9, True, True), (0.5, False, False)])
def test_dgc_momentum_correction_and_factor_masking(m, nesterov, masking):
    comp = make("dgc", ratio=0.02, momentum=m, nesterov=nesterov, momentum_masking=masking,
                sample_ratio=1.0)
    gs = [vec(30 + r) for r in range(4)]
    k = [max(1, math.ceil(round(0.02 * n, 9))) for n in SPEC.sizes]
    want = reference_dgc(gs, m, nesterov, masking, k)
    state = comp.init_state(0)
    for r, g in enumerate(gs):
        old_v = state.v.clone()
        _, state, decoded = wire_trip(comp, g, state, ctx(r))
        torch.testing.assert_close(decoded, want[r], rtol=1e-6, atol=1e-6)
        if m == 0:  # v is exactly error feedback: sent + new v == old v + g
            torch.testing.assert_close(decoded + state.v, old_v + g, rtol=0, atol=1e-6)


def test_dgc_sampled_threshold_sends_close_to_k_large_entries():
    spec = ModelSpec(d=200_000, shapes=[(200_000,)])
    comp = make("dgc", spec, ratio=0.001, sample_ratio=0.01)
    x = vec(40, spec.d)
    _, state, decoded = wire_trip(comp, x, c=ctx(spec=spec))
    n = int((decoded != 0).sum())
    assert 0.8 * 200 <= n <= 200
    sorted_mag = x.abs().sort(descending=True).values
    assert float(decoded[decoded != 0].abs().min()) >= float(sorted_mag[400])
    torch.testing.assert_close(decoded + state.v, x, rtol=0, atol=0)


def test_dgc_local_clipping_caps_each_tensor():
    comp = make("dgc", ratio=0.01, clip_norm=0.5, sample_ratio=1.0)
    g = 10 * vec(41)
    payload, state, decoded, target = comp.compress(g, comp.init_state(0), ctx())
    off = 0
    for n in SPEC.sizes:
        block = g[off:off + n]
        clipped = block * min(1.0, 0.5 / (float(block.norm()) + 1e-6))
        torch.testing.assert_close(target[off:off + n], clipped)
        off += n
    torch.testing.assert_close(decoded + state.v, target, rtol=0, atol=0)


def test_dgc_efficiency_target_includes_the_residual():
    comp = make("dgc", ratio=0.05, sample_ratio=1.0)
    state = comp.init_state(0)
    _, state, _, _ = comp.compress(vec(42), state, ctx(0))
    v_before = state.v.clone()
    _, _, decoded, target = comp.compress(vec(43), state, ctx(1))
    torch.testing.assert_close(target, v_before + vec(43))


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("table,key", [
    ({"name": "topk", "ratio": 0.0}, "compressor.ratio"),
    ({"name": "topk", "ratio": 1.5}, "compressor.ratio"),
    ({"name": "randk", "budget_bytes": -1}, "compressor.budget_bytes"),
    ({"name": "stc", "ratio": -0.1}, "compressor.ratio"),
    ({"name": "qsgd", "levels": 0}, "compressor.levels"),
    ({"name": "qsgd", "bucket": -5}, "compressor.bucket"),
    ({"name": "dgc", "momentum": 1.0}, "compressor.momentum"),
    ({"name": "dgc", "clip_norm": -1.0}, "compressor.clip_norm"),
    ({"name": "dgc", "warmup_rounds": -1}, "compressor.warmup_rounds"),
    ({"name": "dgc", "sample_ratio": 0.0}, "compressor.sample_ratio"),
    ({"name": "dgc", "ef": True}, "compressor.ef"),
    ({"name": "dgc", "downlink": "same"}, "compressor.downlink"),
    ({"name": "signsgd", "scale": "l2"}, "compressor.scale"),
    ({"name": "topk", "levels": 3}, "compressor.levels"),
    ({"name": "stc", "budget_bytes": 100}, "compressor.budget_bytes"),
])
def test_config_errors_name_the_key(table, key):
    with pytest.raises(ConfigError) as err:
        config.from_dict({"compressor": table})
    assert err.value.key == key


@pytest.mark.parametrize("name,keys", [("topk", {"budget_bytes": 20}),
                                       ("randk", {"budget_bytes": 11}),
                                       ("dgc", {"budget_bytes": 23})])
def test_too_small_budget_is_a_config_error(name, keys):
    with pytest.raises(ConfigError) as err:
        make(name, **keys)
    assert err.value.key == "compressor.budget_bytes"


def test_majority_aggregation_is_a_server_option():
    cfg = config.from_dict({"server": {"aggregation": "majority"}})
    assert cfg.server.aggregation == "majority"
    with pytest.raises(ConfigError):
        config.from_dict({"server": {"aggregation": "median"}})


def test_config_round_trips_through_toml():
    cfg = config.from_dict({"compressor": {"name": "dgc", "ratio": 0.01, "momentum": 0.9,
                                           "value_dtype": "fp16"}})
    assert config.loads(config.to_toml(cfg)) == cfg


# ---------------------------------------------------------------------------- downlink


def test_stc_updown_replicas_reconstruct_the_server_model():
    """STC up/down (ef = true, downlink = same): the server compresses its step with a
    server residual only (not a second EF residual); a replica rebuilt from the broadcast
    bytes equals the server model bit for bit, round after round."""
    cfg = config.from_dict({"compressor": {"name": "stc", "ratio": 0.05, "ef": True,
                                           "downlink": "same"}})
    down = downlink.build(cfg.compressor.downlink, SPEC, 5,
                          lambda: compress.build(cfg.compressor, SPEC))
    bare = make("stc", ratio=0.05)
    params = vec(50)
    replica = params.clone()
    residual = torch.zeros(SPEC.d)
    for r in range(5):
        buf = down.server_payload(params, r).to_bytes()
        down.client_apply(down.parse(buf, r), replica, r)
        assert torch.equal(replica, params)
        step = 0.1 * vec(60 + r)
        before = params.clone()
        down.server_step(params, step, r)
        want = bare.decode(bare.encode(step + residual, None, ctx(r, -1))[0], ctx(r, -1))
        torch.testing.assert_close(params - before, want, rtol=0, atol=1e-6)
        residual = step + residual - want
        torch.testing.assert_close(down.residual, residual, rtol=0, atol=1e-6)
