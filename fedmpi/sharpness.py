"""Sharpness of the training loss at a model: top Hessian eigenvalues, trace, SAM sharpness.

The measures used to show that compression sharpens the loss landscape (docs/algorithms.md §5;
FedSynSAM, Gu et al., arXiv 2602.11584, reports "flatter loss landscapes"; FedGloSS,
Caldarola et al., CVPR 2025, reports the top-5 eigenvalues):

* **lambda_max** (and the top k): power iteration with Hessian-vector products
  ``Hv = grad_w <grad_w L(w), v>`` (double backprop, Pearlmutter's trick), as in
  PyHessian (Yao et al. 2020) and ``hessian-eigenthings``: v ~ N(0, I), v /= ||v||;
  repeat u = H v, lambda = v'u, v = u / ||u|| until |delta lambda| / |lambda| < tol or
  ``max_iter`` products. Further eigenvalues by deflation: every iterate is kept
  orthogonal to the eigenvectors already found (H' = H - sum_j lambda_j v_j v_j').
  Its own error: the residual ``r = ||H v - lambda v||`` of the returned Rayleigh
  quotient (unit v): H being symmetric, some eigenvalue lies within r of lambda (Weyl /
  Bauer-Fike); reported with the products spent.
* **trace**: Hutchinson's estimator ``tr H ~ (1/m) sum_j z_j' H z_j`` with Rademacher
  z_j and its standard error ``std(z'Hz) / sqrt(m)``, stopping after ``max_samples``
  probes or, ``rule = "pyhessian"`` (PyHessian), when the running mean changes by less
  than ``tol`` relative, or, ``rule = "stderr"``, once at least :data:`MIN_PROBES` probes
  give a standard error <= ``tol`` x |mean| (a rule that stops on its own error).
* **SAM sharpness**: ``S_rho(w) = L(w + rho g / ||g||) - L(w)`` with g = grad L(w), for
  each rho of a list (Foret et al., ICLR 2021).

L is the mean cross-entropy over a *fixed* seeded subset of the training split (the same
samples every round: :func:`fixed_subset`), accumulated batch by batch so memory does not
grow with the subset. Nothing here changes the model: perturbed weights are restored
bit-exactly. No payload; nothing here goes on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

TAG_SHARPNESS_DATA = 701  #: numpy.random.default_rng([seed, TAG, ...]) stream tags
TAG_SHARPNESS_PROBE = 702

#: the stderr rule trusts a standard error from at least this many probes
MIN_PROBES = 10


class Objective:
    """``L(w) = sum_b term_b(w)`` over ``params``; ``terms()`` yields the scalar terms.

    Every term is built fresh (its own graph), so a gradient or Hessian-vector product
    over a large subset needs the memory of one batch only.
    """

    def __init__(self, params: Sequence[torch.Tensor],
                 terms: Callable[[], Iterable[torch.Tensor]]):
        self.params = list(params)
        self.terms = terms
        self.numel = sum(p.numel() for p in self.params)

    def _flat(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1)
                          for t, p in zip(tensors, self.params, strict=True)])

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def loss(self) -> float:
        with torch.no_grad():
            return float(sum(float(t) for t in self.terms()))

    def grad(self) -> torch.Tensor:
        total = torch.zeros(self.numel, dtype=self.params[0].dtype,
                            device=self.params[0].device)
        for term in self.terms():
            g = torch.autograd.grad(term, self.params, allow_unused=True)
            total += self._flat(g)
        return total

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat v, accumulated term by term."""
        vs = self._split(v)
        total = torch.zeros_like(v)
        for term in self.terms():
            g = torch.autograd.grad(term, self.params, create_graph=True, allow_unused=True)
            dot = sum((gi * vi).sum() for gi, vi in zip(g, vs, strict=True) if gi is not None)
            if not torch.is_tensor(dot) or not dot.requires_grad:
                continue  # a term linear in every parameter has a zero Hessian
            hv = torch.autograd.grad(dot, self.params, allow_unused=True)
            total += self._flat(hv)
        return total

    def shifted_loss(self, step: torch.Tensor) -> float:
        """L(w + step), leaving w exactly as it was."""
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, s in zip(self.params, self._split(step), strict=True):
                    p.add_(s)
            return self.loss()
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)


