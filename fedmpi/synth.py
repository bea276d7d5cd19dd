"""Synthetic-feature fitting: find (X, Y) whose loss gradient at w points along a target u.

The fitting step of 3SFC (Zhou et al., "Communication-Efficient Federated Learning with
Single-Step Synthetic Features Compressor for Faster Convergence", ICCV 2023, arXiv
2302.13562; E-3SFC, TNNLS 2025, arXiv 2502.03092), shared with FedSynSAM's server-side
synthetic set. For a model f, weights w (flat fp32), a target vector u (length d) and
trainable synthetic inputs X (M samples of the dataset's input shape) and soft labels
Y (M x C), minimise

    J(X, Y) = 1 - |cos(g(X, Y), u)| + lambda (||X||^2 + ||Y||^2),
    g(X, Y) = grad_w CE(f_w(X), Y)      (soft-target cross-entropy, mean over the M samples,
                                         Y used raw, as torch's CrossEntropyLoss does)

(``absolute=False`` drops the |.|). The gradient of J with respect to (X, Y) is a double
backward through the model. As in the official code (``fl_devices.py``,
``compute_synthetic_sample``): X ~ N(0, 1), Y ~ N(0, 1); LBFGS with torch's defaults
(lr 1, 20 iterations per step, history 100, no line search) for S outer ``step`` calls
whose state carries over, keeping the (X, Y) of the smallest finite J seen after a step
(the official ``0 <= J`` test; J >= 0 here). A plain gradient-descent option
(``optimizer = "gd"``; ``steps = 1`` is the paper's "single step") is also here.

The vector matched is a :data:`Direction` of (X, Y): :class:`Gradient` (3SFC: one
gradient at w) or :class:`Replay` (FedSynth: w_K - w after K SGD steps on K synthetic
batches, differentiated through the unrolled steps).

Two implementations of the same fit:

* :func:`fit` solves B independent problems (one per client, each with its own target and
  start) at once. :func:`lbfgs` runs B LBFGS instances in lockstep, each with its own
  history, step sizes and stopping tests (a problem that stops waits; its rows are never
  touched); per problem it is ``torch.optim.LBFGS``'s algorithm (no line search), with
  the two-loop recursion replaced by the equal compact form of the inverse Hessian
  (:class:`_History`: a dozen batched operations per iteration instead of four per
  history entry). The objectives are evaluated in one of three ways (``mode``):
  ``factored`` for chains of dense layers (:class:`Layers`: the cosine's inner product
  and norm from per-layer factors, never forming the d-sized gradient, all problems in
  one batched call; ``auto`` picks it for 3SFC's MLP / logreg), ``vmap`` (one
  ``torch.func`` call for all problems: ``functional_call`` + ``grad`` + ``vmap``, the
  choice on a GPU for other models) or ``loop`` (one problem after another with autograd:
  faster on a CPU for other models, where one problem's d-sized intermediates stay in
  cache). ``loop`` and ``factored`` give a problem bit-identical results whatever batch
  it is in (tested), so runs do not depend on how clients are spread over ranks. The
  result equals :func:`fit_sequential` up to floating-point rounding (LBFGS without line
  search amplifies rounding over many iterations).
* :func:`fit_sequential` is the reference: one ``torch.optim.LBFGS`` per problem with an
  autograd closure, as the official code does.

The model is never modified: every evaluation passes views of ``w`` to
``torch.func.functional_call``, so ``w`` may be a server's authoritative global model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from fedmpi.models import dense_layers


@dataclass(frozen=True)
class FitOptions:
    """How to fit (X, Y); the defaults are the official code's."""

    steps: int = 10  #: S outer optimiser steps (LBFGS ``step`` calls or GD steps)
    optimizer: Literal["lbfgs", "gd"] = "lbfgs"
    lr: float = 1.0  #: LBFGS lr (torch default) or the GD step size
    max_iter: int = 20  #: LBFGS iterations per outer step (torch default)
    history_size: int = 100  #: LBFGS memory (torch default)
    lambd: float = 0.0  #: lambda of the ||X||^2 + ||Y||^2 penalty (E-3SFC; 0 in the paper)
    absolute: bool = True  #: 1 - |cos| (3SFC) or 1 - cos (a signed match)


@dataclass
class FitResult:
    x: torch.Tensor  #: (B, M, *input_shape) best synthetic inputs
    y: torch.Tensor  #: (B, M, C) best soft labels
    loss: torch.Tensor  #: (B,) float64 objective J at (x, y); inf if no step was finite


