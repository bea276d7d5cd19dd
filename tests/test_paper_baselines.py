"""The 3SFC paper's baselines as its authors' code runs them (topk_3sfc, signsgd_3sfc,
stc_3sfc), pinned against the code's formulas (Soptq/iccv23-3sfc, fl_devices.py) written
out here on dicts of hand-sized tensors, over several rounds of error feedback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmpi import compress, config
from fedmpi.compress import Context, ModelSpec, wire
from fedmpi.compress.stc3sfc import pick_count
from fedmpi.compress.topk3sfc import budget_share, code_counts

SHAPES = [(6, 5), (6,), (3, 6), (3,)]
SPEC = ModelSpec(d=sum(math.prod(s) for s in SHAPES), shapes=SHAPES)  # d = 57


def make(name: str, spec: ModelSpec = SPEC, **keys):
    cfg = config.from_dict({"compressor": {"name": name, **keys}})
    return compress.build(cfg.compressor, spec)


def ctx(round_: int = 0, spec: ModelSpec = SPEC) -> Context:
    return Context(round=round_, client=0, seed=3, spec=spec)


def split(flat: torch.Tensor, spec: ModelSpec = SPEC) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for i, (shape, n) in enumerate(zip(spec.shapes, spec.sizes, strict=True)):
        out[f"t{i}"] = flat[off:off + n].reshape(shape).clone()
        off += n
    return out


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten() for v in tensors.values()])


def update(seed: int, zeros: int = 0, spec: ModelSpec = SPEC) -> torch.Tensor:
    """A random update whose first ``zeros`` entries (a 'dead pixel' column) are 0."""
    u = torch.randn(spec.d, generator=torch.Generator().manual_seed(seed))
    u[:zeros] = 0.0
    return u


# ---------------------------------------------------------------- the code's formulas


def code_sign(dw: dict, residual: dict) -> dict:
    """aggregate_sign_compression for one client: the message; the residual is updated."""
    scale = torch.norm(flat(dw)) / torch.norm(torch.cat([torch.sign(v.flatten())
                                                         for v in residual.values()]))
    sent = {k: torch.sign(v) * scale for k, v in residual.items()}
    for k in residual:
        residual[k] = residual[k] - sent[k]
    return sent


def code_stc(residual: dict, p: float) -> dict:
    """aggregate_stc_compression for one client."""
    sent = {}
    for key, value in residual.items():
        n_pick = max(int(value.numel() * p - (value.numel() * (1 - p)) / 31), 1)
        topk_v, topk_i = torch.topk(torch.abs(value.flatten()), n_pick)
        rest = torch.abs(value.flatten()) < topk_v[-1]
        mean = torch.mean(value.flatten()[rest])
        out = torch.zeros_like(value.flatten())
        out[topk_i] = value.flatten()[topk_i]
        out[rest] = torch.abs(mean) * torch.sign(value.flatten()[rest])
        sent[key] = out.reshape(value.shape)
    for k in residual:
        residual[k] = residual[k] - sent[k]
    return sent


def code_topk(residual: dict, p: float) -> dict:
    """compute_topk / aggregate_topk_compression for one client."""
    sent = {}
    for key, value in residual.items():
        n_pick = max(int(value.numel() * p), 1)
        _, topk_i = torch.topk(torch.abs(value.flatten()), n_pick)
        out = torch.zeros_like(value.flatten())
        out[topk_i] = value.flatten()[topk_i]
        sent[key] = out.reshape(value.shape)
    for k in residual:
        residual[k] = residual[k] - sent[k]
    return sent


def run_both(comp, code, rounds: int = 4, zeros: int = 0):
    """Rounds of EF: fedmpi's compressor (through its wire bytes) beside the code."""
    state = comp.init_state(0)
    residual = split(torch.zeros(SPEC.d))
    for r in range(rounds):
        dw = update(10 + r, zeros)
        for k, v in split(dw).items():  # the code: dW_residual += dW before compressing
            residual[k] = residual[k] + v
        sent = flat(code(split(dw), residual))
        payload, state, decoded, target = comp.compress(dw, state, ctx(r))
        wire_decoded = comp.decode(comp.parse(payload.to_bytes(), ctx(r)), ctx(r))
        torch.testing.assert_close(wire_decoded, decoded, rtol=0, atol=0)
        torch.testing.assert_close(decoded, sent, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state.residual, flat(residual), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state.residual, target - decoded, rtol=0, atol=0)
        yield payload, decoded, target


