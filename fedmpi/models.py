"""Models and a flat-vector view of their parameters.

* ``mlp``: ``Linear(D_in, 200) - ReLU - Linear(200, 200) - ReLU - Linear(200, C)`` on the
  flattened input, as in the 3SFC code (``models/mlp.py``): 199,210 parameters on MNIST.
* ``logreg``: multinomial logistic regression, the model of FedProx's Synthetic(a, b).

:class:`FlatModel` re-seats every parameter (and its gradient) as a view into one
contiguous fp32 vector, so "load the global model", "compute the update" and "take an SGD
step" are single vector operations, and the flat order is the order of
``module.parameters()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedmpi.config import ModelConfig


def mlp(input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> nn.Module:
    d_in = int(np.prod(input_shape))
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d_in, cfg.hidden), nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
        nn.Linear(cfg.hidden, num_classes),
    )


def logreg(input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))


ModelFactory = Callable[[tuple[int, ...], int, ModelConfig], nn.Module]
MODELS: dict[str, ModelFactory] = {"mlp": mlp, "logreg": logreg}


def build_module(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int,
                 seed: int) -> nn.Module:
    """Instantiate ``cfg.name`` with its default init drawn from a private seeded stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[cfg.name](tuple(input_shape), num_classes, cfg)


def flops_per_sample(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds x 2 of one forward pass (Linear and Conv layers), by tracing shapes."""
    total = 0

    def hook(mod, inputs, output):
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += 2 * mod.in_features * mod.out_features
        elif isinstance(mod, nn.Conv2d):
            k = math.prod(mod.kernel_size) * mod.in_channels // mod.groups
            total += 2 * k * output[0].numel()

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            p = next(module.parameters())
            module(torch.zeros((1, *input_shape), dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
    return total


class FlatModel:
    """A module whose parameters and gradients are views into two flat fp32 vectors."""

    def __init__(self, module: nn.Module, device: torch.device | str = "cpu"):
        self.module = module.to(device)
        self.device = torch.device(device)
        params = list(self.module.parameters())
        self.shapes = [tuple(p.shape) for p in params]
        self.d = sum(p.numel() for p in params)
        self.params = torch.empty(self.d, dtype=torch.float32, device=self.device)
        self.grad = torch.zeros(self.d, dtype=torch.float32, device=self.device)
        offset = 0
        for p in params:
            n = p.numel()
            self.params[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.params[offset:offset + n].view_as(p)
            p.grad = self.grad[offset:offset + n].view_as(p)
            offset += n

    def load(self, flat: torch.Tensor) -> None:
        self.params.copy_(flat)

    def zero_grad(self) -> None:
        self.grad.zero_()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def named_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(p.shape)) for n, p in self.module.named_parameters()]
