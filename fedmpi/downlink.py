"""How the global model reaches the client ranks' replicas each round.

Every rank builds the same initial model w^0 from ``run.seed``, so round 0 needs no
model broadcast to agree on w^0; each round's downlink then carries what changed.

* :class:`DenseDownlink` (``compressor.downlink = "dense"``, the default): the server
  broadcasts w^t as fp32 (field ``model``, 4 d bytes) at the start of every round and
  replicas copy it. A client that receives it needs nothing else.
* :class:`CompressedDownlink` (``compressor.downlink = "same"``): after aggregating, the
  server compresses its step with the uplink compressor's method and its *own* error-
  feedback residual (STC up/down, Sattler et al. 2019; E-3SFC double-way, Zhou et al.
  2025): ``u = server.lr * Delta + e_s;  m = C(u);  e_s <- u - D(m);  w^{t+1} = w^t + D(m)``.
  Only ``m`` is broadcast at the start of the next round; replicas add ``D(m)``. The
  server's model is exactly what clients reconstruct. A client that skipped rounds must
  download the payloads it missed (the partial-participation cache of STC), capped at the
  dense model size: :meth:`Downlink.client_bytes` accounts for that.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from fedmpi.compress import Compressor, Context, ErrorFeedback, ModelSpec, Payload


class Downlink(ABC):
    """Server and client halves of the downlink; one instance on every rank."""

    def __init__(self, spec: ModelSpec, seed: int):
        self.spec = spec
        self.seed = seed
        self.sizes: list[int] = []  # bytes broadcast in each round so far (server side)
        self.last_seen: dict[int, int] = {}  # client -> last round it received (server side)

    def dense_bytes(self) -> int:
        return 4 * self.spec.d

    def ctx(self, round_: int, params: torch.Tensor, model) -> Context:
        return Context(round=round_, client=-1, seed=self.seed, spec=self.spec,
                       global_params=params, model=model)

    # server ------------------------------------------------------------------
    def server_step(self, params: torch.Tensor, step: torch.Tensor, round_: int,
                    model=None) -> None:
        """Apply the aggregated ``step`` to the global ``params`` (in place)."""
        params.add_(step)

    @abstractmethod
    def server_payload(self, params: torch.Tensor, round_: int) -> Payload:
        """What to broadcast at the start of round ``round_``."""

    def client_bytes(self, participants: list[int], round_: int, nbytes: int) -> int:
        """Bytes the participants of ``round_`` must download (the cache rule above)."""
        self.sizes.append(nbytes)
        total = 0
        for cid in participants:
            first = self.last_seen.get(cid, -1) + 1
            total += min(self.dense_bytes(), sum(self.sizes[first:round_ + 1]))
            self.last_seen[cid] = round_
        return total

    # client ------------------------------------------------------------------
    @abstractmethod
    def parse(self, buf: np.ndarray, round_: int) -> Payload:
        """The payload broadcast at the start of ``round_``, from its bytes."""

    @abstractmethod
    def client_apply(self, payload: Payload, replica: torch.Tensor, round_: int,
                     model=None) -> None:
        """Bring ``replica`` (w^{t-1} or stale) to the round's global model w^t."""


class DenseDownlink(Downlink):
    def server_payload(self, params, round_):
        return Payload({"model": params.detach().to(torch.float32).cpu().numpy()})

    def client_bytes(self, participants, round_, nbytes):
        self.sizes.append(nbytes)
        return nbytes * len(participants)

    def parse(self, buf, round_):
        return Payload.from_bytes(buf, [("model", np.float32, self.spec.d)])

    def client_apply(self, payload, replica, round_, model=None):
        replica.copy_(torch.from_numpy(payload["model"]))


class CompressedDownlink(Downlink):
    def __init__(self, spec: ModelSpec, seed: int, compressor: Compressor):
        super().__init__(spec, seed)
        # the server residual below is this downlink's error feedback: an EF wrapper
        # (compressor.ef = true, meant for the uplink) would add the unsent part twice
        if isinstance(compressor, ErrorFeedback):
            compressor = compressor.inner
        self.compressor = compressor
        self.residual = torch.zeros(spec.d, dtype=torch.float32, device=spec.device)
        self.state = compressor.init_state(-1)
        self.pending = Payload({})  # round 0: nothing to send, w^0 is known everywhere

    def server_step(self, params, step, round_, model=None):
        ctx = self.ctx(round_, params, model)
        target = step + self.residual
        payload, self.state = self.compressor.encode(target, self.state, ctx)
        decoded = self.compressor.decode(payload, ctx)
        self.residual = target - decoded
        params.add_(decoded)
        self.pending = payload

    def server_payload(self, params, round_):
        return self.pending

    def parse(self, buf, round_):
        if buf.size == 0:
            return Payload({})
        return self.compressor.parse(buf, self.ctx(round_ - 1, None, None))

    def client_apply(self, payload, replica, round_, model=None):
        if payload.nbytes:
            replica.add_(self.compressor.decode(payload, self.ctx(round_ - 1, replica, model)))


def build(mode: str, spec: ModelSpec, seed: int, make_compressor) -> Downlink:
    """``dense`` or ``same`` (the uplink compressor's method, fresh state, server EF)."""
    if mode == "dense":
        return DenseDownlink(spec, seed)
    return CompressedDownlink(spec, seed, make_compressor())