@dataclass
class Eigen:
    values: list[float]  #: largest magnitude first
    vectors: list[torch.Tensor]
    iterations: list[int]  #: Hessian-vector products spent on each
    residuals: list[float]  #: ||H' v - lambda v|| of each (H' deflated, v the unit iterate)


def top_eigenvalues(obj: Objective, k: int = 1, max_iter: int = 100, tol: float = 1e-3,
                    generator: torch.Generator | None = None) -> Eigen:
    """The k dominant Hessian eigenpairs by power iteration with deflation."""
    values: list[float] = []
    vectors: list[torch.Tensor] = []
    iters: list[int] = []
    residuals: list[float] = []
    dtype, device = obj.params[0].dtype, obj.params[0].device

    def deflate(x: torch.Tensor) -> torch.Tensor:
        for u in vectors:
            x = x - torch.dot(x, u) * u
        return x

    for _ in range(k):
        v = torch.randn(obj.numel, generator=generator, dtype=torch.float64).to(dtype)
        v = deflate(v.to(device))
        v = v / v.norm()
        lam, n, resid = float("nan"), 0, float("nan")
        for n in range(1, max_iter + 1):  # noqa: B007 (n is read after the loop)
            u = deflate(obj.hvp(v))
            new = float(torch.dot(v, u))
            norm = float(u.norm())
            converged = not math.isnan(lam) and abs(new - lam) <= tol * (abs(new) + 1e-12)
            lam = new
            resid = float((u - lam * v).norm())  # of lam's own iterate v
            if norm == 0.0:
                break
            v = u / norm
            if converged:
                break
        values.append(lam)
        vectors.append(v)
        iters.append(n)
        residuals.append(resid)
    # largest magnitude first: a run stopped by max_iter before converging may have found
    # a smaller Rayleigh quotient first
    order = sorted(range(k), key=lambda i: -abs(values[i]))
    return Eigen([values[i] for i in order], [vectors[i] for i in order],
                 [iters[i] for i in order], [residuals[i] for i in order])


@dataclass
class Trace:
    value: float
    stderr: float  #: standard error of the mean over the probes
    samples: int


def _stderr(est: list[float]) -> float:
    return float(np.std(est, ddof=1) / math.sqrt(len(est))) if len(est) > 1 else float("nan")


def hutchinson_trace(obj: Objective, max_samples: int = 100, tol: float = 1e-3,
                     generator: torch.Generator | None = None,
                     rule: str = "pyhessian") -> Trace:
    """Hutchinson's trace estimate with Rademacher probes; ``rule`` = "pyhessian" (the
    mean moved by <= tol relative) or "stderr" (standard error <= tol x |mean| after at
    least :data:`MIN_PROBES` probes); at most ``max_samples`` probes either way."""
    if rule not in ("pyhessian", "stderr"):
        raise ValueError(f"unknown trace stopping rule {rule!r}")
    dtype, device = obj.params[0].dtype, obj.params[0].device
    est: list[float] = []
    mean = float("nan")
    for _ in range(max_samples):
        z = torch.randint(0, 2, (obj.numel,), generator=generator).to(dtype) * 2 - 1
        z = z.to(device)
        est.append(float(torch.dot(z, obj.hvp(z))))
        new = float(np.mean(est))
        if rule == "stderr":
            mean = new
            if len(est) >= MIN_PROBES and _stderr(est) <= tol * abs(mean):
                break
            continue
        if len(est) >= 2 and abs(new - mean) <= tol * (abs(mean) + 1e-6):
            mean = new
            break
        mean = new
    return Trace(mean, _stderr(est), len(est))


