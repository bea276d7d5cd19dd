"""Fitting (X, Y): the batched :func:`fit`, the reference :func:`fit_sequential`, the
official start :func:`init_xy` and the least-squares :func:`scale`."""

from __future__ import annotations

import math

import torch

from fedmpi.synth.directions import Direction
from fedmpi.synth.objective import Packing, cosine_objective, match_fn
from fedmpi.synth.optimizer import optimise
from fedmpi.synth.options import FitOptions, FitResult


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
