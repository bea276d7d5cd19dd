"""The matching objective J(X, Y) = 1 - |cos(g(X, Y), u)| + penalty, batched over
problems, evaluated by ``factored`` (:class:`Layers`), ``vmap`` or ``loop``
(:func:`match_fn`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad_and_value, vmap

from fedmpi.models import dense_layers
from fedmpi.synth.directions import Direction, Gradient, SynthModel
from fedmpi.synth.options import FitOptions


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
