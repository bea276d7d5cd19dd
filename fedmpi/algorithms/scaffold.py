"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning", ICML 2020), option II control variates.

Server state: the control variate c (zero at the start). Client i's state: c_i (zero
before its first round). In round t, from x = w^t:

* client: K local steps ``y <- y - lr (g(y) - c_i + c)`` (the correction is added to the
  minibatch gradient after the SAM estimator's descent hook, before clipping, weight
  decay and momentum); then ``c_i+ = c_i - c + (x - y)/(K lr)`` (option II, K the steps
  taken, lr this round's client learning rate), uploads ``dy = y - x`` and
  ``dc = c_i+ - c_i``, keeps ``c_i <- c_i+``;
* server: ``x <- x + server.lr * mean(dy)`` (``server.aggregation``: mean or weighted;
  through the configured downlink), ``c <- c + (|S|/N) mean(dc)`` over the |S| clients
  that sent, N = data.num_clients; broadcasts c with the next round.

Bytes. Uplink: two payloads per participant, ``update`` (dy) and ``control`` (dc), each
through the configured compressor (with error feedback, each with its own residual): 8 d
B uncompressed, counted in ``uplink_bytes``. The client keeps its exact c_i+; the server
adds the *decoded* dc, so under a lossy compressor c follows the clients' c_i only as
error feedback lets it. Downlink: ``c`` as fp32, 4 d B per participant from round 1 on
(0 B in round 0, when c = 0 everywhere), counted in ``downlink_payload_bytes``.

Checkpointed: c (server half) and every c_i (client state).
"""

from __future__ import annotations

import torch

from fedmpi.algorithms.base import Algorithm, ClientHalf, ServerHalf, average, dense_fields, mean
from fedmpi.compress import Payload


class ScaffoldClient(ClientHalf):
    uploads = ("update", "control")
    corrects = True

    def __init__(self, cfg, spec, params):
        super().__init__(cfg, spec, params)
        self._c: torch.Tensor | None = None  # the broadcast c (None: zero)
        self._correction: torch.Tensor | None = None  # c - c_i of the client training

    def parse(self, buf):
        if buf.size == 0:
            return Payload({})
        return Payload.from_bytes(buf, dense_fields("c", self.spec))

    def receive(self, payload, round_):
        self._c = (torch.from_numpy(payload["c"]).to(self.spec.device)
                   if payload.nbytes else None)

    def begin(self, client, state, global_params, lr, steps):
        zero = torch.zeros_like(global_params)
        c = self._c if self._c is not None else zero
        self._correction = c - (state if state is not None else zero)
        return state

    def correct(self, grad, params):
        grad.add_(self._correction)

    def upload(self, client, state, update, lr, steps):
        zero = torch.zeros_like(update)
        c_i = state if state is not None else zero
        c = self._c if self._c is not None else zero
        c_new = c_i - c - update / (steps * lr)  # c_i - c + (x - y) / (K lr)
        return {"update": update, "control": c_new - c_i}, c_new


class ScaffoldServer(ServerHalf):
    def __init__(self, cfg, spec, params):
        super().__init__(cfg, spec, params)
        self.c: torch.Tensor | None = None

    def broadcast(self, round_):
        if self.c is None:
            return Payload({})
        return Payload({"c": self.c.detach().to(torch.float32).cpu().numpy()})

    def aggregate(self, decoded, num_samples, like):
        step = average(decoded["update"], num_samples, self.cfg.server, like)
        dc = decoded["control"]
        c = self.c if self.c is not None else torch.zeros_like(like)
        self.c = c + mean(dc, like) * (len(dc) / self.cfg.data.num_clients)
        return step

    def state_dict(self):
        return {"c": self.c.cpu() if self.c is not None else None}

    def load_state_dict(self, state):
        c = state["c"]
        self.c = c.to(self.spec.device) if c is not None else None


class Scaffold(Algorithm):
    name = "scaffold"
    Client = ScaffoldClient
    Server = ScaffoldServer

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        if cfg.server.aggregation == "majority":
            from fedmpi.config import ConfigError

            raise ConfigError("server.aggregation", "scaffold averages dy and dc; use "
                              "'mean' or 'weighted'")
