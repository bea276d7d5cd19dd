"""signSGD with error feedback as the 3SFC authors' code runs it (Zhou et al., ICCV 2023;
Soptq/iccv23-3sfc ``fl_devices.Server.aggregate_sign_compression``): the "signSGD"
baseline of the 3SFC paper's Table 2, beside fedmpi's EF-signSGD (:mod:`signsgd`, the
standard per-tensor ``||p||_1 / n`` scale of Karimireddy et al. 2019), which stays the
default.

With ``Delta`` the client's update of this round and ``r = Delta + e`` the error-feedback
residual after adding it (``compressor.ef = true``, the default here, as in the code):

    C(r) = s * sign(r),   s = ||Delta||_2 / ||sign(r)||_2,   sign(0) = 0

one global scale for the whole model; the error feedback subtracts what was sent
(``e <- r - C(r)``: the generic :class:`~fedmpi.compress.base.ErrorFeedback`, which hands
``Delta`` to the encoder in ``Context.update``). Without EF, ``r = Delta``.

``sign(0) = 0`` is a third symbol (the code sends zeros where the residual is exactly 0,
e.g. the weights of always-black MNIST pixels), so the signs travel as
:func:`~fedmpi.compress.wire.pack_ternary`: one bit per entry when no entry is 0, else five
base-3 digits per byte.

Payload, in wire order:

* ``scale`` -- fp32: 4 bytes
* ``mode``  -- 1 byte: 0 = sign bits, 1 = base-3 digits
* ``signs`` -- ``ceil(d / 8)`` bytes (bits) or ``ceil(d / 5)`` bytes (digits)

Bytes: ``5 + ceil(d / 8)`` when no entry of ``r`` is 0, else ``5 + ceil(d / 5)``. MLP on
MNIST (d = 199,210): 24,907 or 39,847 B (32.0x or 20.0x of fp32; the paper counts 32x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmpi.compress import wire
from fedmpi.compress.base import Compressor, Context, ModelSpec, Payload


class SignSGD3SFC(Compressor):
    name = "signsgd_3sfc"
    ef_default = True  # the code always accumulates and subtracts dW_residual

    @dataclass(frozen=True)
    class Config:
        def validate(self) -> None:
            pass

    def __init__(self, cfg: Config, spec: ModelSpec):
        super().__init__(cfg, spec)

    def encode(self, update: torch.Tensor, state, ctx: Context):
        r = update.detach().reshape(-1)
        delta = ctx.update.reshape(-1) if ctx.update is not None else r
        signs = torch.sign(r)
        den = signs.norm()
        scale = delta.norm() / den if float(den) > 0 else torch.zeros(())
        mode, packed = wire.pack_ternary(signs.to(torch.int8).cpu().numpy())
        return Payload({"scale": np.asarray([float(scale)], dtype=np.float32),
                        "mode": np.asarray([mode], dtype=np.uint8), "signs": packed}), state

    def decode(self, payload: Payload, ctx: Context) -> torch.Tensor:
        signs = wire.unpack_ternary(int(payload["mode"][0]), payload["signs"], self.spec.d)
        out = torch.from_numpy(signs).mul_(float(payload["scale"][0]))
        return out.to(self.spec.device)

    def parse(self, buf: np.ndarray, ctx: Context) -> Payload:
        buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
        if buf.size < 5:
            raise ValueError(f"signsgd_3sfc payload too short: {buf.size} bytes")
        size = wire.ternary_size(self.spec.d, int(buf[4]))
        return Payload.from_bytes(buf, [("scale", np.float32, 1), ("mode", np.uint8, 1),
                                        ("signs", np.uint8, size)])