# ---------------------------------------------------------------- signsgd_3sfc


@pytest.mark.parametrize("zeros", [0, 5])
def test_signsgd_3sfc_is_the_codes_sign_compression(zeros):
    comp = make("signsgd_3sfc")
    assert comp.name == "ef(signsgd_3sfc)"  # EF is the default, as in the code
    for payload, decoded, _ in run_both(comp, lambda dw, res: code_sign(dw, res),
                                        zeros=zeros):
        # one global scale ||dW|| / ||sign(r)|| over the whole model, not per tensor
        assert len(payload["scale"]) == 1
        nonzero = decoded[decoded != 0].abs()
        assert torch.allclose(nonzero, nonzero[0].expand_as(nonzero))
        if zeros:  # sign(0) = 0 travels: the dead entries are sent as 0, in base 3
            assert bool((decoded[:zeros] == 0).all())
            assert int(payload["mode"][0]) == wire.TERNARY_TRITS
            assert payload.nbytes == 4 + 1 + math.ceil(SPEC.d / 5)
        else:
            assert int(payload["mode"][0]) == wire.TERNARY_BITS
            assert payload.nbytes == 4 + 1 + math.ceil(SPEC.d / 8)


def test_signsgd_3sfc_scale_uses_this_rounds_update_not_the_residual():
    comp = make("signsgd_3sfc")
    state = comp.init_state(0)
    _, state, _, _ = comp.compress(update(1), state, ctx(0))
    dw = update(2)
    _, state, decoded, target = comp.compress(dw, state, ctx(1))
    expected = float(dw.norm()) / math.sqrt(int((target != 0).sum()))
    assert float(decoded.abs().max()) == pytest.approx(expected, rel=1e-6)
    assert float(target.norm()) != pytest.approx(float(dw.norm()), rel=1e-3)


def test_signsgd_3sfc_without_ef_scales_by_its_own_norm():
    comp = make("signsgd_3sfc", ef=False)
    u = update(4, zeros=3)
    payload, _ = comp.encode(u, None, ctx())
    d = comp.decode(payload, ctx())
    assert float(d.abs().max()) == pytest.approx(float(u.norm()) / math.sqrt(SPEC.d - 3),
                                                 rel=1e-6)


# ---------------------------------------------------------------- stc_3sfc


def test_stc_3sfc_pick_count_is_the_codes():
    assert [pick_count(n, 0.01) for n in (1, 10, 200, 40_000, 156_800)] == [1] * 5
    assert pick_count(100, 0.5) == max(int(100 * 0.5 - (100 * 0.5) / 31), 1) == 48
    assert pick_count(64, 0.25) == 14  # 16 - 48 / 31 = 14.45


@pytest.mark.parametrize("ratio,zeros", [(0.01, 0), (0.01, 4), (0.3, 0), (0.3, 6)])
def test_stc_3sfc_is_the_codes_stc(ratio, zeros):
    comp = make("stc_3sfc", ratio=ratio)
    counts = [pick_count(n, ratio) for n in SPEC.sizes]
    w = wire.index_width(SPEC.d)
    for payload, decoded, target in run_both(comp, lambda dw, res: code_stc(res, ratio),
                                             zeros=zeros):
        fixed = 4 * len(SHAPES) + (4 + w) * sum(counts) + 1
        trits = int(payload["mode"][0]) == wire.TERNARY_TRITS
        assert payload.nbytes == fixed + (math.ceil(SPEC.d / 5) if trits
                                          else math.ceil(SPEC.d / 8))
        # the picked entries travel exactly
        idx = wire.unpack_indices(payload["indices"], SPEC.d)
        assert torch.equal(decoded[idx], target[idx])