@dataclass(frozen=True)
class Solver:
    """B problems' fit at one w^t: ``solver(targets (B, d), x0 (B, *x_shape), y0 (B,
    *y_shape)) -> FitResult``. A compressor that fits (3SFC, FedSynth) makes one per call
    (:meth:`fedmpi.compress.sfc3.SFC3.solver`); the shapes let a fit pool
    (:mod:`fedmpi.fitpool`) pack and unpack problems it did not make."""

    solve: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], FitResult]
    d: int
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]

    def __call__(self, targets: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor
                 ) -> FitResult:
        return self.solve(targets, x0, y0)


class SynthModel:
    """A module seen as a function of a flat weight vector ``w`` (FlatModel order)."""

    def __init__(self, model: Any):
        self.module: nn.Module = getattr(model, "module", model)
        named = list(self.module.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.d = sum(self.sizes)

    def params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in
                zip(self.names, torch.split(w, self.sizes), self.shapes, strict=True)}

    def loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CE(f_w(x), y) with soft targets ``y`` (M x C), mean over the M samples."""
        return F.cross_entropy(functional_call(self.module, self.params(w), (x,)), y)

    def grad(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """grad_w CE(f_w(x), y) as a flat vector; plain autograd, no graph kept."""
        with torch.enable_grad():
            leaf = w.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.loss(leaf, x, y), leaf)
        return g


# ------------------------------------------------------------------ directions


class Gradient:
    """The 3SFC direction: g(X, Y) = grad_w CE(f_w(X), Y); X (M, *in), Y (M, C)."""

    def __init__(self, sm: SynthModel, m: int, input_shape: tuple[int, ...],
                 num_classes: int):
        self.sm = sm
        self.x_shape = (m, *input_shape)
        self.y_shape = (m, num_classes)

    def __call__(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The decoder's computation (plain autograd). Encoder and decoder both call it, so
        a payload decodes to the same bits on every rank (same w, same thread count)."""
        return self.sm.grad(w, x, y)

    def graph(self, leaf: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The same, differentiable in (x, y) (autograd, create_graph)."""
        (g,) = torch.autograd.grad(self.sm.loss(leaf, x, y), leaf, create_graph=True)
        return g

    def func(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The same as a torch.func transform (for vmap)."""
        return grad(self.sm.loss)(w, x, y)


class Replay:
    """FedSynth's direction: w_K - w after K SGD steps w <- w - lr grad CE(f_w(X_k), Y_k)
    on the synthetic batches k = 0..K-1; X (K, M, *in), Y (K, M, C)."""

    def __init__(self, sm: SynthModel, batches: int, m: int, input_shape: tuple[int, ...],
                 num_classes: int, lr: float):
        self.sm = sm
        self.lr = lr
        self.x_shape = (batches, m, *input_shape)
        self.y_shape = (batches, m, num_classes)

    def __call__(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cur = w
        for xk, yk in zip(x, y, strict=True):
            cur = cur - self.lr * self.sm.grad(cur, xk, yk)
        return cur - w

    def graph(self, leaf: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cur = leaf
        for xk, yk in zip(x, y, strict=True):
            (g,) = torch.autograd.grad(self.sm.loss(cur, xk, yk), cur, create_graph=True)
            cur = cur - self.lr * g
        return cur - leaf

    def func(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cur = w
        for k in range(x.shape[0]):
            cur = cur - self.lr * grad(self.sm.loss)(cur, x[k], y[k])
        return cur - w


Direction = Gradient | Replay


# ------------------------------------------------------------------ objective


def cosine_objective(g: torch.Tensor, u: torch.Tensor, u_norm: torch.Tensor,
                     x: torch.Tensor, y: torch.Tensor, lambd: float,
                     absolute: bool) -> torch.Tensor:
    """1 - |cos(g, u)| + lambda (||x||^2 + ||y||^2), cos with the official 1e-12 guard."""
    cos = torch.dot(g, u) / (torch.linalg.vector_norm(g) * u_norm + 1e-12)
    j = 1.0 - (cos.abs() if absolute else cos)
    if lambd:
        j = j + lambd * (x.pow(2).sum() + y.pow(2).sum())
    return j


#: evaluates the problems ``rows`` (int64 indices) at their points ``z`` (len(rows), P);
#: returns (J (len(rows),), dJ/dz (len(rows), P))
BatchedFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Packing:
    """(X, Y) of B problems <-> one (B, P) matrix, P = numel(X) + numel(Y) per problem."""

    def __init__(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...]):
        self.x_shape = tuple(x_shape)
        self.y_shape = tuple(y_shape)
        self.nx = math.prod(self.x_shape)

    def pack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)], 1)

    def unpack(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = z.shape[0]
        return (z[:, :self.nx].reshape(b, *self.x_shape),
                z[:, self.nx:].reshape(b, *self.y_shape))


#: floats per 64 bytes: the padded widths of :class:`Layers`
_ALIGN = 16


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class Layers:
    """A model that is a chain of dense layers: ``Sequential([Flatten,] Linear, ReLU, ...,
    Linear)`` (fedmpi's ``mlp`` and ``logreg``), for the ``factored`` evaluation.

    For such a model the per-sample gradient of a layer is an outer product, so the two
    numbers the cosine objective needs come from per-layer factors without ever forming
    the d-sized g (Gradient direction, soft-target CE with mean over M samples):

        a_0 = X,  h_l = a_{l-1} W_l^T + b_l,  a_l = relu(h_l),  logits z = h_L
        e_L = (softmax(z) * sum_c Y - Y) / M,  e_l = (e_{l+1} W_{l+1}) * [h_l > 0]
        G_l = e_l^T a_{l-1},  gb_l = sum_m e_l       (the blocks of g)
        <g, u>  = sum_l sum(e_l * (a_{l-1} U_l^T + ub_l))
        ||g||^2 = sum_l sum((e_l e_l^T) * (a_{l-1} a_{l-1}^T)) + ||gb_l||^2

    Per problem this reads its target u twice (forward and backward of a_{l-1} U_l^T) and
    nothing else d-sized; all B problems go through one batched call per operation. The
    value is the same J as :func:`cosine_objective` on the formed g, up to float rounding.

    Batch independence: every width (input, hidden, classes) is zero-padded to a multiple
    of 16 floats (padded units have zero weights and targets, padded classes a -inf bias
    and zero labels, so they add exact zeros), and every product is a ``bmm`` with the
    shared weights expanded over the batch. Each problem then sits at the same 64-byte
    alignment in every tensor and runs the same same-shape kernels, so its J and gradient
    are bit-identical whatever batch (and batch position) it is evaluated in: a run does
    not depend on how clients are spread over ranks.
    """

    def __init__(self, sm: SynthModel):
        linears = dense_layers(sm.module)
        self.ok = linears is not None
        self.shapes = [tuple(m.weight.shape) for m in linears] if linears else []

    @classmethod
    def of(cls, direction: Any) -> Layers | None:
        """The factorisation of ``direction``'s model, or None when it does not apply."""
        if not isinstance(direction, Gradient):
            return None
        layers = cls(direction.sm)
        return layers if layers.ok else None

    def split(self, v: torch.Tensor, fill: float = 0.0
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fresh zero-padded (W_l, b_l) of the flat ``v`` (..., d) in FlatModel order:
        W_l (..., pad(out), pad(in)), b_l (..., pad(out)); the last layer's padded bias
        entries are ``fill``."""
        out, off = [], 0
        lead = v.shape[:-1]
        for n, (o, i) in enumerate(self.shapes):
            wt = v.new_zeros((*lead, _padded(o), _padded(i)))
            wt[..., :o, :i] = v[..., off:off + o * i].reshape(*lead, o, i)
            bias = v.new_full((*lead, _padded(o)), fill if n == len(self.shapes) - 1 else 0.0)
            bias[..., :o] = v[..., off + o * i:off + o * i + o]
            out.append((wt, bias))
            off += o * i + o
        return out

    def pad_inputs(self, x: torch.Tensor, y: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh zero-padded (B, M, pad(D_in)) and (B, M, pad(C)) copies of x and y."""
        b, m = x.shape[0], x.shape[1]
        xp = x.new_zeros((b, m, _padded(self.shapes[0][1])))
        xp[..., :self.shapes[0][1]] = x.reshape(b, m, -1)
        yp = y.new_zeros((b, m, _padded(self.shapes[-1][0])))
        yp[..., :self.shapes[-1][0]] = y
        return xp, yp

    @staticmethod
    def objective(wl, ul, u_norm: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  lambd: float, absolute: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(J, dJ/dx, dJ/dy) of B problems from padded tensors (:meth:`split`,
        :meth:`pad_inputs`): ``wl`` the shared (W_l, b_l) (last bias padded with -inf);
        ``ul`` the B problems' target blocks; ``u_norm`` (B,); x (B, M, pad(D_in)); y (B, M,
        pad(C)). The gradient is written out by hand (reverse mode through the formulas in
        the class docstring; the ReLU masks count as constants, as autograd's do): with
        Gu = dJ/d<g,u>, Gg = dJ/d||g||^2, K_l = a_{l-1} a_{l-1}^T, E_l = e_l e_l^T,

            de_l  = Gu v_l + 2 Gg (K_l e_l + 1 gb_l^T) + [(de_{l-1} * m_{l-1}) W_l^T]
            da_l-1 = Gu e_l U_l + 2 Gg E_l a_{l-1} + dh_l W_l,  dh_l = da_l * m_l
            dz = p * (dp - sum_c dp * p),  dp = de_L * s / M  (s = Y 1, dY via s and e_L)

        about a third of autograd's operations for the same products."""
        b, m = x.shape[0], x.shape[1]
        n_layers = len(wl)
        a = [x]
        for i, (wt, bias) in enumerate(wl):
            h = torch.baddbmm(bias.expand(b, m, -1), a[-1], wt.t().expand(b, -1, -1))
            if i < n_layers - 1:
                a.append(h.relu_())  # the ReLU masks are a_l > 0
        p = torch.softmax(h, dim=-1)
        s = y.sum(-1, keepdim=True)
        e = (p * s - y) / m
        # per layer, kept for the backward pass: e_l, v_l, K_l, E_l, gb_l
        es, vs, ks, ee, gbs = ([None] * n_layers for _ in range(5))
        gu = gg = None
        for i in range(n_layers - 1, -1, -1):
            uw, ub = ul[i]
            v = torch.baddbmm(ub[:, None, :].expand(-1, m, -1), a[i], uw.transpose(1, 2))
            gb = e.sum(1, keepdim=True)
            k = torch.bmm(a[i], a[i].transpose(1, 2))
            e_outer = torch.bmm(e, e.transpose(1, 2))
            terms = ((e * v).sum((1, 2)), (e_outer * k).sum((1, 2)) + (gb * gb).sum((1, 2)))
            gu, gg = terms if gu is None else (gu + terms[0], gg + terms[1])
            es[i], vs[i], ks[i], ee[i], gbs[i] = e, v, k, e_outer, gb
            if i:
                e = torch.ops.aten.threshold_backward(
                    torch.bmm(e, wl[i][0].expand(b, -1, -1)), a[i], 0)
        r = torch.sqrt(gg)
        den = r * u_norm + 1e-12
        cos = gu / den
        sign = torch.sign(cos) if absolute else torch.ones_like(cos)
        j = 1.0 - sign * cos
        if lambd:
            j = j + lambd * (x.pow(2).sum((1, 2)) + y.pow(2).sum((1, 2)))
        d_gu = (-sign / den)[:, None, None]
        d_gg = (sign * gu * u_norm / (den * den * 2.0 * r))[:, None, None]
        two_gg = 2.0 * d_gg
        # adjoints of e_l, l = 1..L (e_l feeds e_{l+1}... downwards, so accumulate upwards)
        de = None
        for i in range(n_layers):
            e = es[i]
            own = (d_gu * vs[i] + two_gg * (torch.bmm(ks[i], e) + gbs[i]))
            de = own if de is None else own + torch.bmm(
                torch.ops.aten.threshold_backward(de, a[i], 0), wl[i][0].t().expand(b, -1, -1))
        # e_L = (p s - Y) / M
        dp = de * s / m
        dz = p * (dp - (dp * p).sum(-1, keepdim=True))
        gy = (de * p).sum(-1, keepdim=True) / m - de / m
        # down the forward chain: dh_L = dz
        dh = dz
        gx = None
        for i in range(n_layers - 1, -1, -1):
            e = es[i]
            uw = ul[i][0]
            da = torch.bmm(dh, wl[i][0].expand(b, -1, -1)) + d_gu * torch.bmm(e, uw) \
                + two_gg * torch.bmm(ee[i], a[i])
            if i:
                dh = torch.ops.aten.threshold_backward(da, a[i], 0)
            else:
                gx = da
        if lambd:
            gx = gx + (2.0 * lambd) * x
            gy = gy + (2.0 * lambd) * y
        return j, gx, gy


def resolve_mode(mode: str, device: torch.device, direction: Any = None) -> str:
    """``auto`` -> ``factored`` when the model is a chain of dense layers (:class:`Layers`),
    else ``vmap`` on CUDA and ``loop`` elsewhere (see :func:`match_fn`)."""
    if mode == "auto":
        if direction is not None and Layers.of(direction) is not None:
            return "factored"
        return "vmap" if device.type == "cuda" else "loop"
    if mode not in ("vmap", "loop", "factored"):
        raise ValueError(f"unknown evaluation mode {mode!r}")
    return mode


def match_fn(direction: Direction, w: torch.Tensor, targets: torch.Tensor,
             opts: FitOptions, mode: str = "auto") -> BatchedFn:
    """The batched objective: problem b matches ``targets[b]`` at the shared ``w``.

    ``mode``: ``vmap`` evaluates all requested problems in one ``torch.func`` call (fast
    where kernel launches dominate: GPUs); ``loop`` evaluates them one by one with autograd
    (fast on CPUs, where every d-sized intermediate of one problem stays in cache);
    ``auto`` picks vmap on CUDA and loop elsewhere. Both give the same J up to rounding.
    """
    w = w.detach()
    targets = targets.detach()
    norms = torch.linalg.vector_norm(targets, dim=1)
    pack = Packing(direction.x_shape, direction.y_shape)
    mode = resolve_mode(mode, w.device, direction)

    if mode == "factored":
        layers = Layers.of(direction)
        if layers is None:
            raise ValueError("evaluation mode 'factored' needs a Gradient direction on a "
                             "chain of Linear / ReLU layers (mlp, logreg)")
        wl = layers.split(w, fill=-math.inf)
        ul = layers.split(targets)
        nx, nc = layers.shapes[0][1], layers.shapes[-1][0]

        def fn(z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            xs, ys = pack.unpack(z.detach())
            x, y = layers.pad_inputs(xs, ys)
            every = len(rows) == len(targets) and bool((rows == torch.arange(
                len(targets), device=rows.device)).all())
            sub = ul if every else [(uw.index_select(0, rows), ub.index_select(0, rows))
                                    for uw, ub in ul]
            j, gx, gy = layers.objective(wl, sub, norms[rows], x, y, opts.lambd, opts.absolute)
            return j, pack.pack(gx[..., :nx].reshape(xs.shape), gy[..., :nc])

        return fn

    if mode == "vmap":
        def one(x, y, u, u_norm):
            return cosine_objective(direction.func(w, x, y), u, u_norm, x, y, opts.lambd,
                                    opts.absolute)

        batched = vmap(grad_and_value(one, argnums=(0, 1)))

        def fn(z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = pack.unpack(z)
            with torch.enable_grad():
                (gx, gy), j = batched(x, y, targets[rows], norms[rows])
            return j.detach(), pack.pack(gx, gy).detach()

        return fn

    leaf = w.clone().requires_grad_(True)
    # every problem's tensors are fresh allocations (not views at an offset into a batch):
    # BLAS kernels may round differently at a different memory alignment, and a problem's
    # result must not depend on the batch it is fitted in
    own_targets = [u.clone() for u in targets]
    own_norms = [torch.linalg.vector_norm(u) for u in own_targets]

    def fn(z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = pack.unpack(z)
        js, gs = [], []
        with torch.enable_grad():
            for x0, y0, r in zip(xs, ys, rows.tolist(), strict=True):
                x = x0.detach().clone().requires_grad_(True)
                y = y0.detach().clone().requires_grad_(True)
                j = cosine_objective(direction.graph(leaf, x, y), own_targets[r], own_norms[r],
                                     x, y, opts.lambd, opts.absolute)
                gx, gy = torch.autograd.grad(j, (x, y))
                js.append(j.detach())
                gs.append(torch.cat([gx.reshape(-1), gy.reshape(-1)]))
        return torch.stack(js), torch.stack(gs)

    return fn


# ------------------------------------------------------------------ optimisers


class _History:
    """LBFGS memory of B problems in lockstep, applied in the compact form.

    Row b keeps its last ``size`` entries (s_i, y_i) in a ring of slots: entry number n
    (counting from 0) of row b sits in slot n mod size, whatever the other rows hold;
    unused slots are zero. ``direction`` returns -H g for the LBFGS inverse-Hessian
    approximation H of each row's history with H0 = h_diag I, in the compact
    representation of Byrd, Nocedal and Schnabel ("Representations of quasi-Newton
    matrices and their use in limited memory methods", Math. Prog. 63, 1994, eq. 3.1):

        H g = h g + S q - h Y p,   p = R^-1 S^T g,   q = R^-T ((D + h Y^T Y) p - h Y^T g)

    with the entries in age order, R the upper triangle of S^T Y and D its diagonal. That
    is the H of torch.optim.LBFGS's two-loop recursion (equal in exact arithmetic) in a
    fixed dozen batched operations instead of four per entry and problem: two passes over
    the stored vectors (S^T g and Y^T g, then the combination) and k x k float64 algebra
    on the dot products, permuted into age order. An unused slot gets R_ii = 1, which
    makes its p_i and q_i exact zeros. Buffers are padded (P to 16 floats, slots to 8)
    and every product is a row-vector x matrix ``bmm``, so a problem's numbers do not
    depend on the batch it is in.
    """

    def __init__(self, size: int, batch: int, device: torch.device):
        self.size = size
        self.total = torch.zeros(batch, dtype=torch.int64, device=device)  # entries added
        self.cap = 0
        self.buf: torch.Tensor | None = None  # (B, cap, 2, P'): s_i, y_i
        self.sy = self.yy = torch.zeros((batch, 0, 0), dtype=torch.float64, device=device)

    @property
    def count(self) -> torch.Tensor:
        """Entries held per row."""
        return torch.clamp(self.total, max=self.size)

    def _grow(self, p: int, dtype: torch.dtype, device: torch.device) -> None:
        b, old = self.total.shape[0], self.cap
        cap = min(max(8, 2 * old), -(-self.size // 8) * 8)
        buf = torch.zeros((b, cap, 2, _padded(p)), dtype=dtype, device=device)
        sy = torch.zeros((b, cap, cap), dtype=torch.float64, device=device)
        yy = torch.zeros_like(sy)
        if old:
            buf[:, :old] = self.buf
            sy[:, :old, :old] = self.sy
            yy[:, :old, :old] = self.yy
        self.buf, self.sy, self.yy, self.cap = buf, sy, yy, cap

    def add(self, y: torch.Tensor, s: torch.Tensor, ys: torch.Tensor,
            mask: torch.Tensor) -> None:
        b, p = y.shape
        rows = torch.nonzero(mask).flatten()
        if not rows.numel():
            return
        if min(int(self.total.max()) + 1, self.size) > self.cap:
            self._grow(p, y.dtype, y.device)
        every = len(rows) == b
        slot = self.total[rows] % self.size  # a full row overwrites its oldest entry
        self.buf[rows, slot, 0, :p] = s[rows]
        self.buf[rows, slot, 1, :p] = y[rows]
        self.total[rows] += 1
        k = min(-(-int(self.count.max()) // 8) * 8, self.cap)
        hist = (self.buf[:, :k] if every else self.buf[rows, :k]).reshape(len(rows), 2 * k, -1)
        new = self.buf[rows, slot]  # (R, 2, P'): s_new, y_new
        # one pass over the history; row-vector x matrix products (as everywhere here):
        # bmm's matrix x column-vector kernels round differently for different batch sizes
        dots = torch.bmm(new, hist.transpose(1, 2)).double().view(len(rows), 2, k, 2)
        # dots[r, a, i, c] = new_a . slot i's (s, y)[c]; a, c: 0 = s, 1 = y
        self.sy[rows, :k, slot] = dots[:, 1, :, 0]  # s_i . y_new
        self.sy[rows, slot, :k] = dots[:, 0, :, 1]  # y_i . s_new (s_new . y_new twice)
        self.yy[rows, :k, slot] = dots[:, 1, :, 1]  # y_i . y_new
        self.yy[rows, slot, :k] = dots[:, 1, :, 1]

    def direction(self, g: torch.Tensor, h_diag: torch.Tensor) -> torch.Tensor:
        """-H g per row, H from that row's history (see the class docstring)."""
        b, p = g.shape
        count = self.count
        top = int(count.max())
        if top == 0:
            return -(g * h_diag[:, None])
        k = min(-(-top // 8) * 8, self.cap)  # slots in play (padded; unused ones drop out)
        hist = self.buf[:, :k].reshape(b, 2 * k, -1)
        gp = g.new_zeros((b, 1, hist.shape[2]))
        gp[:, 0, :p] = g
        dots = torch.bmm(gp, hist.transpose(1, 2)).double().view(b, k, 2)  # first pass
        # age order: position j of row b is slot (oldest + j) mod size, then unused slots;
        # until some row's ring wraps that is slot order (the gathers would copy as is)
        ar = torch.arange(k, device=g.device)
        wrapped = int(self.total.max()) > self.size
        if wrapped:
            oldest = (self.total - count) % self.size
            age = torch.where(ar[None, :] < count[:, None],
                              (oldest[:, None] + ar) % self.size, ar[None, :])
            sg = dots[:, :, 0].gather(1, age)
            yg = dots[:, :, 1].gather(1, age)
            rows_of = age[:, :, None].expand(-1, -1, k)
            cols_of = age[:, None, :].expand(-1, k, -1)
            sy = self.sy[:, :k, :k].gather(1, rows_of).gather(2, cols_of)
            yy = self.yy[:, :k, :k].gather(1, rows_of).gather(2, cols_of)
        else:
            sg, yg = dots[:, :, 0], dots[:, :, 1]
            sy, yy = self.sy[:, :k, :k], self.yy[:, :k, :k]
        used = ar[None, :] < count[:, None]
        h = h_diag.double()[:, None]
        r = torch.triu(sy) + torch.diag_embed((~used).double())
        pv = torch.linalg.solve_triangular(r, sg[..., None], upper=True)[..., 0]
        ypv = torch.bmm(pv[:, None, :], yy)[:, 0]  # YY is symmetric
        rhs = torch.diagonal(sy, dim1=1, dim2=2) * pv + h * (ypv - yg)
        qv = torch.linalg.solve_triangular(r.transpose(1, 2), rhs[..., None], upper=False)
        coef = torch.stack([qv[..., 0], -h * pv], 2)
        if wrapped:  # back to slot order
            coef = torch.zeros_like(coef).scatter_(1, age[..., None].expand(-1, -1, 2), coef)
        hg = torch.bmm(coef.to(g.dtype).view(b, 1, 2 * k), hist)[:, 0, :p]  # second pass
        return -(h_diag[:, None] * g + hg)


def _evaluate(fn: BatchedFn, z: torch.Tensor, mask: torch.Tensor | None = None,
              j: torch.Tensor | None = None, g: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(J, dJ/dz) of the rows in ``mask`` (all if None), written into copies of ``j``, ``g``
    (other rows keep their values there)."""
    b = z.shape[0]
    rows = (torch.arange(b, device=z.device) if mask is None
            else torch.nonzero(mask).flatten())
    j_out = torch.full((b,), math.nan, dtype=z.dtype, device=z.device) if j is None else j.clone()
    g_out = torch.zeros_like(z) if g is None else g.clone()
    if rows.numel():
        j_rows, g_rows = fn(z[rows], rows)
        j_out[rows] = j_rows.to(z.dtype)
        g_out[rows] = g_rows.to(z.dtype)
    return j_out, g_out


def lbfgs(fn: BatchedFn, z0: torch.Tensor, steps: int, lr: float = 1.0, max_iter: int = 20,
          history_size: int = 100, tolerance_grad: float = 1e-7,
          tolerance_change: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` calls of torch.optim.LBFGS.step (no line search) on each row of ``z0``,
    all rows in lockstep, keeping per row the point of the smallest finite J seen after
    a step. Returns (best z, its J as float64; inf where no step gave a finite J)."""
    b, _ = z0.shape
    dev = z0.device
    max_eval = max_iter * 5 // 4
    z = z0.detach().clone()
    best_z = z.clone()
    best = torch.full((b,), math.inf, dtype=torch.float64, device=dev)
    hist = _History(history_size, b, dev)
    n_total = torch.zeros(b, dtype=torch.int64, device=dev)
    d = torch.zeros_like(z)
    t = torch.zeros(b, dtype=z.dtype, device=dev)
    h_diag = torch.ones(b, dtype=z.dtype, device=dev)
    prev_g = torch.zeros_like(z)
    prev_loss = torch.zeros(b, dtype=torch.float64, device=dev)
    j, g = _evaluate(fn, z)
    for _ in range(steps):
        loss = j.double()
        running = ~(g.abs().amax(1) <= tolerance_grad)
        evals = torch.ones(b, dtype=torch.int64, device=dev)
        n_iter = 0
        while n_iter < max_iter and bool(running.any()):
            n_iter += 1
            n_total += running.long()
            first = running & (n_total == 1)
            later = running & (n_total > 1)
            if bool(later.any()):
                y = g - prev_g
                s = d * t[:, None]
                ys = torch.linalg.vecdot(y, s)
                add = later & (ys > 1e-10)
                if bool(add.any()):
                    hist.add(y, s, ys, add)
                    h_diag = torch.where(add, ys / torch.linalg.vecdot(y, y), h_diag)
                d = torch.where(later[:, None], hist.direction(g, h_diag), d)
            d = torch.where(first[:, None], -g, d)
            prev_g = torch.where(running[:, None], g, prev_g)
            prev_loss = torch.where(running, loss, prev_loss)
            t0 = torch.clamp(1.0 / g.abs().sum(1), max=1.0) * lr
            t = torch.where(running, torch.where(first, t0, torch.full_like(t, lr)), t)
            gtd = torch.linalg.vecdot(g, d)
            running = running & ~(gtd > -tolerance_change)
            z = torch.where(running[:, None], z + d * t[:, None], z)
            opt_cond = torch.zeros_like(running)
            if n_iter != max_iter:
                j, g = _evaluate(fn, z, running, j, g)
                loss = torch.where(running, j.double(), loss)
                opt_cond = g.abs().amax(1) <= tolerance_grad
                evals += running.long()
            stop = (opt_cond | (evals >= max_eval) | (n_iter == max_iter)
                    | ((d * t[:, None]).abs().amax(1) <= tolerance_change)
                    | ((loss - prev_loss).abs() < tolerance_change))
            running = running & ~stop
        j, g = _evaluate(fn, z)  # J after the step; also the next step's start
        cur = j.double()
        better = torch.isfinite(cur) & (cur < best)
        best = torch.where(better, cur, best)
        best_z = torch.where(better[:, None], z, best_z)
    return best_z, best


def gradient_descent(fn: BatchedFn, z0: torch.Tensor, steps: int,
                     lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` plain steps z <- z - lr dJ/dz per row, keeping the best point after a step."""
    z = z0.detach().clone()
    best_z = z.clone()
    best = torch.full((z.shape[0],), math.inf, dtype=torch.float64, device=z.device)
    _, g = _evaluate(fn, z)
    for _ in range(steps):
        z = z - lr * g
        j, g = _evaluate(fn, z)
        cur = j.double()
        better = torch.isfinite(cur) & (cur < best)
        best = torch.where(better, cur, best)
        best_z = torch.where(better[:, None], z, best_z)
    return best_z, best


def optimise(fn: BatchedFn, z0: torch.Tensor, opts: FitOptions
             ) -> tuple[torch.Tensor, torch.Tensor]:
    if opts.optimizer == "gd":
        return gradient_descent(fn, z0, opts.steps, opts.lr)
    return lbfgs(fn, z0, opts.steps, lr=opts.lr, max_iter=opts.max_iter,
                 history_size=opts.history_size)


# ------------------------------------------------------------------ fitting


def init_xy(generator: torch.Generator, x_shape: tuple[int, ...], y_shape: tuple[int, ...],
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The official start: X ~ N(0, 1) and Y ~ N(0, 1), drawn on the CPU from
    ``generator`` (the same numbers whatever the device), X first."""
    x = torch.randn(x_shape, generator=generator)
    y = torch.randn(y_shape, generator=generator)
    return x.to(device), y.to(device)


def fit(direction: Direction, w: torch.Tensor, targets: torch.Tensor, x0: torch.Tensor,
        y0: torch.Tensor, opts: FitOptions = FitOptions(), mode: str = "auto") -> FitResult:
    """Fit B problems at once at the weights ``w``: ``targets`` (B, d), starts ``x0``
    (B, *direction.x_shape), ``y0`` (B, *direction.y_shape)."""
    pack = Packing(direction.x_shape, direction.y_shape)
    fn = match_fn(direction, w, targets, opts, mode)
    z, loss = optimise(fn, pack.pack(x0, y0), opts)
    x, y = pack.unpack(z)
    return FitResult(x.contiguous(), y.contiguous(), loss)


def fit_sequential(direction: Direction, w: torch.Tensor, targets: torch.Tensor,
                   x0: torch.Tensor, y0: torch.Tensor, opts: FitOptions = FitOptions()
                   ) -> FitResult:
    """The reference: problem by problem with ``torch.optim.LBFGS`` (or plain GD) and an
    autograd double-backward closure, as the official code does."""
    w = w.detach()
    xs, ys, losses = [], [], []
    for u, xi, yi in zip(targets, x0, y0, strict=True):
        u = u.detach()
        u_norm = torch.linalg.vector_norm(u)
        x = xi.detach().clone().requires_grad_(True)
        y = yi.detach().clone().requires_grad_(True)
        leaf = w.clone().requires_grad_(True)

        def objective(x=x, y=y, u=u, u_norm=u_norm, leaf=leaf):
            return cosine_objective(direction.graph(leaf, x, y), u, u_norm, x, y,
                                    opts.lambd, opts.absolute)

        best_x, best_y, best = x.detach().clone(), y.detach().clone(), math.inf
        with torch.enable_grad():
            if opts.optimizer == "gd":
                for _ in range(opts.steps):
                    gx, gy = torch.autograd.grad(objective(), (x, y))
                    with torch.no_grad():
                        x.sub_(opts.lr * gx)
                        y.sub_(opts.lr * gy)
                    cur = float(objective().detach())
                    if math.isfinite(cur) and cur < best:
                        best_x, best_y, best = x.detach().clone(), y.detach().clone(), cur
            else:
                opt = torch.optim.LBFGS([x, y], lr=opts.lr, max_iter=opts.max_iter,
                                        history_size=opts.history_size)

                def closure(opt=opt, objective=objective, x=x, y=y):
                    opt.zero_grad()
                    j = objective()
                    j.backward(inputs=[x, y])
                    return j.detach()

                for _ in range(opts.steps):
                    opt.step(closure)
                    cur = float(closure())
                    if math.isfinite(cur) and cur < best:
                        best_x, best_y, best = x.detach().clone(), y.detach().clone(), cur
        xs.append(best_x)
        ys.append(best_y)
        losses.append(best)
    return FitResult(torch.stack(xs), torch.stack(ys),
                     torch.tensor(losses, dtype=torch.float64, device=w.device))


def scale(g: torch.Tensor, u: torch.Tensor) -> float:
    """s = <g, u> / ||g||^2 = argmin_s ||s g - u||^2; 0 when g = 0 or it is not finite."""
    gg = float(torch.dot(g, g))
    if not (gg > 0.0 and math.isfinite(gg)):
        return 0.0
    s = float(torch.dot(g, u)) / gg
    return s if math.isfinite(s) else 0.0
