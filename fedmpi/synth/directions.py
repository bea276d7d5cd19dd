"""The vector a synthetic set (X, Y) produces at weights w: :class:`Gradient` (3SFC) or
:class:`Replay` (FedSynth), over a module seen as a function of flat weights
(:class:`SynthModel`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad


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
