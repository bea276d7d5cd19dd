"""The algorithm API: a federated method as one object with a client half and a server
half and explicit state (after fedjax's ``FederatedAlgorithm`` and FedLab's paired
Server/Client classes).

Round t, as :mod:`fedmpi.roles` drives it (docs/algorithm-api.md has a worked example):

* server half: :meth:`ServerHalf.broadcast` -- what the method sends every participant
  beside the model (SCAFFOLD's c; empty for FedAvg). Its bytes are counted as downlink.
* client half, on the client's rank: :meth:`ClientHalf.receive` gets that broadcast;
  for each participant :meth:`ClientHalf.begin` (w^t, the client's own state, its
  learning rate and step count), :meth:`ClientHalf.correct` on every local gradient
  (in place; FedProx's proximal term, SCAFFOLD's ``c - c_i``), and after training
  :meth:`ClientHalf.uploads`: the named vectors the client sends, in :attr:`uploads`
  order. Each goes through the configured compressor (and its error feedback, with its
  own residual per name) and is counted in the uplink bytes.
* server half: :meth:`ServerHalf.aggregate` gets the decoded uploads by name and client
  id and returns the global step; the configured downlink applies it to w^t (exactly or
  compressed). Whatever else the server keeps (c) is its state: :meth:`state_dict` /
  :meth:`load_state_dict` put it in the checkpoint.

Everything the half keeps per client lives in ``ClientState.algorithm`` (checkpointed
with the client's other state; ``None`` before its first round).

What an algorithm does *not* decide: the compressor (and EF), the downlink, the SAM
perturbation estimator and the local optimiser (SGD, momentum, clipping, weight decay).
Those are configured independently and compose with every algorithm; FedSAM, say, is
FedAvg with ``sam.name = "fedsam"``.

A new method is one file with a ``Config`` dataclass (its keys in the ``[algorithm]``
table, validated like a compressor's), a ``Client`` and a ``Server`` half, and one line
in :data:`fedmpi.algorithms.REGISTRY`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedmpi.compress import ModelSpec, Payload


def average(updates: dict[int, torch.Tensor], num_samples: dict[int, int], server_cfg: Any,
            like: torch.Tensor) -> torch.Tensor:
    """``server.lr`` x the ``server.aggregation`` of ``updates`` (summed in client-id
    order): the uniform mean, the sample-weighted mean, or sign(sum sign) (majority)."""
    clients = sorted(updates)
    if server_cfg.aggregation == "majority":  # signSGD with majority vote
        votes = torch.zeros_like(like)
        for cid in clients:
            votes.add_(torch.sign(updates[cid]))
        return votes.sign_().mul_(server_cfg.lr)
    if server_cfg.aggregation == "weighted":
        total = float(sum(num_samples[c] for c in clients))
        weights = [num_samples[c] / total for c in clients]
    else:
        weights = [1.0 / len(clients)] * len(clients)
    agg = torch.zeros_like(like)
    for cid, w in zip(clients, weights, strict=True):
        agg.add_(updates[cid], alpha=w)
    return agg.mul_(server_cfg.lr)


def mean(vectors: dict[int, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The plain mean of ``vectors``, summed in client-id order."""
    out = torch.zeros_like(like)
    for cid in sorted(vectors):
        out.add_(vectors[cid], alpha=1.0 / len(vectors))
    return out


def dense_fields(name: str, spec: ModelSpec) -> list[tuple[str, Any, int]]:
    """``Payload.from_bytes`` spec of one dense fp32 vector of the model's size."""
    return [(name, np.float32, spec.d)]


class ClientHalf:
    """What a client computes from w^t and its state. The base class is FedAvg's."""

    #: the named uplink payloads, in wire order; the first is the model update Delta
    uploads: ClassVar[tuple[str, ...]] = ("update",)

    def __init__(self, cfg: Any, spec: ModelSpec, params: Any):
        self.cfg = cfg  # the whole run config
        self.spec = spec
        self.params = params  # the algorithm's own Config

    def parse(self, buf: np.ndarray) -> Payload:
        """The server half's broadcast, from its bytes (empty by default)."""
        if buf.size:
            raise ValueError(f"algorithm {self.cfg.algorithm.name!r} expects no broadcast, "
                             f"got {buf.size} B")
        return Payload({})

    def receive(self, payload: Payload, round_: int) -> None:
        """The round's broadcast (once per round, on every client rank)."""

    def begin(self, client: int, state: Any, global_params: torch.Tensor, lr: float,
              steps: int) -> Any:
        """Client ``client`` starts training from w^t; returns its new state (``state`` is
        the one it left last time, None at first)."""
        return state

    #: whether :meth:`correct` changes the local gradient (False: the fused SGD path)
    corrects: ClassVar[bool] = False

    def correct(self, grad: torch.Tensor, params: torch.Tensor) -> None:
        """Alter the local gradient at the iterate ``params`` in place."""

    def upload(self, client: int, state: Any, update: torch.Tensor, lr: float,
               steps: int) -> tuple[dict[str, torch.Tensor], Any]:
        """After training: ``({name: vector}, new state)``, one vector per :attr:`uploads`
        name; ``update`` is Delta = w_K - w^t (learning rate included)."""
        return {"update": update}, state


class ServerHalf:
    """How the server combines the clients' uploads. The base class is FedAvg's."""

    def __init__(self, cfg: Any, spec: ModelSpec, params: Any):
        self.cfg = cfg
        self.spec = spec
        self.params = params

    def broadcast(self, round_: int) -> Payload:
        """Sent to every client rank at the top of ``round_`` (counted per participant)."""
        return Payload({})

    def aggregate(self, decoded: dict[str, dict[int, torch.Tensor]],
                  num_samples: dict[int, int], like: torch.Tensor) -> torch.Tensor:
        """The global step from the decoded uploads (by name, then client id)."""
        return average(decoded["update"], num_samples, self.cfg.server, like)

    def state_dict(self) -> dict[str, Any]:
        """Everything the server half carries between rounds (for the checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Algorithm:
    """A registry entry: the method's name, its config keys and its two halves."""

    name: ClassVar[str]

    @dataclass(frozen=True)
    class Config:
        """The method's own keys ([algorithm] table, beside ``name``)."""

        def validate(self) -> None:
            pass

    Client: ClassVar[type[ClientHalf]] = ClientHalf
    Server: ClassVar[type[ServerHalf]] = ServerHalf

    @classmethod
    def broadcasts(cls) -> bool:
        """Whether the server half sends a broadcast of its own (the round header then
        carries its size)."""
        return cls.Server.broadcast is not ServerHalf.broadcast

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Checks against the rest of the config (raise fedmpi.config.ConfigError). By
        default: a method that corrects the local gradient cannot train ``batched``."""
        if cls.Client.corrects and cfg.client.execution == "batched":
            from fedmpi.config import ConfigError

            raise ConfigError("client.execution", f"'batched' trains plain SGD only; use "
                              f"'auto' or 'sequential' with algorithm.name = {cls.name!r}")
