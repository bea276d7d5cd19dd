""""STC" as the 3SFC authors' code runs it (Zhou et al., ICCV 2023; Soptq/iccv23-3sfc
``fl_devices.Server.aggregate_stc_compression``): the STC baseline of the 3SFC paper's
Table 2, beside fedmpi's Sparse Ternary Compression (:mod:`stc`, Sattler et al. 2019),
which stays the default. It is not Sattler's STC: a top-k plus a signed remainder.

Per parameter tensor ``l`` of ``n`` entries, on the error-feedback residual ``r``
(``compressor.ef = true``, the default here, as in the code):

    n_pick = max(int(n p - n (1 - p) / 31), 1)        (p = ``ratio``, the code's 0.01)
    T      = the n_pick entries of largest |r|, sent exactly (value and position)
    U      = {j : |r_j| < min_{i in T} |r_i|}          (the unpicked entries below it)
    mu     = |mean_{j in U} r_j|                       (of the signed values)
    C(r)_j = r_j (j in T),  sign(r_j) mu (j in U),  0 otherwise (ties with the smallest
             picked magnitude that were not picked), sign(0) = 0

The code's budget rule makes ``n_pick`` 1 for any tensor when p < 1/32 (with p = 0.01,
``n p - n (1 - p) / 31 < 0``): one exact entry per tensor, every other entry as +-mu.

Payload, in wire order (``L`` tensors, ``k = sum_l n_pick_l``, fixed by the model):

* ``mu``      -- one fp32 per tensor: ``4 L``
* ``values``  -- the picked entries, fp32: ``4 k``
* ``indices`` -- their flat positions, ``w = index_width(d)`` bytes each: ``w k``
* ``mode``    -- 1 byte: 0 = sign bits, 1 = base-3 digits (some unpicked entry is 0)
* ``signs``   -- the signs of every entry (picked ones as 0), :func:`wire.pack_ternary`:
  ``ceil(d / 8)`` or ``ceil(d / 5)`` bytes

Bytes: ``4 L + (4 + w) k + 1 + ceil(d / 8 or 5)``. MLP on MNIST (d = 199,210, L = 6,
k = 6, w = 3): 24,969 B (31.9x) without zeros, 39,909 B (20.0x) with (the always-black
pixels' weights); the paper counts 32x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmpi.compress import wire
from fedmpi.compress.base import Compressor, Context, ModelSpec, Payload


def pick_count(n: int, p: float) -> int:
    """The code's ``max(int(n p - n (1 - p) / 31), 1)`` entries sent exactly."""
    return max(int(n * p - (n * (1 - p)) / 31), 1)


class STC3SFC(Compressor):
    name = "stc_3sfc"
    ef_default = True  # the code always accumulates and subtracts dW_residual

    @dataclass(frozen=True)
    class Config:
        ratio: float = 0.01  #: the code's p (args.topk, default 0.01)

        def validate(self) -> None:
            wire.check_ratio(self.ratio)

    def __init__(self, cfg: Config, spec: ModelSpec):
        super().__init__(cfg, spec)
        self.sizes = list(spec.sizes)
        self.counts = [pick_count(n, cfg.ratio) for n in self.sizes]
        self.k = sum(self.counts)
        self.width = wire.index_width(spec.d)
        self.fixed = 4 * len(self.sizes) + (4 + self.width) * self.k + 1

    def encode(self, update: torch.Tensor, state, ctx: Context):
        r = update.detach().reshape(-1)
        mus, picked, signs, off = [], [], torch.sign(r), 0
        for n, k in zip(self.sizes, self.counts, strict=True):
            block = r[off:off + n]
            top_v, top_i = torch.topk(block.abs(), k)
            rest = block.abs() < top_v[-1]
            mu = block[rest].mean().abs() if bool(rest.any()) else torch.zeros(())
            signs[off:off + n][~rest] = 0  # picked (sent exactly) or tied: no sign
            mus.append(float(mu))
            picked.append(top_i + off)
            off += n
        idx = torch.cat(picked)
        free = np.zeros(self.spec.d, dtype=bool)
        free[idx.cpu().numpy()] = True  # their values travel exactly
        mode, packed = wire.pack_ternary(signs.to(torch.int8).cpu().numpy(), free)
        return Payload({"mu": np.asarray(mus, dtype=np.float32),
                        "values": r[idx].cpu().numpy().astype(np.float32),
                        "indices": wire.pack_indices(idx.cpu().numpy(), self.spec.d),
                        "mode": np.asarray([mode], dtype=np.uint8), "signs": packed}), state

    def decode(self, payload: Payload, ctx: Context) -> torch.Tensor:
        d = self.spec.d
        out = torch.from_numpy(wire.unpack_ternary(int(payload["mode"][0]), payload["signs"], d))
        mu = torch.from_numpy(np.repeat(payload["mu"], self.sizes))
        out.mul_(mu)
        idx = torch.from_numpy(wire.unpack_indices(payload["indices"], d))
        out[idx] = torch.from_numpy(payload["values"])
        return out.to(self.spec.device)

    def parse(self, buf: np.ndarray, ctx: Context) -> Payload:
        buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
        if buf.size < self.fixed:
            raise ValueError(f"stc_3sfc payload too short: {buf.size} bytes")
        size = wire.ternary_size(self.spec.d, int(buf[self.fixed - 1]))
        return Payload.from_bytes(buf, [
            ("mu", np.float32, len(self.sizes)), ("values", np.float32, self.k),
            ("indices", np.uint8, self.k * self.width), ("mode", np.uint8, 1),
            ("signs", np.uint8, size)])
