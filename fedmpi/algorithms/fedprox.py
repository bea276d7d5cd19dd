"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in
Heterogeneous Networks", MLSys 2020).

Client k minimises its local objective plus a proximal term that keeps it near the
round's global model, ``F_k(w) + mu/2 ||w - w^t||^2``, so every local gradient gains
``mu (w - w^t)``: ``w <- w - lr (g(w) + mu (w - w^t))`` (added to the minibatch gradient,
after the SAM estimator's descent hook, before clipping, weight decay and momentum).
``mu = 0`` is FedAvg. Server: FedAvg's aggregation.

Bytes: one payload, ``update`` (Delta = w_K - w^t through the configured compressor; 4 d
B uncompressed); no broadcast beside the model. State: none beyond FedAvg's.

Config: ``algorithm.mu`` (default 0.01; the paper tunes mu in {0.001, 0.01, 0.1, 1}).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedmpi.algorithms.base import Algorithm, ClientHalf


class FedProxClient(ClientHalf):
    corrects = True

    def begin(self, client, state, global_params, lr, steps):
        self._anchor = global_params  # w^t: the replica, unchanged while clients train
        return state

    def correct(self, grad, params):
        grad.add_(params - self._anchor, alpha=self.params.mu)


class FedProx(Algorithm):
    name = "fedprox"

    @dataclass(frozen=True)
    class Config:
        mu: float = 0.01  #: fedprox: proximal weight; local gradient + mu (w - w^t)

        def validate(self) -> None:
            from fedmpi.config import ConfigError

            if not (self.mu >= 0 and math.isfinite(self.mu)):
                raise ConfigError("algorithm.mu", f"must be >= 0 (got {self.mu})")

    Client = FedProxClient
