"""Top-k with error feedback as the 3SFC authors' code runs it (Zhou et al., ICCV 2023;
Soptq/iccv23-3sfc ``fl_devices.Client.compute_topk`` / ``Server.aggregate_topk_compression``):
the "DGC" baseline of the 3SFC paper's Table 2 ("we set DGC to be the same as 3SFC"), a
per-tensor top-k of the error-feedback residual, without DGC's momentum correction,
clipping, masking or warm-up (fedmpi's :mod:`dgc` has those and stays the default).

Per parameter tensor of ``n`` entries: the ``max(int(n p), 1)`` entries of largest |r|,
sent exactly, on ``r = Delta + e`` (``compressor.ef = true``, the default here, as in the
code; ``e <- r - C(r)``). With ``budget_bytes > 0`` the share ``p`` is the largest for
which the payload fits the budget (the paper's "same bytes as 3SFC": 3,180 B on MNIST's
MLP), found once from the model's tensor sizes.

Payload, in wire order:

* ``values``  -- the kept entries, fp32: ``4 k``
* ``indices`` -- their flat positions, ``w = index_width(d)`` bytes each: ``w k``

Bytes: ``(4 + w) k`` with ``k = sum_l max(int(n_l p), 1)``. MLP on MNIST at the 3SFC
budget (3,180 B): k = 454 entries, 3,178 B (250.7x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedmpi.compress import wire
from fedmpi.compress.base import Compressor, ModelSpec
from fedmpi.compress.topk import TopK


def code_counts(sizes: list[int], p: float) -> list[int]:
    """The code's ``max(int(n p), 1)`` kept entries per tensor."""
    return [max(int(n * p), 1) for n in sizes]


def budget_share(sizes: list[int], budget: int, per_entry: int) -> float:
    """The largest ``p`` whose :func:`code_counts` fit ``budget`` bytes (at least one entry
    per tensor, whatever the budget)."""
    k = max(budget // per_entry, len(sizes))
    lo, hi = 0.0, 1.0
    for _ in range(64):  # sum(code_counts(p)) is non-decreasing in p: bisect
        mid = (lo + hi) / 2
        if sum(code_counts(sizes, mid)) <= k:
            lo = mid
        else:
            hi = mid
    return lo


class TopK3SFC(TopK):
    name = "topk_3sfc"
    ef_default = True  # the code always accumulates and subtracts dW_residual

    @dataclass(frozen=True)
    class Config:
        ratio: float = 0.01  #: the code's p (args.topk, default 0.01) per tensor
        #: bytes per upload; > 0 replaces ratio with the largest p whose payload fits
        budget_bytes: int = 0
        value_dtype: Literal["fp32"] = "fp32"  #: the code sends fp32 values

        def validate(self) -> None:
            wire.check_ratio(self.ratio)
            wire.check_budget(self.budget_bytes)

    def __init__(self, cfg: Config, spec: ModelSpec):  # TopK's codec, the code's counts
        Compressor.__init__(self, cfg, spec)
        self.vbytes = 4
        self.width = wire.index_width(spec.d)
        self.sizes = list(spec.sizes)
        share = (budget_share(self.sizes, cfg.budget_bytes, self.vbytes + self.width)
                 if cfg.budget_bytes > 0 else cfg.ratio)
        self.share = share  #: the p in use
        self.counts = code_counts(self.sizes, share)
        self.k = sum(self.counts)
