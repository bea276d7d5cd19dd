"""QSGD stochastic quantization (Alistarh, Grubic, Li, Tomioka & Vojnovic, "QSGD:
Communication-efficient SGD via gradient quantization and encoding", NeurIPS 2017), as in
docs/algorithms.md §4.6: the unbiased compressor.

The flat update is cut into buckets of ``bucket`` consecutive entries (0 = one bucket of
all ``d``). In a bucket ``v`` with ``s = levels``:
``Q(v)_j = ||v||_2 sign(v_j) xi_j / s``, where ``l = floor(s |v_j| / ||v||_2)`` and
``xi_j = l + 1`` with probability ``s |v_j| / ||v||_2 - l``, else ``l``, so ``E[Q(v)] = v``
(variance ``<= min(n / s**2, sqrt(n) / s) ||v||^2``). The uniforms come from a torch
generator seeded by ``numpy.random.default_rng([run.seed, TAG, round, client])``. No error
feedback needed.

Payload, in wire order (``B = ceil(d / bucket)`` buckets, ``c = 1 + ceil(log2(s + 1))``):

* ``norms`` -- ``||v||_2`` of each bucket, fp32: ``4 B`` bytes
* ``codes`` -- per entry ``2 xi_j + [v_j < 0]`` in ``c`` bits, LSB first: ``ceil(d c / 8)``

Bytes: ``ceil(d (1 + ceil(log2(s + 1))) / 8) + 4 ceil(d / bucket)`` (fixed-width levels;
the paper's Elias coding is smaller at small ``s``). ResNet-18, s = 1, bucket 512:
2,792,291 + 87,260 = 2,879,551 B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedmpi.compress import wire
from fedmpi.compress.base import Compressor, Context, ModelSpec, Payload
from fedmpi.errors import ConfigError

TAG_QSGD = 541
MAX_LEVELS = 2**16 - 1  # levels stay exact in fp32 arithmetic


class QSGD(Compressor):
    name = "qsgd"

    @dataclass(frozen=True)
    class Config:
        levels: int = 15  #: s, quantization levels per sign (s = 1: ternary)
        bucket: int = 512  #: entries per bucket with its own norm (0 = one bucket of all d)

        def validate(self) -> None:
            if not 1 <= self.levels <= MAX_LEVELS:
                raise ConfigError("compressor.levels", f"must be in [1, {MAX_LEVELS}] "
                                  f"(got {self.levels})")
            if self.bucket < 0:
                raise ConfigError("compressor.bucket", f"must be >= 0 (0 = whole vector; "
                                  f"got {self.bucket})")

    def __init__(self, cfg: Config, spec: ModelSpec):
        super().__init__(cfg, spec)
        self.bucket = cfg.bucket if 0 < cfg.bucket < spec.d else spec.d
        self.n_buckets = -(-spec.d // self.bucket)
        self.width = 1 + math.ceil(math.log2(cfg.levels + 1))

    def _buckets(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.n_buckets * self.bucket - x.numel()
        if pad:
            x = torch.cat([x, x.new_zeros(pad)])
        return x.reshape(self.n_buckets, self.bucket)

    def encode(self, update: torch.Tensor, state, ctx: Context):
        s = self.cfg.levels
        x = self._buckets(update.detach().reshape(-1).to(torch.float32))
        norms = torch.linalg.vector_norm(x, dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        # r = s |v_j| / ||v||; floor(r + U), U ~ U[0, 1), is l + 1 with probability r - l
        level = x.abs().mul_(s / safe[:, None])
        uniform = torch.rand(level.shape, generator=ctx.torch_generator(TAG_QSGD))
        level.add_(uniform.to(level.device)).floor_().clamp_(max=s)
        dtype = torch.uint8 if self.width <= 8 else torch.int64
        codes = level.to(dtype).mul_(2).add_((x < 0).to(dtype)).reshape(-1)[:self.spec.d]
        return Payload({"norms": norms.cpu().numpy().astype(np.float32),
                        "codes": wire.pack_uint(codes.cpu().numpy(), self.width)}), state

    def decode(self, payload: Payload, ctx: Context) -> torch.Tensor:
        d, s = self.spec.d, self.cfg.levels
        codes = wire.unpack_uint(payload["codes"], self.width, d)
        if self.width <= 8:  # a table of the 2**width code values: one gather
            table = np.arange(2 ** self.width)
            table = ((table >> 1) * (1.0 - 2.0 * (table & 1)) / s).astype(np.float32)
            out = torch.from_numpy(table[codes])
        else:
            c = torch.from_numpy(codes)
            out = (c >> 1).to(torch.float32).mul_(1.0 - 2.0 * (c & 1).to(torch.float32)) / s
        norms = torch.from_numpy(payload["norms"])
        full = d // self.bucket
        out[:full * self.bucket].view(full, self.bucket).mul_(norms[:full, None])
        if full < self.n_buckets:
            out[full * self.bucket:].mul_(norms[full])
        return out.to(self.spec.device)

    def parse(self, buf: np.ndarray, ctx: Context) -> Payload:
        return Payload.from_bytes(buf, [
            ("norms", np.float32, self.n_buckets),
            ("codes", np.uint8, wire.packed_size(self.spec.d, self.width))])
