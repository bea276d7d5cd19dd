"""What a fit takes (:class:`FitOptions`, the official code's defaults), gives back
(:class:`FitResult`), and the fit itself as a value a compressor hands to whoever runs it
(:class:`Solver`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch


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
