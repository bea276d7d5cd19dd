"""Sharpness measures: power iteration, deflation, Hutchinson trace, SAM sharpness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmpi import sharpness
from fedmpi.config import ConfigError, EvalConfig, load
from tests.conftest import SMALL, run_and_open


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny double-backprop problems: threads only contend on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rotation(d: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return torch.from_numpy(q)


def quadratic(eigs: list[float], rotate: bool, seed: int = 0) -> tuple[sharpness.Objective,
                                                                      torch.Tensor]:
    """L(w) = 0.5 w'Aw + b'w over two parameter tensors, summed from two "batches"."""
    d = len(eigs)
    q = _rotation(d, seed) if rotate else torch.eye(d, dtype=torch.float64)
    a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    rng = np.random.default_rng(seed + 1)
    b = torch.from_numpy(rng.standard_normal(d))
    w1 = torch.tensor(rng.standard_normal(d - 4).reshape(-1, 1), requires_grad=True)
    w2 = torch.tensor(rng.standard_normal(4), requires_grad=True)
    split = torch.from_numpy(rng.uniform(size=(d, d)))
    a1 = a * split  # A = A1 + A2: the Hessian is the sum over terms
    a2 = a - a1

    def terms():
        w = torch.cat([w1.reshape(-1), w2])
        yield 0.5 * w @ a1 @ w + b @ w
        yield 0.5 * w @ a2 @ w

    return sharpness.Objective([w1, w2], terms), a


EIGS = [10.0, 7.0, 5.0, 3.0, 2.5, 2.0, 1.5, 1.2, 1.0, 0.9, 0.5, 0.3, 0.2, 0.1, 0.05, -0.02]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_power_iteration_recovers_top_eigenvalues_of_a_quadratic():
    obj, a = quadratic(EIGS, rotate=True)
    eig = sharpness.top_eigenvalues(obj, k=3, max_iter=1000, tol=1e-7, generator=_gen())
    assert eig.values == pytest.approx(EIGS[:3], rel=1e-3)
    for lam, v in zip(eig.values, eig.vectors, strict=True):  # and they are eigenvectors
        assert torch.allclose(a @ v, lam * v, atol=1e-3 * abs(lam))
    assert all(1 < n < 1000 for n in eig.iterations)


def test_eigenvalues_come_largest_magnitude_first_even_unconverged():
    obj, _ = quadratic([1.0, 0.999, 0.998, 0.1], rotate=True)
    # with this start, two iterations find the Rayleigh quotients 0.987, 0.998, 0.980
    eig = sharpness.top_eigenvalues(obj, k=3, max_iter=2, tol=1e-12, generator=_gen(0))
    mags = [abs(v) for v in eig.values]
    assert mags == sorted(mags, reverse=True)
    assert eig.iterations == [2, 2, 2]


def test_power_iteration_stops_at_max_iter_and_on_tolerance():
    obj, _ = quadratic([1.0, 0.999, 0.5, 0.1], rotate=True)  # tiny gap: slow convergence
    assert sharpness.top_eigenvalues(obj, max_iter=7, tol=1e-12,
                                     generator=_gen()).iterations == [7]
    obj, _ = quadratic([10.0, 0.1, 0.05, 0.01], rotate=True)  # big gap: fast
    assert sharpness.top_eigenvalues(obj, max_iter=500, tol=1e-3,
                                     generator=_gen()).iterations[0] < 10


def test_eigenvalue_residual_bounds_its_distance_to_the_spectrum():
    """The reported error of an unconverged lambda: some eigenvalue of A lies within
    ||A v - lambda v|| of it; a converged one has a tiny residual."""
    obj, a = quadratic([1.0, 0.95, 0.5, 0.1, -0.3, 0.2, 0.4, 0.05], rotate=True, seed=2)
    true = torch.linalg.eigvalsh(a)
    for iters in (1, 3, 10):
        eig = sharpness.top_eigenvalues(obj, max_iter=iters, tol=1e-12, generator=_gen(1))
        lam, r = eig.values[0], eig.residuals[0]
        assert r > 0 and float((true - lam).abs().min()) <= r + 1e-12
    done = sharpness.top_eigenvalues(obj, max_iter=5000, tol=1e-12, generator=_gen(1))
    assert done.values[0] == pytest.approx(1.0, rel=1e-6) and done.residuals[0] < 1e-3


def test_hutchinson_stderr_rule_stops_on_its_own_standard_error():
    obj, a = quadratic(EIGS, rotate=True)
    for tol in (0.5, 0.2, 0.1):
        tr = sharpness.hutchinson_trace(obj, max_samples=400, tol=tol, generator=_gen(4),
                                        rule="stderr")
        assert sharpness.MIN_PROBES <= tr.samples < 400
        assert tr.stderr <= tol * abs(tr.value)
        if tr.samples > sharpness.MIN_PROBES:  # one probe fewer had not reached the target
            fewer = sharpness.hutchinson_trace(obj, max_samples=tr.samples - 1, tol=0.0,
                                               generator=_gen(4), rule="stderr")
            assert fewer.stderr > tol * abs(fewer.value)
    obj, a = quadratic(EIGS, rotate=False)  # z'Az = tr A exactly: stderr 0 at once
    tr = sharpness.hutchinson_trace(obj, max_samples=50, tol=1e-3, generator=_gen(3),
                                    rule="stderr")
    assert tr.samples == sharpness.MIN_PROBES and tr.stderr == 0.0
    capped = sharpness.hutchinson_trace(obj, max_samples=4, tol=1e-3, generator=_gen(3),
                                        rule="stderr")
    assert capped.samples == 4


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian():
    obj, a = quadratic(EIGS, rotate=False)
    tr = sharpness.hutchinson_trace(obj, max_samples=50, tol=1e-3, generator=_gen(3))
    assert tr.value == pytest.approx(float(torch.trace(a)), rel=1e-3)
    assert tr.samples == 2  # z'Az = tr A for every Rademacher z: stops at once


def test_hutchinson_trace_of_a_rotated_hessian_within_its_standard_error():
    obj, a = quadratic(EIGS, rotate=True)
    m = 400
    tr = sharpness.hutchinson_trace(obj, max_samples=m, tol=0.0, generator=_gen(4))
    assert tr.samples == m
    off = a - torch.diag(torch.diag(a))
    std = math.sqrt(2 * float((off ** 2).sum()) / m)  # Var z'Az = 2 sum_{i != j} A_ij^2
    assert abs(tr.value - float(torch.trace(a))) < 4 * std
    assert tr.stderr == pytest.approx(std, rel=0.3)


def test_sam_sharpness_of_linear_least_squares_matches_closed_form():
    rng = np.random.default_rng(5)
    n, d = 64, 6
    x = torch.from_numpy(rng.standard_normal((n, d)))
    y = torch.from_numpy(rng.standard_normal(n))
    w = torch.tensor(rng.standard_normal(d), requires_grad=True)
    b = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)

    def terms():
        for i in range(0, n, 20):
            r = x[i:i + 20] @ w + b - y[i:i + 20]
            yield 0.5 * (r ** 2).sum() / n

    obj = sharpness.Objective([w, b], terms)
    rhos = [0.01, 0.05, 0.1, 1.0]
    base, sam = obj.loss(), sharpness.sam_sharpness(obj, rhos)[1]
    # closed form: L(w + rho u) - L(w) = rho ||g|| + rho^2 / 2 u'Hu, u = g / ||g||
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    wa = torch.cat([w.detach(), b.detach()])
    g = xa.T @ (xa @ wa - y) / n
    h = xa.T @ xa / n
    u = g / g.norm()
    want = [rho * float(g.norm()) + rho ** 2 / 2 * float(u @ h @ u) for rho in rhos]
    assert sam == pytest.approx(want, rel=1e-9)
    assert base == pytest.approx(float(0.5 * ((xa @ wa - y) ** 2).mean()), rel=1e-12)
    assert torch.equal(torch.cat([w.detach(), b.detach()]), wa)  # weights restored


def test_sam_sharpness_of_softmax_regression_matches_closed_form():
    torch.manual_seed(0)
    n, d, c = 50, 5, 3
    model = torch.nn.Linear(d, c).double()
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, c, (n,))
    obj = sharpness.model_objective(model, x, y, batch_size=16)
    rhos = [0.05, 0.5]
    before = [p.detach().clone() for p in model.parameters()]
    base, sam = sharpness.sam_sharpness(obj, rhos)
    # closed form: grad_W = (P - Y)' X / n, grad_b = mean(P - Y); loss by log-sum-exp
    w, b = (p.detach().numpy() for p in model.parameters())
    xs, onehot = x.numpy(), np.eye(c)[y.numpy()]

    def loss(w_, b_):
        z = xs @ w_.T + b_
        zmax = z.max(1, keepdims=True)
        lse = np.log(np.exp(z - zmax).sum(1)) + zmax[:, 0]
        return float(np.mean(lse - (z * onehot).sum(1)))

    z = xs @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    gw, gb = (p - onehot).T @ xs / n, (p - onehot).mean(0)
    norm = math.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    want = [loss(w + r * gw / norm, b + r * gb / norm) - loss(w, b) for r in rhos]
    assert base == pytest.approx(loss(w, b), rel=1e-12)
    assert sam == pytest.approx(want, rel=1e-9)
    assert all(torch.equal(p0, p1) for p0, p1 in zip(before, model.parameters(), strict=True))


def test_measure_matches_the_exact_hessian_of_a_small_mlp():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model.double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def full_loss(v):
        out, off = [], 0
        for p in params:
            out.append(v[off:off + p.numel()].view_as(p))
            off += p.numel()
        h = torch.tanh(x @ out[0].T + out[1])
        return F.cross_entropy(h @ out[2].T + out[3], y)

    hess = torch.autograd.functional.hessian(full_loss, flat)
    evals = torch.linalg.eigvalsh(hess)
    top = sorted(evals.tolist(), key=abs, reverse=True)
    ev = EvalConfig(batch_size=16, sharpness_topk=2, sharpness_iters=2000, sharpness_tol=1e-9,
                    sharpness_trace_samples=300, sharpness_trace_tol=1e-9,
                    sharpness_rho=(0.05,))
    sub = sharpness.Subset(x, y)
    row = sharpness.measure(model, sub, None, ev, seed=0, round_=0)
    assert row["sharpness_lmax"] == pytest.approx(top[0], rel=1e-3)
    assert 1 < row["sharpness_lmax_iters"] <= 2000
    assert min(abs(e - row["sharpness_lmax"]) for e in evals.tolist()) <= (
        row["sharpness_lmax_resid"] + 1e-9)
    assert row["sharpness_trace_probes"] == 300  # tol 1e-9: every probe
    assert row["sharpness_eig2"] == pytest.approx(top[1], rel=1e-3)
    assert abs(row["sharpness_trace"] - float(evals.sum())) < 4 * row["sharpness_trace_stderr"]
    assert row["sharpness_loss"] == pytest.approx(float(full_loss(flat)), rel=1e-12)
    assert row["sharpness_sam"] > 0
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), flat)
    assert model.training  # mode restored


def test_fixed_subset_is_seeded_and_fixed():
    x = np.arange(1000, dtype=np.uint8).reshape(100, 10)
    y = np.arange(100)
    a = sharpness.fixed_subset(x, y, 30, seed=3)
    b = sharpness.fixed_subset(x, y, 30, seed=3)
    c = sharpness.fixed_subset(x, y, 30, seed=4)
    assert torch.equal(a.y, b.y) and not torch.equal(a.y, c.y)
    assert len(set(a.y.tolist())) == 30 and torch.equal(a.x, torch.from_numpy(x[a.y.numpy()]))
    assert len(sharpness.fixed_subset(x, y, 500, seed=3).y) == 100


@pytest.mark.parametrize("item,key", [
    ("eval.sharpness_topk=6", "eval.sharpness_topk"),
    ("eval.sharpness_rho=[]", "eval.sharpness_rho"),
    ("eval.sharpness_rho=[0.1, -1.0]", "eval.sharpness_rho"),
    ("eval.sharpness_tol=0", "eval.sharpness_tol"),
    ("eval.sharpness_samples=0", "eval.sharpness_samples"),
])
def test_bad_sharpness_config_names_the_key(item, key):
    with pytest.raises(ConfigError) as err:
        load(None, [item])
    assert err.value.key == key


def test_train_writes_sharpness_every_n_rounds_and_at_the_end(tmp_path):
    run = run_and_open(tmp_path, 2, [*SMALL, "--set", "eval.sharpness_every=2",
                                     "--set", "eval.sharpness_samples=200",
                                     "--set", "eval.sharpness_topk=2",
                                     "--set", "eval.sharpness_rho=[0.01, 0.1]",
                                     "--set", "eval.sharpness_iters=200"])
    r = run.rounds
    done = ~np.isnan(r["sharpness_lmax"])
    assert done.tolist() == [False, True, True]  # round 2 (every 2) and round 3 (the last)
    for name in ("sharpness_lmax", "sharpness_eig2", "sharpness_trace", "sharpness_loss",
                 "sharpness_sam", "sharpness_sam2", "time_sharpness", "sharpness_lmax_resid",
                 "sharpness_trace_stderr"):
        assert np.all(np.isfinite(r[name][done])), name
        assert np.all(np.isnan(r[name][~done])), name
    for name in ("sharpness_lmax_iters", "sharpness_trace_probes"):
        assert np.all(r[name][done] >= 1) and np.all(r[name][~done] == 0), name
    assert np.all(r["sharpness_lmax"][done] >= np.abs(r["sharpness_eig2"][done]))
    assert np.all(r["sharpness_sam2"][done] > r["sharpness_sam"][done])
    assert np.all(np.isnan(r["sharpness_eig3"])) and np.all(np.isnan(r["sharpness_sam3"]))
