"""Compressors: one module per method, registered here by config name.

``build(cfg.compressor, spec)`` returns the configured compressor, wrapped in
:class:`~fedmpi.compress.base.ErrorFeedback` when ``compressor.ef = true``.
"""

from __future__ import annotations

from fedmpi import registry
from fedmpi.compress.base import (
    Compressor,
    Context,
    EFState,
    ErrorFeedback,
    ModelSpec,
    Payload,
)
from fedmpi.compress.dgc import DGC
from fedmpi.compress.fedsynth import FedSynth
from fedmpi.compress.identity import Identity
from fedmpi.compress.qsgd import QSGD
from fedmpi.compress.randk import RandK
from fedmpi.compress.sfc3 import SFC3
from fedmpi.compress.signsgd import SignSGD
from fedmpi.compress.signsgd3sfc import SignSGD3SFC
from fedmpi.compress.stc import STC
from fedmpi.compress.stc3sfc import STC3SFC
from fedmpi.compress.topk import TopK
from fedmpi.compress.topk3sfc import TopK3SFC

REGISTRY: dict[str, type[Compressor]] = {cls.name: cls for cls in (Identity,)}
REGISTRY.update({cls.name: cls for cls in (TopK, RandK, DGC, SignSGD, STC, QSGD)})
REGISTRY.update({cls.name: cls for cls in (SFC3, FedSynth)})
# the 3SFC paper's baselines as its authors' code runs them (jobs/3sfc_table*.toml)
REGISTRY.update({cls.name: cls for cls in (TopK3SFC, SignSGD3SFC, STC3SFC)})
registry.provide(compressors=REGISTRY)  # the names fedmpi.config accepts


def build(cfg, spec: ModelSpec) -> Compressor:
    """The compressor named by a :class:`fedmpi.config.CompressorConfig`."""
    cls = REGISTRY[cfg.name]
    params = cfg.params if cfg.params is not None else cls.Config()
    comp = cls(params, spec)
    return ErrorFeedback(comp) if cfg.ef else comp


__all__ = ["REGISTRY", "Compressor", "Context", "EFState", "ErrorFeedback", "ModelSpec",
           "Payload", "build"]
