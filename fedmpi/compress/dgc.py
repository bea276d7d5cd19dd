"""Deep Gradient Compression (Lin, Han, Mao, Wang & Dally, ICLR 2018), as in docs/algorithms.md
§4.3 and the authors' code (``synxlin/deep-gradient-compression``: ``dgc/compression.py``,
``dgc/memory.py``), applied once per round to a client's update ``g = Delta_i``.

Per client, per round, per parameter tensor (state ``u``, ``v`` lives on the owning rank):

1. local gradient clipping (``clip_norm > 0``): scale the tensor of ``g`` to L2 norm
   ``<= clip_norm`` (DGC sets it to ``thr * N**-0.5`` for N workers);
2. momentum correction: ``u <- m u + g;  v <- v + u`` (Nesterov: ``u <- m (u + g);
   v <- v + u + g``); with ``momentum = 0`` this is plain residual accumulation
   ``v <- v + g``, which is how docs/algorithms.md §4.3 maps DGC to FL;
3. threshold: the top ``ratio_t`` share of ``|v|``, estimated on a strided sample of
   ``max(sample_ratio * n, 2 / ratio_t)`` entries (random start); if more than 1.3 k entries
   pass, the exact top-k of those is taken; if fewer than 0.8 k pass, the threshold is
   lowered by 0.8x (at most 10 times); at most ``k = ceil(ratio_t * n)`` entries are sent;
4. send ``v[mask]``; then ``v[mask] = 0`` and, with ``momentum_masking``, ``u[mask] = 0``;
5. warm-up: ``ratio_t = ratio ** ((t + 1) / (W + 1))`` in rounds ``t < W = warmup_rounds``
   (W = 4 gives 75%, 93.75%, 98.4%, 99.6%, then 99.9% sparsity at ratio 0.001).

``v`` *is* DGC's error feedback (with momentum correction on top), so DGC refuses the EF
wrapper (``compressor.ef = true`` would accumulate the unsent part twice) and a compressed
downlink (DGC is uplink-only); the config check names ``compressor.ef`` /
``compressor.downlink``. ``budget_bytes > 0`` sets the final ``K = budget_bytes //
(value + index bytes)`` (split over the tensors); ``ratio`` is then ``K / d``.

Payload, in wire order (n = entries sent this round, n <= sum_l k_l, read off the length):

* ``values``  -- ``v[mask]``, fp32 (or fp16): ``n * v`` bytes
* ``indices`` -- flat positions, ``w = index_width(d)`` bytes each

Bytes: exactly ``n * (v + w)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from fedmpi.compress import wire
from fedmpi.compress.base import Compressor, Context, ModelSpec, Payload
from fedmpi.compress.topk import scatter
from fedmpi.errors import ConfigError

TAG_DGC = 521
UPPER, LOWER, ADAPT_ITERS = 1.3, 0.8, 10  # DGC's threshold adaptation bounds


@dataclass
class DGCState:
    v: torch.Tensor  #: accumulated, not yet sent velocity
    u: torch.Tensor | None = None  #: momentum (None when momentum = 0)


def warmup_ratio(ratio: float, round_: int, warmup: int) -> float:
    """DGC's exponential warm-up: ``ratio ** ((t + 1) / (W + 1))`` for ``t < W``."""
    if round_ < warmup:
        return max(ratio ** ((round_ + 1) / (warmup + 1)), ratio)
    return ratio


