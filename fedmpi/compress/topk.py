"""Top-k sparsification (Aji & Heafield, EMNLP 2017; Stich et al., "Sparsified SGD with
memory", NeurIPS 2018), as in docs/algorithms.md §4.1.

Keep the ``k`` entries of largest magnitude, either over the whole vector (``per_layer =
false``: ``k = ceil(ratio * d)``) or within each parameter tensor (``per_layer = true``, as
the 3SFC code: ``k_l = ceil(ratio * n_l)``, at least 1 per tensor). With ``budget_bytes > 0``
the compressor keeps ``K = budget_bytes // (value + index bytes)`` entries instead (split
over the tensors in proportion to their sizes, at least 1 each). Biased: use it with error
feedback (``compressor.ef = true``).

Payload, in wire order:

* ``values``  -- the kept entries, fp32 (or fp16 with ``value_dtype = "fp16"``): ``k * v``
* ``indices`` -- their flat positions, ``w = index_width(d)`` little-endian bytes each

Bytes: exactly ``k * (v + w)`` with ``v`` = 4 (fp32) or 2 (fp16) and ``w = ceil(bits(d-1)/8)``
(3 bytes for both the MLP, d = 199,210, and ResNet-18, d = 11,169,162).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedmpi.compress import wire
from fedmpi.compress.base import Compressor, Context, ModelSpec, Payload


def segments(spec: ModelSpec, per_layer: bool) -> list[int]:
    """Sizes of the blocks selection runs over: the tensors, or the whole vector."""
    return list(spec.sizes) if per_layer else [spec.d]


def select_topk(magnitude: torch.Tensor, sizes: list[int], counts: list[int]) -> torch.Tensor:
    """Flat int64 indices of the ``counts[l]`` largest entries of each consecutive block."""
    if len(sizes) == 1:
        k = counts[0]
        if k >= sizes[0]:
            return torch.arange(sizes[0], device=magnitude.device)
        return torch.topk(magnitude, k, sorted=False).indices
    out, off = [], 0
    for n, k in zip(sizes, counts, strict=True):
        block = magnitude[off:off + n]
        if k >= n:
            out.append(torch.arange(off, off + n, device=magnitude.device))
        else:
            out.append(torch.topk(block, k, sorted=False).indices + off)
        off += n
    return torch.cat(out)


def scatter(d: int, indices: np.ndarray, values: np.ndarray, device) -> torch.Tensor:
    """A dense fp32 vector of ``d`` zeros with ``values`` at ``indices``."""
    out = torch.zeros(d, dtype=torch.float32)
    out[torch.from_numpy(indices)] = torch.from_numpy(values.astype(np.float32, copy=False))
    return out.to(device)


class TopK(Compressor):
    name = "topk"

    @dataclass(frozen=True)
    class Config:
        ratio: float = 0.01  #: keep fraction p: k = ceil(p*d), or ceil(p*n_l) per tensor
        #: bytes per upload; > 0 replaces ratio: k = budget_bytes // (value + index bytes)
        budget_bytes: int = 0
        per_layer: bool = True  #: top-k within each parameter tensor (>= 1 each), not global
        value_dtype: Literal["fp32", "fp16"] = "fp32"  #: wire type of the kept values

        def validate(self) -> None:
            wire.check_ratio(self.ratio)
            wire.check_budget(self.budget_bytes)

    def __init__(self, cfg: Config, spec: ModelSpec):
        super().__init__(cfg, spec)
        self.vbytes = wire.value_bytes(cfg.value_dtype)
        self.width = wire.index_width(spec.d)
        self.sizes = segments(spec, cfg.per_layer)
        self.counts = wire.sparse_counts(self.sizes, cfg.per_layer, cfg.ratio,
                                         cfg.budget_bytes, self.vbytes + self.width)
        self.k = sum(self.counts)

    def encode(self, update: torch.Tensor, state, ctx: Context):
        u = update.detach().reshape(-1)
        idx = select_topk(u.abs(), self.sizes, self.counts)
        values = u[idx].cpu().numpy()
        return Payload({"values": wire.encode_values(values, self.cfg.value_dtype),
                        "indices": wire.pack_indices(idx.cpu().numpy(), self.spec.d)}), state

    def decode(self, payload: Payload, ctx: Context) -> torch.Tensor:
        idx = wire.unpack_indices(payload["indices"], self.spec.d)
        return scatter(self.spec.d, idx, payload["values"], self.spec.device)

    def parse(self, buf: np.ndarray, ctx: Context) -> Payload:
        return Payload.from_bytes(buf, [
            ("values", wire.VALUE_DTYPES[self.cfg.value_dtype], self.k),
            ("indices", np.uint8, self.k * self.width)])
