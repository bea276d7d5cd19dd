"""Random-k sparsification (Stich et al., "Sparsified SGD with memory", NeurIPS 2018;
Wangni et al., NeurIPS 2018), as in docs/algorithms.md §4.2.

Keep a uniformly random k-subset of the ``d`` entries, ``k = ceil(ratio * d)`` (or what
``budget_bytes`` buys). ``scaled = true``: the decoder multiplies by ``d / k``, which makes
the compressor unbiased (``E[C(x)] = x``); ``scaled = false``: plain masking, a biased but
contractive compressor meant for error feedback (``compressor.ef = true``).

The subset is drawn from ``numpy.random.default_rng([run.seed, TAG, round, client])``.
With ``shared_seed = true`` the client sends an 8-byte seed instead of the indices and the
server regenerates the subset from the seed it read off the wire.

Payload, in wire order:

* ``values`` -- ``u[idx]`` (unscaled), fp32 (or fp16): ``k * v`` bytes
* ``seed``   -- (shared_seed) one uint64: 8 bytes; or
  ``indices`` -- (otherwise) ``w = index_width(d)`` bytes per index, sorted

Bytes: ``k * v + 8`` with a shared seed (``4k + 8`` in fp32), else ``k * (v + w)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedmpi.compress import wire
from fedmpi.compress.base import Compressor, Context, ModelSpec, Payload
from fedmpi.compress.topk import scatter

TAG_RANDK = 511


class RandK(Compressor):
    name = "randk"

    @dataclass(frozen=True)
    class Config:
        ratio: float = 0.01  #: keep fraction p: k = ceil(p * d) random entries
        #: bytes per upload; > 0 replaces ratio: k = (budget_bytes - 8) // value bytes with
        #: a shared seed, else budget_bytes // (value + index bytes)
        budget_bytes: int = 0
        scaled: bool = True  #: decode multiplies by d/k (unbiased); false = mask only (EF)
        shared_seed: bool = True  #: send an 8-byte seed instead of the k indices
        value_dtype: Literal["fp32", "fp16"] = "fp32"  #: wire type of the kept values

        def validate(self) -> None:
            wire.check_ratio(self.ratio)
            wire.check_budget(self.budget_bytes)

    def __init__(self, cfg: Config, spec: ModelSpec):
        super().__init__(cfg, spec)
        self.vbytes = wire.value_bytes(cfg.value_dtype)
        self.width = wire.index_width(spec.d)
        if cfg.shared_seed:
            per_entry, fixed = self.vbytes, 8
        else:
            per_entry, fixed = self.vbytes + self.width, 0
        (self.k,) = wire.sparse_counts([spec.d], False, cfg.ratio, cfg.budget_bytes,
                                       per_entry, fixed)
        self.scale = spec.d / self.k if cfg.scaled else 1.0

    def subset(self, seed: int) -> np.ndarray:
        """The sorted k-subset of [0, d) that ``seed`` stands for (client and server)."""
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(self.spec.d, size=self.k, replace=False))

    def encode(self, update: torch.Tensor, state, ctx: Context):
        seed = int(ctx.numpy_rng(TAG_RANDK).integers(0, 2**63 - 1))
        idx = self.subset(seed)
        u = update.detach().reshape(-1)
        values = u[torch.from_numpy(idx).to(u.device)].cpu().numpy()
        fields = {"values": wire.encode_values(values, self.cfg.value_dtype)}
        if self.cfg.shared_seed:
            fields["seed"] = np.array([seed], dtype="<u8")
        else:
            fields["indices"] = wire.pack_indices(idx, self.spec.d)
        return Payload(fields), state

    def decode(self, payload: Payload, ctx: Context) -> torch.Tensor:
        if self.cfg.shared_seed:
            idx = self.subset(int(payload["seed"][0]))
        else:
            idx = wire.unpack_indices(payload["indices"], self.spec.d)
        values = payload["values"].astype(np.float32)
        if self.scale != 1.0:
            values *= np.float32(self.scale)
        return scatter(self.spec.d, idx, values, self.spec.device)

    def parse(self, buf: np.ndarray, ctx: Context) -> Payload:
        last = (("seed", "<u8", 1) if self.cfg.shared_seed
                else ("indices", np.uint8, self.k * self.width))
        return Payload.from_bytes(buf, [
            ("values", wire.VALUE_DTYPES[self.cfg.value_dtype], self.k), last])