def sampled_threshold(mag: torch.Tensor, ratio: float, k: int, sample_ratio: float,
                      rng: np.random.Generator) -> torch.Tensor:
    """Indices of at most ``k`` large entries of ``mag`` (one tensor), by DGC's rule."""
    n = mag.numel()
    if k >= n:
        return torch.arange(n, device=mag.device)
    want = max(math.ceil(n * sample_ratio), math.ceil(2.0 / ratio))
    if sample_ratio >= 1.0 or n <= want:
        return torch.topk(mag, k, sorted=False).indices
    stride = max(1, n // want)
    start = int(rng.integers(stride))
    samples = mag[start::stride]
    top = max(1, math.ceil(samples.numel() * ratio))
    threshold = torch.topk(samples, top, sorted=False).values.min()
    idx = torch.nonzero(mag >= threshold).reshape(-1)
    for _ in range(ADAPT_ITERS):
        if idx.numel() > k * UPPER:
            idx = idx[torch.topk(mag[idx], k, sorted=False).indices]
            break
        if idx.numel() >= k * LOWER:
            break
        threshold = threshold * LOWER
        idx = torch.nonzero(mag >= threshold).reshape(-1)
    return idx[:k]


class DGC(Compressor):
    name = "dgc"
    #: v is this compressor's own residual: the EF wrapper and a compressed downlink
    #: would accumulate the unsent part a second time (see fedmpi.config)
    own_residual: ClassVar[bool] = True

    @dataclass(frozen=True)
    class Config:
        ratio: float = 0.001  #: final keep fraction per tensor (DGC: 0.001 = 99.9% sparsity)
        #: bytes per upload after warm-up; > 0 replaces ratio: K = budget // (value + index B)
        budget_bytes: int = 0
        momentum: float = 0.0  #: momentum-correction factor m (DGC paper 0.9; 0 = off)
        nesterov: bool = False  #: Nesterov form of the momentum correction
        momentum_masking: bool = True  #: zero u where entries were sent (momentum factor masking)
        clip_norm: float = 0.0  #: local clipping: per-tensor L2 norm cap on g (0 = off)
        warmup_rounds: int = 0  #: W: exponential sparsity warm-up over the first W rounds
        sample_ratio: float = 0.01  #: share of each tensor sampled to estimate the threshold
        value_dtype: Literal["fp32", "fp16"] = "fp32"  #: wire type of the sent values

        def validate(self) -> None:
            wire.check_ratio(self.ratio)
            wire.check_budget(self.budget_bytes)
            if not 0.0 <= self.momentum < 1.0:
                raise ConfigError("compressor.momentum", f"must be in [0, 1) (got "
                                  f"{self.momentum})")
            if not (self.clip_norm >= 0 and math.isfinite(self.clip_norm)):
                raise ConfigError("compressor.clip_norm", f"must be >= 0 (got "
                                  f"{self.clip_norm})")
            if self.warmup_rounds < 0:
                raise ConfigError("compressor.warmup_rounds", f"must be >= 0 (got "
                                  f"{self.warmup_rounds})")
            wire.check_ratio(self.sample_ratio, "compressor.sample_ratio")

    def __init__(self, cfg: Config, spec: ModelSpec):
        super().__init__(cfg, spec)
        self.vbytes = wire.value_bytes(cfg.value_dtype)
        self.width = wire.index_width(spec.d)
        self.sizes = list(spec.sizes)
        self.final_counts = wire.sparse_counts(self.sizes, True, cfg.ratio, cfg.budget_bytes,
                                               self.vbytes + self.width)
        self.final_ratio = (cfg.ratio if cfg.budget_bytes <= 0
                            else sum(self.final_counts) / spec.d)

    def ratio_at(self, round_: int) -> float:
        return warmup_ratio(self.final_ratio, round_, self.cfg.warmup_rounds)

    def counts_at(self, round_: int) -> list[int]:
        """Entries per tensor sent at most in round ``round_``."""
        if round_ >= self.cfg.warmup_rounds:
            return self.final_counts
        r = self.ratio_at(round_)
        return [wire.ceil_count(r, n) for n in self.sizes]

    def init_state(self, client: int) -> DGCState:
        zeros = torch.zeros(self.spec.d, dtype=torch.float32, device=self.spec.device)
        u = zeros.clone() if self.cfg.momentum > 0 else None
        return DGCState(v=zeros, u=u)

    def _encode(self, update: torch.Tensor, state: DGCState, ctx: Context,
                want_target: bool = False):
        """(payload, new state, v before masking or None); the old state is untouched."""
        c = self.cfg
        g = update.detach().reshape(-1).to(torch.float32)
        if c.clip_norm > 0:
            g = g.clone()
            off = 0
            for n in self.sizes:
                block = g[off:off + n]
                norm = float(block.norm())
                if norm > c.clip_norm:
                    block.mul_(c.clip_norm / (norm + 1e-6))
                off += n
        u = None
        if c.momentum > 0:
            if c.nesterov:
                u = (state.u + g).mul_(c.momentum)
                v = state.v + u + g
            else:
                u = state.u * c.momentum + g
                v = state.v + u
        else:
            v = state.v + g
        target = v.clone() if want_target else None
        ratio, counts = self.ratio_at(ctx.round), self.counts_at(ctx.round)
        rng = ctx.numpy_rng(TAG_DGC)
        mag = v.abs()
        parts, off = [], 0
        for n, k in zip(self.sizes, counts, strict=True):
            parts.append(sampled_threshold(mag[off:off + n], ratio, k, c.sample_ratio, rng)
                         + off)
            off += n
        idx = torch.sort(torch.cat(parts)).values
        values = v[idx].cpu().numpy()
        v[idx] = 0.0
        if u is not None and c.momentum_masking:
            u[idx] = 0.0
        payload = Payload({"values": wire.encode_values(values, c.value_dtype),
                           "indices": wire.pack_indices(idx.cpu().numpy(), self.spec.d)})
        return payload, DGCState(v=v, u=u), target

    def encode(self, update: torch.Tensor, state: DGCState, ctx: Context):
        payload, new, _ = self._encode(update, state, ctx)
        return payload, new

    def compress_many(self, updates, states, ctxs):
        """As the base, but the efficiency target is the accumulated ``v`` (update +
        residual), the vector DGC tries to transmit."""
        out = []
        for upd, st, ctx in zip(updates, states, ctxs, strict=True):
            payload, new, target = self._encode(upd, st, ctx, want_target=True)
            out.append((payload, new, self.decode(payload, ctx), target))
        return out

    def decode(self, payload: Payload, ctx: Context) -> torch.Tensor:
        idx = wire.unpack_indices(payload["indices"], self.spec.d)
        return scatter(self.spec.d, idx, payload["values"], self.spec.device)

    def parse(self, buf: np.ndarray, ctx: Context) -> Payload:
        entry = self.vbytes + self.width
        if buf.size % entry:
            raise ValueError(f"dgc payload of {buf.size} bytes is not a whole number of "
                             f"{entry}-byte entries")
        n = buf.size // entry
        return Payload.from_bytes(buf, [
            ("values", wire.VALUE_DTYPES[self.cfg.value_dtype], n),
            ("indices", np.uint8, n * self.width)])