def test_stc_3sfc_one_pick_per_tensor_and_a_signed_mean_elsewhere():
    comp = make("stc_3sfc", ef=False)
    u = torch.tensor([3.0, -1.0, 0.5, 0.0] + [0.25] * (SPEC.d - 4))
    payload, _ = comp.encode(u, None, ctx())
    d = comp.decode(payload, ctx())
    first = u[:30]  # tensor 0: n_pick = 1 picks 3.0; the rest: |mean of the others|
    mu = abs(float(first[1:].mean()))
    assert float(d[0]) == 3.0
    assert float(d[1]) == pytest.approx(-mu) and float(d[2]) == pytest.approx(mu)
    assert float(d[3]) == 0.0  # sign(0) = 0
    assert int(payload["mode"][0]) == wire.TERNARY_TRITS


def test_stc_3sfc_ties_with_the_smallest_pick_are_sent_as_zero():
    comp = make("stc_3sfc", ef=False)
    u = torch.ones(SPEC.d)  # every |r| ties: one pick per tensor, nothing below it
    d = comp.decode(comp.encode(u, None, ctx())[0], ctx())
    assert int((d != 0).sum()) == len(SHAPES)


# ---------------------------------------------------------------- topk_3sfc


def test_topk_3sfc_is_the_codes_topk():
    comp = make("topk_3sfc", ratio=0.1)
    assert comp.inner.counts == code_counts(SPEC.sizes, 0.1) == [3, 1, 1, 1]
    for payload, _, _ in run_both(comp, lambda dw, res: code_topk(res, 0.1)):
        assert payload.nbytes == sum(comp.inner.counts) * (4 + wire.index_width(SPEC.d))


def test_topk_3sfc_at_3sfcs_bytes_on_the_mnist_mlp():
    shapes = [(200, 784), (200,), (200, 200), (200,), (10, 200), (10,)]
    spec = ModelSpec(d=199_210, shapes=shapes)
    comp = make("topk_3sfc", spec, budget_bytes=3180, ef=False)  # 4 (M (784 + 10) + 1)
    assert comp.counts == code_counts(spec.sizes, comp.share)
    assert comp.k * 7 <= 3180 < (comp.k + 1) * 7 + 7
    assert sum(code_counts(spec.sizes, comp.share * 1.001)) * 7 > 3180  # the largest p
    payload, _ = comp.encode(update(0, spec=spec), None, ctx(spec=spec))
    assert payload.nbytes == comp.k * 7 <= 3180
    # a budget below one entry per tensor: the code's minimum of one each
    assert sum(code_counts(spec.sizes, budget_share(spec.sizes, 1, 7))) == len(shapes)


def test_paper_baselines_default_to_error_feedback_and_are_registered():
    for name in ("topk_3sfc", "signsgd_3sfc", "stc_3sfc"):
        assert name in compress.REGISTRY
        assert make(name).name == f"ef({name})"
        doc = compress.REGISTRY[name].__module__
        assert "Bytes:" in __import__(doc, fromlist=["x"]).__doc__


def test_ternary_round_trip_and_sizes():
    rng = np.random.default_rng(0)
    for n in (1, 4, 5, 6, 57, 1001):
        s = rng.integers(-1, 2, size=n)
        mode, buf = wire.pack_ternary(s)
        assert np.array_equal(wire.unpack_ternary(mode, buf, n), s.astype(np.float32))
        assert buf.size == wire.ternary_size(n, mode)
        nz = np.where(s == 0, 1, s)
        mode, buf = wire.pack_ternary(nz)
        assert mode == wire.TERNARY_BITS and buf.size == (n + 7) // 8
        assert np.array_equal(wire.unpack_ternary(mode, buf, n), nz.astype(np.float32))
    with pytest.raises(ValueError):
        wire.unpack_ternary(wire.TERNARY_TRITS, np.full(2, 250, dtype=np.uint8), 10)
