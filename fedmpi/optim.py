"""The local SGD update, written once for every training path.

A client's step on the gradient g at the weights w (``client.*``; each part off at 0):

    g <- g * min(1, clip / (||g|| + 1e-12))     global-norm clipping (``grad_clip``)
    g <- g + wd w                               weight decay (``weight_decay``)
    m <- mu m + g;  g <- m                      momentum (``momentum``; a fresh buffer a round)
    w <- w - lr g

:class:`LocalSGD` holds the three settings and :meth:`LocalSGD.step` runs the rule on

* one client: flat (d,) vectors and a float ``lr`` (``ClientGroup.local_train``);
* B clients at once: rows of (B, d) and per-client rates ``lr`` of shape (B, 1)
  (``ClientGroup.train_batched``), the clipping norm taken per row.

Plain SGD (the three off) is the last line alone, :func:`descend_`; the hand-written dense
backprop (:class:`fedmpi.models.DenseBackprop`) fuses it into the backward pass layer by
layer: :func:`descend_` on each bias gradient and :func:`descend_product_` for each weight
gradient, the product ``e^T a`` that forms it.

The float operations and their order are those the three paths ran before they shared
this module, so the results are unchanged bit for bit: a float ``lr`` steps with
``add_(step, alpha=-lr)`` (one fused multiply-add), per-client rates with
``sub_(lr * step)``; the two agree to float rounding only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: added to the gradient norm before clipping divides by it
CLIP_EPS = 1e-12


def descend_(params: torch.Tensor, step: torch.Tensor, lr: float | torch.Tensor) -> None:
    """``params -= lr * step`` in place: ``lr`` a float, or per-client rates (B, 1) for
    rows of (B, d)."""
    if isinstance(lr, torch.Tensor):
        params.sub_(lr * step)
    else:
        params.add_(step, alpha=-lr)


def descend_product_(params: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     lr: float) -> None:
    """``params -= lr * (a @ b)`` in place, inside the product (plain SGD on a gradient
    that is a matrix product, without forming it)."""
    params.addmm_(a, b, alpha=-lr)


def clip_(grad: torch.Tensor, max_norm: float) -> None:
    """Scale ``grad`` in place to a norm of at most ``max_norm``: the whole vector for a
    (d,) gradient, each row for (B, d)."""
    norm = grad.norm() if grad.dim() == 1 else grad.norm(dim=1, keepdim=True)
    grad.mul_(torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0))


def sgd_step(params: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor | None,
             lr: float | torch.Tensor, weight_decay: float = 0.0, momentum: float = 0.0,
             grad_clip: float = 0.0) -> None:
    """One local SGD step on ``params`` in place (the rule in the module docstring).
    ``grad`` is overwritten (clipped, decayed); ``momentum_buf`` (None without momentum)
    is updated in place."""
    if grad_clip > 0:
        clip_(grad, grad_clip)
    if weight_decay > 0:
        grad.add_(params, alpha=weight_decay)
    step = grad
    if momentum_buf is not None:
        step = momentum_buf.mul_(momentum).add_(grad)
    descend_(params, step, lr)


@dataclass(frozen=True)
class LocalSGD:
    """A client's local optimiser: ``client.momentum``, ``weight_decay``, ``grad_clip``."""

    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 0.0

    @classmethod
    def of(cls, client: Any) -> LocalSGD:
        """From the ``[client]`` config."""
        return cls(client.momentum, client.weight_decay, client.grad_clip)

    @property
    def plain(self) -> bool:
        """No clipping, weight decay or momentum: ``w -= lr g`` alone (it may be fused
        into the backward pass, :meth:`fedmpi.models.FlatModel.sgd_step`)."""
        return self.momentum <= 0 and self.weight_decay <= 0 and self.grad_clip <= 0

    def buffer(self, params: torch.Tensor) -> torch.Tensor | None:
        """A fresh momentum buffer shaped like ``params`` (None without momentum)."""
        return torch.zeros_like(params) if self.momentum > 0 else None

    def step(self, params: torch.Tensor, grad: torch.Tensor,
             momentum_buf: torch.Tensor | None, lr: float | torch.Tensor) -> None:
        """:func:`sgd_step` with these settings."""
        sgd_step(params, grad, momentum_buf, lr, self.weight_decay, self.momentum,
                 self.grad_clip)
