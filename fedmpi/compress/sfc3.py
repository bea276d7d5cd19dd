"""3SFC: single-step synthetic features compressor (config name ``3sfc``).

Zhou, Shi, Li, Sun, Ye, Lv, "Communication-Efficient Federated Learning with Single-Step
Synthetic Features Compressor for Faster Convergence", ICCV 2023 (arXiv 2302.13562), and
its extension E-3SFC (TNNLS 2025, arXiv 2502.03092; official code ``Soptq/e-3sfc``).

Encoder (client): the target u (the update, plus the residual under error feedback, which
is on by default for 3SFC as in the paper and E-3SFC; it is the generic
:class:`~fedmpi.compress.base.ErrorFeedback` wrapper) is matched by the gradient of a tiny
synthetic batch at the round's global model w^t (not the trained local model):
(X, Y) = argmin 1 - |cos(grad_w CE(f_{w^t}(X), Y), u)| + lambda (||X||^2 + ||Y||^2) with
X (M samples of the dataset's input shape) and soft labels Y (M x C) starting from
N(0, 1), fitted by LBFGS for S outer steps keeping the best, or by plain gradient steps
(:mod:`fedmpi.synth`). Then g* = grad_w CE(f_{w^t}(X*), Y*) and the scale
s = <g*, u> / ||g*||^2 (0 when g* = 0), so s g* is the projection of u on g*; the EF
residual becomes u - s g*. A rank fits ``batch_clients`` clients together; with
:attr:`Context.fit <fedmpi.compress.base.Context.fit>` set (a fit pool,
:mod:`fedmpi.fitpool`) the call's fit runs there instead, by this compressor's
:meth:`SFC3.solver`; the compressor itself never holds a pool.

Decoder (server, and the client for EF / telemetry): s * grad_w CE(f_{w^t}(X), Y) on its
own copy of w^t; both sides run the same code on the same bits, so the server's decode is
bit-for-bit the client's.

Payload: ``x`` (M D_in fp32), ``y`` (M C fp32), ``scale`` (1 fp32); exactly
``4 (M (D_in + C) + 1)`` bytes, D_in = prod(input shape). MNIST + MLP (d = 199,210),
M = 1: 3,180 bytes, 250.6x smaller than the dense 796,840.

M comes from ``m``, or from a budget: ``budget`` floats give M = floor((budget - 1) /
(D_in + C)); ``budget_bytes`` gives budget = floor(bytes / 4) floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from fedmpi import synth
from fedmpi.compress.base import Compressor, Context, ModelSpec, Payload
from fedmpi.errors import ConfigError

TAG_SFC3 = 501  # random stream of the synthetic-feature start (X0, Y0)

Optimizer = Literal["lbfgs", "gd"]
EvalMode = Literal["auto", "vmap", "loop"]
SFC3EvalMode = Literal["auto", "factored", "vmap", "loop"]


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"compressor.{key}", message)


def samples_for_budget(floats: int, d_in: int, num_classes: int, key: str) -> int:
    """M = floor((floats - 1) / (D_in + C)); ConfigError naming ``key`` if M < 1."""
    m = (floats - 1) // (d_in + num_classes)
    _check(m >= 1, key, f"a budget of {floats} floats does not fit even one synthetic "
           f"sample: M = 1 needs D_in + C + 1 = {d_in + num_classes + 1} floats "
           f"({4 * (d_in + num_classes + 1)} bytes)")
    return m


def validate_fit(cfg: Any) -> None:
    """The fitting keys shared by 3sfc and fedsynth."""
    _check(cfg.m >= 1, "m", f"must be >= 1 (got {cfg.m})")
    _check(cfg.s_steps >= 1, "s_steps", f"must be >= 1 (got {cfg.s_steps})")
    _check(cfg.lr > 0 and math.isfinite(cfg.lr), "lr", f"must be > 0 (got {cfg.lr})")
    _check(cfg.max_iter >= 1, "max_iter", f"must be >= 1 (got {cfg.max_iter})")
    _check(cfg.lambd >= 0 and math.isfinite(cfg.lambd), "lambd",
           f"must be >= 0 (got {cfg.lambd})")
    _check(cfg.batch_clients >= 1, "batch_clients", f"must be >= 1 (got {cfg.batch_clients})")


def dense_chain(spec: ModelSpec) -> bool:
    """Parameter shapes of Linear layers chained from the flattened input to the classes
    (weight (out, in), bias (out), ...): the shape test of :class:`fedmpi.synth.Layers`."""
    shapes = list(spec.shapes)
    if not shapes or len(shapes) % 2:
        return False
    width = math.prod(spec.input_shape)
    for wt, bias in zip(shapes[0::2], shapes[1::2], strict=True):
        if len(wt) != 2 or wt[1] != width or tuple(bias) != (wt[0],):
            return False
        width = wt[0]
    return width == spec.num_classes


class SFC3(Compressor):
    name = "3sfc"
    ef_default: ClassVar[bool] = True  #: compressor.ef defaults to true (fedmpi.config)

    @dataclass(frozen=True)
    class Config:
        m: int = 1  #: synthetic samples M per payload (the official default)
        budget: int = 0  #: payload budget in fp32 floats -> M (0 = use m)
        budget_bytes: int = 0  #: payload budget in bytes -> M (0 = use m)
        s_steps: int = 10  #: S outer optimiser steps (LBFGS step calls or gradient steps)
        optimizer: Optimizer = "lbfgs"  #: lbfgs (official) | gd (plain gradient steps)
        lr: float = 1.0  #: LBFGS lr (torch default) or the gradient step size
        max_iter: int = 20  #: LBFGS iterations per outer step (torch default)
        lambd: float = 0.0  #: lambda of the lambda (||X||^2 + ||Y||^2) penalty (paper: 0)
        batch_clients: int = 16  #: clients of a rank fitted together in one batched fit
        #: how the batched fit evaluates its problems: factored (dense chains: mlp, logreg),
        #: vmap (GPU), loop (CPU); auto = factored where it applies, else vmap on a GPU
        #: and loop on a CPU
        eval_mode: SFC3EvalMode = "auto"

        def validate(self) -> None:
            validate_fit(self)
            _check(self.budget >= 0, "budget",
                   f"must be >= 0 floats, 0 = use m (got {self.budget})")
            _check(self.budget_bytes >= 0, "budget_bytes",
                   f"must be >= 0 bytes, 0 = use m (got {self.budget_bytes})")
            _check(not (self.budget and self.budget_bytes), "budget",
                   "give one of compressor.budget (floats) and compressor.budget_bytes")
            _check(self.m == 1 or not (self.budget or self.budget_bytes), "m",
                   "give either compressor.m or a budget (compressor.budget / budget_bytes)")

    tag: ClassVar[int] = TAG_SFC3  #: random stream of the starts (X0, Y0)
    fits: ClassVar[bool] = True  #: a fit may run in a fit pool (Context.fit, fedmpi.fitpool)

    def __init__(self, cfg: Any, spec: ModelSpec):
        super().__init__(cfg, spec)
        _check(bool(spec.input_shape) and spec.num_classes > 0, "name",
               f"{self.name} synthesises model inputs and needs the dataset's input shape "
               "and class count")
        self.d_in = math.prod(spec.input_shape)
        self.num_classes = spec.num_classes
        self.m = self.samples()
        _check(cfg.eval_mode != "factored" or dense_chain(spec), "eval_mode",
               "factored evaluation needs a chain of dense layers (model mlp or logreg)")
        self.batch_clients = cfg.batch_clients
        self.options = synth.FitOptions(steps=cfg.s_steps, optimizer=cfg.optimizer, lr=cfg.lr,
                                        max_iter=cfg.max_iter, lambd=cfg.lambd)
        probe = self.make_direction(None)
        self.x_shape, self.y_shape = probe.x_shape, probe.y_shape
        self._directions: dict[int, synth.Direction] = {}

    def samples(self) -> int:
        """M: ``m``, or what ``budget`` / ``budget_bytes`` buys."""
        cfg = self.cfg
        if cfg.budget:
            return samples_for_budget(cfg.budget, self.d_in, self.num_classes, "budget")
        if cfg.budget_bytes:
            return samples_for_budget(cfg.budget_bytes // 4, self.d_in, self.num_classes,
                                      "budget_bytes")
        return cfg.m

    def make_direction(self, sm: synth.SynthModel | None) -> synth.Direction:
        """The map (X, Y) -> vector that the payload encodes: one gradient at w^t."""
        return synth.Gradient(sm, self.m, tuple(self.spec.input_shape), self.num_classes)

    @property
    def payload_floats(self) -> int:
        return math.prod(self.x_shape) + math.prod(self.y_shape) + 1

    def direction(self, model: Any) -> synth.Direction:
        """The direction map of ``model`` (cached per model object)."""
        if model is None:
            raise ValueError(f"{self.name} needs Context.model (the FlatModel to "
                             "differentiate)")
        key = id(model)
        if key not in self._directions:
            direction = self.make_direction(synth.SynthModel(model))
            _check(self.cfg.eval_mode != "factored" or synth.Layers.of(direction) is not None,
                   "eval_mode", "factored evaluation needs a chain of dense layers "
                   "(model mlp or logreg)")
            self._directions[key] = direction
        return self._directions[key]

    # encode ------------------------------------------------------------------
    def encode(self, update: torch.Tensor, state: Any, ctx: Context) -> tuple[Payload, Any]:
        return self.encode_many([update], [state], [ctx])[0]

    def solver(self, model: Any, global_params: torch.Tensor) -> synth.Solver:
        """B problems' fit at ``global_params`` (w^t) with ``model``: what this rank runs
        for its own clients, and as a fit pool's leader for the pool's (same w^t)."""
        direction = self.direction(model)

        def solve(targets, x0, y0):  # (a pool hands over CPU tensors)
            dev = global_params.device
            return synth.fit(direction, global_params, targets.to(dev), x0.to(dev),
                             y0.to(dev), self.options, mode=self.cfg.eval_mode)

        return synth.Solver(solve, self.spec.d, direction.x_shape, direction.y_shape)

    def encode_many(self, updates, states, ctxs):
        if any(c.fit is not None for c in ctxs):  # one fit for the call (Context.fit)
            if any(c.fit != ctxs[0].fit or c.global_params is not ctxs[0].global_params
                   or c.model is not ctxs[0].model for c in ctxs):
                raise RuntimeError(f"a pooled {self.name} fit needs every client at the "
                                   "same w^t (and the same pool)")
            return [(p, s) for p, s in zip(self._encode_run(updates, ctxs), states,
                                           strict=True)]
        out: list[tuple[Payload, Any]] = []
        start = 0
        while start < len(ctxs):  # runs of clients that share w^t and the model
            stop = start + 1
            while (stop < len(ctxs) and ctxs[stop].global_params is ctxs[start].global_params
                   and ctxs[stop].model is ctxs[start].model):
                stop += 1
            out += [(p, s) for p, s in zip(
                self._encode_run(updates[start:stop], ctxs[start:stop]),
                states[start:stop], strict=True)]
            start = stop
        return out

    def _encode_run(self, updates: list[torch.Tensor], ctxs: list[Context]) -> list[Payload]:
        ctx0 = ctxs[0]
        w = ctx0.global_params
        direction = self.direction(ctx0.model)
        starts = [synth.init_xy(c.torch_generator(self.tag), direction.x_shape,
                                direction.y_shape, w.device) for c in ctxs]
        targets = torch.stack([u.detach().to(torch.float32) for u in updates])
        x0 = torch.stack([x for x, _ in starts])
        y0 = torch.stack([y for _, y in starts])
        if ctx0.fit is not None:  # elsewhere (a fit pool), by the same solver
            fit = ctx0.fit(ctx0.round, self.solver(ctx0.model, w), targets, x0, y0)
        else:
            fit = synth.fit(direction, w, targets, x0, y0, self.options,
                            mode=self.cfg.eval_mode)
        payloads = []
        for x, y, u in zip(fit.x, fit.y, updates, strict=True):
            fields = {"x": x.detach().to(torch.float32).cpu().numpy().reshape(-1).copy(),
                      "y": y.detach().to(torch.float32).cpu().numpy().reshape(-1).copy()}
            g = direction(w, *self._inputs(fields, w.device))  # the decoder's g*, same bits
            fields["scale"] = np.asarray([synth.scale(g, u)], dtype=np.float32)
            payloads.append(Payload(fields))
        return payloads

    # decode ------------------------------------------------------------------
    def _inputs(self, fields: dict[str, np.ndarray], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, Y) as fresh tensors (fresh: the same memory alignment on every rank)."""
        x = torch.from_numpy(fields["x"]).to(device).clone().view(self.x_shape)
        y = torch.from_numpy(fields["y"]).to(device).clone().view(self.y_shape)
        return x, y

    def decode(self, payload: Payload, ctx: Context) -> torch.Tensor:
        w = ctx.global_params
        g = self.direction(ctx.model)(w, *self._inputs(payload.fields, w.device))
        return g.mul_(float(payload["scale"][0]))

    def parse(self, buf: np.ndarray, ctx: Context) -> Payload:
        return Payload.from_bytes(buf, [("x", np.float32, math.prod(self.x_shape)),
                                        ("y", np.float32, math.prod(self.y_shape)),
                                        ("scale", np.float32, 1)])
