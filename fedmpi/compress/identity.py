"""Identity "compressor": the dense update, as plain FedAvg (McMahan et al., AISTATS 2017).

Payload: ``values`` = the update as fp32. Bytes: exactly ``4 * d``.
"""

from __future__ import annotations

import numpy as np
import torch

from fedmpi.compress.base import Compressor, Context, Payload


class Identity(Compressor):
    name = "identity"

    def encode(self, update: torch.Tensor, state, ctx: Context):
        values = update.detach().to(torch.float32).cpu().numpy()
        return Payload({"values": values}), state

    def decode(self, payload: Payload, ctx: Context) -> torch.Tensor:
        return torch.from_numpy(payload["values"]).to(self.spec.device)

    def parse(self, buf: np.ndarray, ctx: Context) -> Payload:
        return Payload.from_bytes(buf, [("values", np.float32, self.spec.d)])
