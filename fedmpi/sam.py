"""Perturbation estimators for sharpness-aware FL: "which direction should a client climb?"

An estimator knows nothing of compression (any estimator x any compressor). Hooks, in
the order a round calls them:

* server, start of round t: :meth:`Estimator.server_payload` -- extra downlink the
  estimator needs on the clients (empty by default; its bytes are counted as downlink);
* client rank: :meth:`Estimator.client_receive` with that payload;
* client, before local training: :meth:`Estimator.begin_client`;
* client, every local step k: :meth:`Estimator.perturbation` returns the flat ascent
  vector eps at the current iterate (or None for no ascent); the step's gradient is
  taken at ``w + eps``; then :meth:`Estimator.descent` may alter that gradient in place;
* server, after the step: :meth:`Estimator.server_round_end` with w^t and w^{t+1}.

``none`` is plain local SGD.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from fedmpi.compress import ModelSpec, Payload
from fedmpi.config import Config


class Estimator:
    """Base class; also the ``none`` estimator (no perturbation, no extra traffic)."""

    name: ClassVar[str] = "none"

    def __init__(self, cfg: Config, spec: ModelSpec):
        self.cfg = cfg
        self.spec = spec

    # server -----------------------------------------------------------------
    def server_payload(self, round_: int) -> Payload:
        return Payload({})

    def server_round_end(self, before: torch.Tensor, after: torch.Tensor, round_: int,
                         model: Any) -> None:
        return None

    # client rank ------------------------------------------------------------
    def parse(self, buf: np.ndarray, round_: int) -> Payload:
        if buf.size:
            raise ValueError(f"sam.name = {self.name!r} expects no downlink, got {buf.size} B")
        return Payload({})

    def client_receive(self, payload: Payload, round_: int) -> None:
        return None

    def begin_client(self, client: int, state: Any, global_params: torch.Tensor,
                     round_: int) -> None:
        return None

    def perturbation(self, model: Any, xb: torch.Tensor, yb: torch.Tensor,
                     step: int) -> torch.Tensor | None:
        return None

    def descent(self, grad: torch.Tensor, step: int) -> None:
        return None


ESTIMATORS: dict[str, type[Estimator]] = {"none": Estimator}


def build(cfg: Config, spec: ModelSpec) -> Estimator:
    return ESTIMATORS[cfg.sam.name](cfg, spec)