def sam_sharpness(obj: Objective, rhos: Sequence[float]) -> tuple[float, list[float]]:
    """(L(w), [L(w + rho g/||g||) - L(w) for rho in rhos])."""
    base = obj.loss()
    g = obj.grad()
    unit = g / (g.norm() + 1e-12)
    return base, [obj.shifted_loss(rho * unit) - base for rho in rhos]


# ---------------------------------------------------------------------------- models


def model_objective(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    batch_size: int, normalize: Callable | None = None) -> Objective:
    """Mean cross-entropy of ``module`` over (x, y), in batches of ``batch_size``."""
    n = int(y.shape[0])
    params = [p for p in module.parameters() if p.requires_grad]

    def terms():
        for i in range(0, n, batch_size):
            xb = x[i:i + batch_size]
            if normalize is not None:
                xb = normalize(xb)
            yield F.cross_entropy(module(xb), y[i:i + batch_size], reduction="sum") / n

    return Objective(params, terms)


@dataclass
class Subset:
    """The fixed training samples sharpness is measured on (rank 0, storage dtype)."""

    x: torch.Tensor
    y: torch.Tensor


def fixed_subset(x: np.ndarray, y: np.ndarray, size: int, seed: int,
                 device: torch.device | str = "cpu", among: np.ndarray | None = None
                 ) -> Subset:
    """``size`` training samples drawn once from ``[seed, TAG_SHARPNESS_DATA]`` (sorted),
    among the rows ``among`` (sorted, distinct; default: every row)."""
    n = len(y) if among is None else len(among)
    rng = np.random.default_rng([seed, TAG_SHARPNESS_DATA])
    idx = np.sort(rng.choice(n, size=min(size, n), replace=False))
    if among is not None:
        idx = among[idx]
    return Subset(torch.from_numpy(np.ascontiguousarray(x[idx])).to(device),
                  torch.from_numpy(np.ascontiguousarray(y[idx])).to(device))


def _generator(seed: int, tag: int, round_: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(np.random.default_rng([seed, tag, round_]).integers(0, 2**62)))
    return g


def measure(module: torch.nn.Module, subset: Subset, normalize: Callable | None, ev,
            seed: int, round_: int) -> dict[str, float]:
    """Every sharpness metric of ``module`` on ``subset`` -> HDF5 round columns.

    ``ev`` is the run's :class:`fedmpi.config.EvalConfig`. Columns: ``sharpness_lmax``
    (lambda_1, with ``_resid`` its residual ||H v - lambda v|| and ``_iters`` the products
    spent), ``sharpness_eig2..5`` (deflation, up to ``sharpness_topk``),
    ``sharpness_trace`` (+ ``_stderr``, ``_probes``), ``sharpness_loss`` (L on the
    subset), ``sharpness_sam`` (first rho) and ``sharpness_sam2..4`` (the other rhos).
    """
    was_training = module.training
    module.eval()
    try:
        obj = model_objective(module, subset.x, subset.y, ev.batch_size, normalize)
        eig = top_eigenvalues(obj, ev.sharpness_topk, ev.sharpness_iters, ev.sharpness_tol,
                              _generator(seed, TAG_SHARPNESS_PROBE, 2 * round_))
        tr = hutchinson_trace(obj, ev.sharpness_trace_samples, ev.sharpness_trace_tol,
                              _generator(seed, TAG_SHARPNESS_PROBE, 2 * round_ + 1),
                              ev.sharpness_trace_rule)
        base, sam = sam_sharpness(obj, ev.sharpness_rho)
    finally:
        module.train(was_training)
    row = {"sharpness_lmax": eig.values[0], "sharpness_lmax_resid": eig.residuals[0],
           "sharpness_lmax_iters": eig.iterations[0], "sharpness_trace": tr.value,
           "sharpness_trace_stderr": tr.stderr, "sharpness_trace_probes": tr.samples,
           "sharpness_loss": base}
    for i, lam in enumerate(eig.values[1:], start=2):
        row[f"sharpness_eig{i}"] = lam
    for i, s in enumerate(sam):
        row["sharpness_sam" if i == 0 else f"sharpness_sam{i + 1}"] = s
    return row
