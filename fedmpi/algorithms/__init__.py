"""Federated algorithms: one module per method, registered here by config name
(``algorithm.name``). See :mod:`fedmpi.algorithms.base` for the API."""

from __future__ import annotations

from typing import Any

from fedmpi import registry
from fedmpi.algorithms.base import Algorithm, ClientHalf, ServerHalf
from fedmpi.algorithms.fedavg import FedAvg
from fedmpi.algorithms.fedprox import FedProx
from fedmpi.algorithms.scaffold import Scaffold

REGISTRY: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FedAvg,)}
REGISTRY[FedProx.name] = FedProx
REGISTRY[Scaffold.name] = Scaffold
registry.provide(algorithms=REGISTRY)  # what fedmpi.config checks algorithm.name against


def params_of(cfg: Any) -> Any:
    """The configured algorithm's own Config (its defaults when none was built)."""
    a = cfg.algorithm
    return a.params if a.params is not None else REGISTRY[a.name].Config()


def client_half(cfg: Any, spec: Any) -> ClientHalf:
    return REGISTRY[cfg.algorithm.name].Client(cfg, spec, params_of(cfg))


def server_half(cfg: Any, spec: Any) -> ServerHalf:
    return REGISTRY[cfg.algorithm.name].Server(cfg, spec, params_of(cfg))


__all__ = ["REGISTRY", "Algorithm", "ClientHalf", "ServerHalf", "client_half",
           "server_half"]
