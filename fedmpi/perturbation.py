"""Perturbation accuracy: how close is each client's ascent to the true global one?

FedSynSAM's claims C2 and C3 are about one quantity: the cosine between the ascent a
client climbs and the global SAM perturbation, the direction of the true global
gradient. Every ``eval.perturbation_every`` rounds (and at the last round), in round t:

1. rank 0 computes the true global gradient ``g = grad F(w^t)``, F the mean
   cross-entropy over a fixed seeded subset (``eval.perturbation_samples`` samples,
   drawn once with ``eval.subset_seed``: :func:`subset`) of the union of the clients'
   training samples (each sample once), full batch, in eval mode, without weight decay
   (no estimator's ascent has any) (:meth:`Meter.gradient`);
2. ``g`` reaches the client ranks by a broadcast that is simulator plumbing, not federated
   traffic: a real client never sees g, it is the yardstick. It is not counted in
   ``downlink_bytes`` (:meth:`fedmpi.comm.Transport.bcast_plumbing`);
3. every participating client records, at its first local step (iterate w^t),
   ``cos(eps_0, g)`` for the ascent eps_0 its estimator returns (:class:`Probe`; NaN where
   it climbs nothing: FedAvg, or ``sam.round0 = "sgd"`` before there is history), and a
   FedSynSAM client that fits its own S (``synth_site = "client"``) that fit's cosine;
4. a pickled gather brings those values to rank 0 (plumbing again).

Rank 0 also records ``cos(w^{t-1} - w^t, g)``: the previous global update as an ascent
estimate (what the official FedLESAM climbs), in every run whatever its estimator, so
compressors can be compared on it from FedAvg runs too.

Columns: ``/clients/perturb_cos`` (round x client), ``/rounds/perturb_cos`` (mean over the
clients that climbed), ``/rounds/perturb_cos_update``, ``/rounds/synth_fit_cos`` (FedSynSAM:
cosine of the fitted S's direction with the trajectory segment it was fitted to, for the S
the round's clients use; every round for the server site, the mean over the round's
fitting clients in measured rounds for the client site). All of this is timed into
``time_eval``: rank 0's gradient, broadcast and gather, plus the slowest client rank's
cosines, which are left out of its ``time_train``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from fedmpi import sharpness


def due(ev: Any, round_: int, rounds: int) -> bool:
    """Whether round ``round_`` measures (every ``ev.perturbation_every`` and the last)."""
    every = ev.perturbation_every
    return bool(every) and ((round_ + 1) % every == 0 or round_ == rounds - 1)


def union(parts: list[np.ndarray]) -> np.ndarray:
    """Every training row some client holds, once, sorted."""
    return np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))


def subset(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray], size: int, seed: int,
           device: torch.device | str = "cpu") -> sharpness.Subset:
    """The fixed subset g is computed on: ``size`` rows of the clients' union, drawn as
    :func:`fedmpi.sharpness.fixed_subset` draws (the same rows as the sharpness subset
    when the clients hold every training row and the sizes agree)."""
    return sharpness.fixed_subset(x, y, size, seed, device, among=union(parts))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(a.norm()) * float(b.norm())
    return float(torch.dot(a, b)) / den if den > 0 else float("nan")


class Meter:
    """Rank 0's half: the subset, the true gradient, the previous global model."""

    def __init__(self, module: torch.nn.Module, data: sharpness.Subset, normalize,
                 batch_size: int):
        self.module = module
        self.data = data
        self.normalize = normalize
        self.batch_size = batch_size
        self.previous: torch.Tensor | None = None  #: w^{t-1}, kept after every server step

    def gradient(self) -> torch.Tensor:
        """grad F at the module's current weights (w^t), flat in parameter order."""
        was_training = self.module.training
        self.module.eval()
        try:
            obj = sharpness.model_objective(self.module, self.data.x, self.data.y,
                                            self.batch_size, self.normalize)
            return obj.grad().detach()
        finally:
            self.module.train(was_training)

    def update_cosine(self, params: torch.Tensor, g: torch.Tensor) -> float:
        """cos(w^{t-1} - w^t, g); NaN in round 0 (or right after a resume without it)."""
        if self.previous is None:
            return float("nan")
        return cosine(self.previous - params, g)


class Probe:
    """A client rank's half for one measured round: cos(eps_0, g) per client."""

    def __init__(self, g: torch.Tensor):
        self.g = g
        self.values: dict[int, tuple[float, float]] = {}  # client -> (cos, fit cos)
        self.seconds = 0.0

    def record(self, client: int, eps: torch.Tensor | None, estimator: Any) -> None:
        t0 = time.perf_counter()
        cos = cosine(eps, self.g) if eps is not None else float("nan")
        self.values[client] = (cos, estimator.client_fit_cosine())
        self.seconds += time.perf_counter() - t0

    def report(self) -> tuple[dict[int, tuple[float, float]], float]:
        return self.values, self.seconds


def summarize(reports: list[tuple[dict[int, tuple[float, float]], float]], num_clients: int
              ) -> tuple[np.ndarray, float, float, float]:
    """Gathered :meth:`Probe.report`s -> (per-client cosines, their mean over the clients
    that climbed, the mean client-site fit cosine, the slowest rank's seconds)."""
    cos = np.full(num_clients, np.nan)
    fit = np.full(num_clients, np.nan)
    seconds = 0.0
    for values, secs in reports:
        seconds = max(seconds, secs)
        for cid, (c, f) in values.items():
            cos[cid], fit[cid] = c, f
    # means in client-id order: the same bits on any number of ranks
    return cos, _mean(cos), _mean(fit), seconds


def _mean(x: np.ndarray) -> float:
    finite = x[np.isfinite(x)]
    return float(finite.mean()) if finite.size else float("nan")
