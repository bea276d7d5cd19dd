"""The server half of a round: downlink, decode, aggregate, server step, evaluate.

Aggregation runs in client-id order whatever the number of ranks, so a run's numbers do
not depend on how clients were spread over ranks:

* ``mean``:     Delta = (1/|P|) sum_{i in P} D(m_i)            (3SFC, FedAvg-as-practised)
* ``weighted``: Delta = sum_{i in P} n_i D(m_i) / sum_{i in P} n_i   (FedAvg paper)
* ``majority``: Delta = sign(sum_{i in P} sign(D(m_i)))   (signSGD with majority vote,
  Bernstein et al. 2019; ties give 0)

then ``w^{t+1} = w^t + server.lr * Delta``.

``aggregate`` returns the step (the algorithm's server half,
:mod:`fedmpi.algorithms`, calls the same :func:`fedmpi.algorithms.base.average`);
:mod:`fedmpi.downlink` applies it (exactly, or through the downlink compressor) and
decides what the next broadcast carries. :meth:`Server.decode_uploads` splits a round's
gathered bytes into the algorithm's named uploads.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedmpi.algorithms.base import average
from fedmpi.compress import Compressor, Context, ModelSpec
from fedmpi.config import Config
from fedmpi.data import ArrayDataset, Normalizer
from fedmpi.models import FlatModel

TAG_SAMPLE = 301


def sample_participants(cfg: Config, round_: int) -> list[int]:
    """Clients of round ``round_``: a uniform subset of round(participation * N) >= 1."""
    n = cfg.data.num_clients
    if cfg.server.participation >= 1.0:
        return list(range(n))
    k = max(1, int(round(cfg.server.participation * n)))
    rng = np.random.default_rng([cfg.run.seed, TAG_SAMPLE, round_])
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


class Server:
    def __init__(self, cfg: Config, model: FlatModel, compressor: Compressor, spec: ModelSpec,
                 test: ArrayDataset, normalizer: Normalizer,
                 holdout: tuple[ArrayDataset, np.ndarray] | None = None):
        self.cfg = cfg
        self.model = model  # model.params is the authoritative global model w^t
        self.compressor = compressor
        self.spec = spec
        device = model.device
        self.test_x = torch.from_numpy(test.x).to(device)
        self.test_y = torch.from_numpy(test.y).to(device)
        self.normalize = normalizer
        #: the clients' held-out samples (data.client_holdout) and the client of each
        self.holdout = None
        if holdout is not None:
            ds, owner = holdout
            self.holdout = (torch.from_numpy(ds.x).to(device), torch.from_numpy(ds.y).to(device),
                            torch.from_numpy(owner).to(device))

    @property
    def params(self) -> torch.Tensor:
        return self.model.params

    def decode(self, round_: int, clients: list[int], sizes: list[int], buf: np.ndarray
               ) -> dict[int, torch.Tensor]:
        """Split the gathered bytes by ``sizes`` (clients in wire order), parse each payload
        and decode them all with one ``decode_many`` call (a compressor that batches it
        must decode every payload to the same bits whatever the batch)."""
        payloads, ctxs, offset = [], [], 0
        for cid, size in zip(clients, sizes, strict=True):
            ctx = Context(round=round_, client=cid, seed=self.cfg.run.seed, spec=self.spec,
                          global_params=self.params, model=self.model)
            payloads.append(self.compressor.parse(buf[offset:offset + size], ctx))
            ctxs.append(ctx)
            offset += size
        if offset != buf.size:
            raise RuntimeError(f"round {round_}: {buf.size - offset} undecoded uplink bytes")
        return dict(zip(clients, self.compressor.decode_many(payloads, ctxs), strict=True))

    def decode_uploads(self, round_: int, names: tuple[str, ...],
                       sent: list[tuple[int, tuple[int, ...]]], buf: np.ndarray
                       ) -> dict[str, dict[int, torch.Tensor]]:
        """The decoded uploads by name, then client id. ``sent``: (client, the byte size of
        each of its payloads in ``names`` order) in wire order; a client's payloads lie
        back to back in ``buf``, in that order."""
        clients = [cid for cid, _ in sent]
        if len(names) == 1:
            return {names[0]: self.decode(round_, clients, [s[0] for _, s in sent], buf)}
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        offset = 0
        for _, sizes in sent:
            for name, size in zip(names, sizes, strict=True):
                parts[name].append(buf[offset:offset + size])
                offset += size
        if offset != buf.size:
            raise RuntimeError(f"round {round_}: {buf.size - offset} undecoded uplink bytes")
        empty = np.zeros(0, dtype=np.uint8)
        return {name: self.decode(round_, clients, [s[i] for _, s in sent],
                                  np.concatenate(parts[name]) if parts[name] else empty)
                for i, name in enumerate(names)}

    def aggregate(self, updates: dict[int, torch.Tensor], num_samples: dict[int, int]
                  ) -> torch.Tensor:
        """server.lr * (mean or sample-weighted mean of the updates), summed by client id."""
        return average(updates, num_samples, self.cfg.server, self.params)

    @torch.no_grad()
    def _scores(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(per-sample correctness, summed cross-entropy) of the global model, batched."""
        bs = self.cfg.eval.batch_size
        correct, loss_sum = [], 0.0
        for i in range(0, int(y.shape[0]), bs):
            logits = self.model(self.normalize(x[i:i + bs]))
            loss_sum += float(F.cross_entropy(logits, y[i:i + bs], reduction="sum"))
            correct.append(logits.argmax(1) == y[i:i + bs])
        return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool), loss_sum

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of the global model on the test set, batched."""
        correct, loss_sum = self._scores(self.test_x, self.test_y)
        n = int(self.test_y.shape[0])
        return int(correct.sum()) / n, loss_sum / n

    def client_accuracy(self) -> np.ndarray | None:
        """The global model's accuracy on every client's holdout (NaN where a client holds
        none out), or None without ``data.client_holdout``."""
        if self.holdout is None:
            return None
        x, y, owner = self.holdout
        correct, _ = self._scores(x, y)
        n = self.cfg.data.num_clients
        hits = torch.bincount(owner, weights=correct.to(torch.float64), minlength=n)
        sizes = torch.bincount(owner, minlength=n).to(torch.float64)
        return (hits / sizes).cpu().numpy()
