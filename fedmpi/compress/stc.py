"""Sparse Ternary Compression (Sattler, Wiedemann, Müller & Samek, "Robust and
communication-efficient federated learning from non-i.i.d. data", IEEE TNNLS 2019), as in
docs/algorithms.md §4.4 and ``felisat/federated-learning`` (``compression_utils.stc``).

Per tensor (``per_layer = true``, Sattler's code) or over the whole vector: keep the
``k_l = ceil(ratio * n_l)`` entries of largest magnitude, ``mu_l = mean |top-k_l values|``
and send ``+mu_l`` / ``-mu_l`` by the entry's sign (``u_j >= 0`` counts as +). Use it with
error feedback on the client (``compressor.ef = true``) and, for STC up/down, with
``compressor.downlink = "same"``: the server compresses its aggregated step with STC and a
server-side residual, and clients that skipped rounds are charged the cached payloads they
missed (:mod:`fedmpi.downlink`).

Payload, in wire order (``k = sum_l k_l`` is fixed by ``ratio`` and the model; ``L'`` is
the number of tensors, or 1 when ``per_layer = false``):

* ``mu``        -- one fp32 magnitude per tensor: ``4 L'`` bytes
* ``signs``     -- one bit per kept entry, in position order, 8 per byte: ``ceil(k / 8)``
* ``positions`` -- the sorted flat positions, Golomb-coded gaps with ``b = b*(k / d)``
  (:func:`fedmpi.compress.wire.golomb_parameter`): ``ceil((k b + sum_i ceil(gap_i / 2**b))
  / 8)`` bytes, variable; its length is whatever remains of the buffer.

Bytes: ``4 L' + ceil(k / 8) + ceil((k b + sum_i ceil(gap_i / 2**b)) / 8)``, in expectation
about ``k (b_bar + 1) / 8 + 4 L'`` with Sattler's ``b_bar = b + 1 / (1 - (1 - p)**(2**b))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmpi.compress import wire
from fedmpi.compress.base import Compressor, Context, ModelSpec, Payload
from fedmpi.compress.topk import segments, select_topk


class STC(Compressor):
    name = "stc"

    @dataclass(frozen=True)
    class Config:
        ratio: float = 0.0025  #: keep fraction p per tensor (Sattler et al.: 1/400)
        per_layer: bool = True  #: top-k and mu per parameter tensor (Sattler's code)

        def validate(self) -> None:
            wire.check_ratio(self.ratio)

    def __init__(self, cfg: Config, spec: ModelSpec):
        super().__init__(cfg, spec)
        self.sizes = segments(spec, cfg.per_layer)
        self.counts = wire.sparse_counts(self.sizes, cfg.per_layer, cfg.ratio)
        self.k = sum(self.counts)
        self.b = wire.golomb_parameter(self.k / spec.d)
        self.ends = np.cumsum(self.sizes)
        self.segment_of = np.repeat(np.arange(len(self.sizes)), self.counts)
        self.fixed = 4 * len(self.sizes) + (self.k + 7) // 8

    def encode(self, update: torch.Tensor, state, ctx: Context):
        u = update.detach().reshape(-1)
        mag = u.abs()
        idx = torch.sort(select_topk(mag, self.sizes, self.counts)).values
        kept = mag[idx]
        seg = torch.from_numpy(self.segment_of).to(u.device)
        sums = torch.zeros(len(self.sizes), dtype=torch.float32, device=u.device)
        sums.index_add_(0, seg, kept.to(torch.float32))
        mu = sums / torch.tensor(self.counts, dtype=torch.float32, device=u.device)
        neg = (u[idx] < 0).cpu().numpy()
        pos = idx.cpu().numpy()
        return Payload({"mu": mu.cpu().numpy().astype(np.float32),
                        "signs": wire.pack_bits(neg),
                        "positions": wire.golomb_encode(pos, self.b)}), state

    def decode(self, payload: Payload, ctx: Context) -> torch.Tensor:
        pos = wire.golomb_decode(payload["positions"], self.k, self.b)
        seg = np.searchsorted(self.ends, pos, side="right")
        if not np.array_equal(seg, self.segment_of):
            raise ValueError("stc positions do not match the per-tensor counts")
        neg = wire.unpack_bits(payload["signs"], self.k)
        values = payload["mu"][self.segment_of] * np.where(neg, -1.0, 1.0).astype(np.float32)
        out = torch.zeros(self.spec.d, dtype=torch.float32)
        out[torch.from_numpy(pos)] = torch.from_numpy(values.astype(np.float32))
        return out.to(self.spec.device)

    def parse(self, buf: np.ndarray, ctx: Context) -> Payload:
        buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
        if buf.size < self.fixed:
            raise ValueError(f"stc payload of {buf.size} bytes is shorter than its fixed "
                             f"part ({self.fixed} bytes)")
        return Payload.from_bytes(buf, [("mu", np.float32, len(self.sizes)),
                                        ("signs", np.uint8, (self.k + 7) // 8),
                                        ("positions", np.uint8, buf.size - self.fixed)])
