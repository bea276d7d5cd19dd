"""Local training and encoding for the group of clients one rank owns.

Each client trains from the round's global model w^t with plain SGD (optional momentum,
weight decay, global-norm gradient clipping), either ``local_steps`` K minibatches (the
same K for every client) or ``local_epochs`` E full passes over its own shard (so clients
with more data take more steps). Minibatches are drawn by index from the client's shard
tensors in memory with ``numpy.random.default_rng([seed, TAG_BATCH, round, client])``:
no DataLoader, no per-sample Python. A client's learning rate is ``lr * lr_decay^n``
where n counts the rounds it has trained before, or ``lr * lr_decay^(n + 1)`` with
``client.lr_decay_first`` (the 3SFC code decays before every training, the first included).

The configured algorithm's client half (:mod:`fedmpi.algorithms`) may correct every
local gradient (FedProx, SCAFFOLD) and decides what the client uploads from the update
``Delta = w_K - w^t`` (descent direction, learning rate included): one or more named
vectors, each compressed with the client's own compressor state for that name. The
client also reports its mean training loss and the compression efficiency
``cos(decoded, target)`` of the first upload as telemetry outside the payload.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedmpi import algorithms
from fedmpi.compress import Compressor, Context, ModelSpec, Payload
from fedmpi.config import Config
from fedmpi.data import Normalizer, augmenter
from fedmpi.layout import equal_chunks
from fedmpi.models import FlatModel
from fedmpi.optim import LocalSGD
from fedmpi.sam import Estimator

TAG_BATCH = 201


@dataclass
class Shard:
    """One client's training samples on the rank's device (storage dtype)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at ``idx`` (storage dtype). ``index_select``, not ``x[index]``: the
        same rows in a third of advanced indexing's time."""
        index = torch.from_numpy(idx).to(self.x.device)
        return self.x.index_select(0, index), self.y.index_select(0, index)


@dataclass
class ClientState:
    """Everything a client carries between rounds; lives on the owning rank only."""

    compressor: Any = None  #: the compressor's state for the first upload (Delta)
    rounds_trained: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  #: the SAM estimator's
    algorithm: Any = None  #: the algorithm's client state (SCAFFOLD's c_i)
    #: the compressor's state for each further upload, by name (SCAFFOLD's "control")
    payloads: dict[str, Any] | None = None


#: divergence codes reported per client (0 = finite)
DIVERGED = {1: "training loss", 2: "client update", 3: "decoded update"}


@dataclass
class ClientResult:
    client: int
    payloads: dict[str, Payload]  #: by upload name, in the algorithm's wire order
    train_loss: float
    efficiency: float
    num_samples: int
    steps: int
    diverged: int = 0  #: a DIVERGED code; such a client sends no payload

    @property
    def payload(self) -> Payload:
        """The first upload's payload (the update Delta)."""
        return next(iter(self.payloads.values()), Payload({}))

    def to_bytes(self) -> np.ndarray:
        """Every payload's bytes, in wire order."""
        parts = [p.to_bytes() for p in self.payloads.values()]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


def batch_schedule(n: int, cfg: Config, round_: int, client: int) -> list[np.ndarray]:
    """Index batches for one client's round: K steps, or E epochs of ceil(n / B) batches."""
    c = cfg.client
    rng = np.random.default_rng([cfg.run.seed, TAG_BATCH, round_, client])
    b = min(c.batch_size, n)
    if c.local_epochs > 0:
        out = []
        for _ in range(c.local_epochs):
            perm = rng.permutation(n)
            out += [perm[i:i + b] for i in range(0, n, b)]
        return out
    need = c.local_steps * b
    stream = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])
    return [stream[i * b:(i + 1) * b] for i in range(c.local_steps)]


def client_lr(c, rounds_trained: int) -> float:
    """A client's learning rate for its next local training (``c``: the client config)."""
    return c.lr * c.lr_decay ** (rounds_trained + (1 if c.lr_decay_first else 0))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(a.norm()) * float(b.norm())
    return float(torch.dot(a, b)) / den if den > 0 else 0.0


class ClientGroup:
    def __init__(self, cfg: Config, shards: dict[int, Shard], model: FlatModel,
                 compressor: Compressor, spec: ModelSpec, normalizer: Normalizer,
                 estimator: Estimator, algorithm: algorithms.ClientHalf | None = None):
        self.cfg = cfg
        self.estimator = estimator
        self.algorithm = algorithm or algorithms.client_half(cfg, spec)
        self.shards = shards
        self.model = model
        model.use_backprop(cfg.client.backprop)
        self.compressor = compressor
        self.spec = spec
        self.normalize = normalizer
        self.states = {cid: ClientState(compressor.init_state(cid), payloads={
            name: compressor.init_state(cid) for name in self.algorithm.uploads[1:]})
            for cid in shards}
        self.global_params = torch.zeros_like(model.params)
        self.time_train = 0.0
        self.time_encode = 0.0
        self.probe = None  # a fedmpi.perturbation.Probe in rounds that measure the ascent

    @property
    def clients(self) -> list[int]:
        return sorted(self.shards)

    def set_global(self, flat: torch.Tensor) -> None:
        self.global_params.copy_(flat)

    def local_train(self, cid: int, round_: int) -> tuple[torch.Tensor, float, int]:
        """Train client ``cid`` from w^t; returns (update, mean loss, steps)."""
        c = self.cfg.client
        shard, state, model = self.shards[cid], self.states[cid], self.model
        lr = client_lr(c, state.rounds_trained)
        model.load(self.global_params)
        params, grad = model.params, model.grad
        sgd = LocalSGD.of(c)
        momentum = sgd.buffer(params)
        batches = batch_schedule(len(shard), self.cfg, round_, cid)
        augment = augmenter(self.cfg, round_, cid)  # data.augment (identity when off)
        loss_sum = torch.zeros((), device=params.device)
        est, alg = self.estimator, self.algorithm
        est.begin_client(cid, state, self.global_params, round_, lr=lr, steps=len(batches))
        state.algorithm = alg.begin(cid, state.algorithm, self.global_params, lr, len(batches))
        # plain SGD (no SAM, correction, clipping, weight decay or momentum): one fused step
        plain = est.plain and not alg.corrects and sgd.plain
        for k, idx in enumerate(batches):
            raw, yb = shard.take(idx)
            xb = self.normalize(augment(raw))
            if plain:
                loss_sum += model.sgd_step(xb, yb, lr)
                continue
            eps = est.perturbation(model, xb, yb, k)
            if k == 0 and self.probe is not None:  # the ascent at w^t vs the true one
                self.probe.record(cid, eps, est)
            if eps is not None:
                params.add_(eps)  # the gradient is taken at the perturbed point w + eps
            loss_sum += model.loss_grad(xb, yb)  # client.backprop: autograd or by hand
            with torch.no_grad():
                if eps is not None:
                    params.sub_(eps)
                est.descent(grad, k)
                if alg.corrects:
                    alg.correct(grad, params)
                sgd.step(params, grad, momentum, lr)
        state.rounds_trained += 1
        update = params - self.global_params
        return update, float(loss_sum) / len(batches), len(batches)

    def train_batched(self, cids: list[int], round_: int
                      ) -> list[tuple[torch.Tensor, float, int]]:
        """``local_train`` for several clients at once: one vmapped forward/backward per
        step over the clients' stacked weights (torch.func). Clients whose batch schedules
        have the same shape (same steps, same batch sizes) train together; the result
        equals the sequential path to float tolerance. Plain SGD (no SAM estimator)."""
        from torch.func import functional_call, grad_and_value, vmap

        c = self.cfg.client
        sgd = LocalSGD.of(c)
        module = self.model.module
        names = [n for n, _ in module.named_parameters()]
        sizes = [int(np.prod(s)) for s in self.model.shapes]

        def loss_of(flat, x, y):
            params = {n: t.view(shape) for n, t, shape in
                      zip(names, flat.split(sizes), self.model.shapes, strict=True)}
            return F.cross_entropy(functional_call(module, params, (x,)), y)

        step_fn = vmap(grad_and_value(loss_of))
        schedules = {cid: batch_schedule(len(self.shards[cid]), self.cfg, round_, cid)
                     for cid in cids}
        groups: dict[tuple, list[int]] = {}
        for cid in cids:
            groups.setdefault(tuple(len(b) for b in schedules[cid]), []).append(cid)
        out = {}
        for group in groups.values():
            w = self.global_params.expand(len(group), -1).clone()
            lrs = torch.tensor([client_lr(c, self.states[cid].rounds_trained)
                                for cid in group], device=w.device).unsqueeze(1)
            momentum = sgd.buffer(w)
            augments = [augmenter(self.cfg, round_, cid) for cid in group]
            loss_sum = torch.zeros(len(group), device=w.device)
            steps = len(schedules[group[0]])
            for k in range(steps):
                xs, ys = [], []
                for cid, augment in zip(group, augments, strict=True):
                    x, y = self.shards[cid].take(schedules[cid][k])
                    xs.append(self.normalize(augment(x)))
                    ys.append(y)
                g, loss = step_fn(w, torch.stack(xs), torch.stack(ys))
                loss_sum += loss.detach()
                sgd.step(w, g, momentum, lrs)  # per-client rates: row by row
            for i, cid in enumerate(group):
                self.states[cid].rounds_trained += 1
                out[cid] = (w[i] - self.global_params, float(loss_sum[i]) / steps, steps)
        return [out[cid] for cid in cids]

    def _codec_state(self, cid: int, name: str) -> Any:
        """Client ``cid``'s compressor state for upload ``name``."""
        state = self.states[cid]
        return state.compressor if name == self.algorithm.uploads[0] else state.payloads[name]

    def _set_codec_state(self, cid: int, name: str, value: Any) -> None:
        state = self.states[cid]
        if name == self.algorithm.uploads[0]:
            state.compressor = value
        else:
            state.payloads[name] = value

    def run_round(self, round_: int, participants: list[int], pool: Any = None
                  ) -> list[ClientResult]:
        """Train and encode this group's participating clients, in client-id order.

        ``client.execution``: ``sequential`` trains and encodes one client at a time;
        ``auto`` trains one at a time but encodes in chunks of at most
        ``compressor.batch_clients`` (1 for most compressors; 3SFC fits several clients at
        once), as equal as possible; ``batched`` trains and encodes all of the rank's
        participants together. A rank holds at most one chunk of updates.

        ``pool``: this rank's :class:`fedmpi.fitpool.FitPool` (None: fits stay here): the
        round's clients are encoded in one call, whose fit goes through the pool
        (:attr:`fedmpi.compress.base.Context.fit`), and the rank joins the pool once even
        when it encodes nothing.
        """
        chosen = set(participants)
        mine = [cid for cid in self.clients if cid in chosen]
        execution = self.cfg.client.execution
        chunk = {"sequential": 1, "batched": len(mine)}.get(
            execution, self.compressor.batch_clients)
        fit = None
        if pool is not None:  # pooled fits: one encode call per round (fedmpi.fitpool)
            chunk = len(mine)
            fit = pool.fit
        results = []
        for start, stop in equal_chunks(len(mine), chunk):
            cids = mine[start:stop]
            t0 = time.perf_counter()
            probed = self.probe.seconds if self.probe is not None else 0.0
            if execution == "batched":
                trained = self.train_batched(cids, round_)
            else:
                trained = [self.local_train(cid, round_) for cid in cids]
            t1 = time.perf_counter()
            if self.probe is not None:  # measuring is evaluation, not training
                t0 += self.probe.seconds - probed
            ctxs = [Context(round=round_, client=cid, seed=self.cfg.run.seed, spec=self.spec,
                            global_params=self.global_params, model=self.model, fit=fit)
                    for cid in cids]
            bad = {cid: (1 if not np.isfinite(loss) else 2) for cid, (u, loss, _) in
                   zip(cids, trained, strict=True)
                   if not (np.isfinite(loss) and bool(torch.isfinite(u).all()))}
            ok = [i for i, cid in enumerate(cids) if cid not in bad]
            vectors = {}  # the algorithm's uploads of the finite clients
            for i in ok:
                state = self.states[cids[i]]
                lr = client_lr(self.cfg.client, state.rounds_trained - 1)  # this round's
                vectors[cids[i]], state.algorithm = self.algorithm.upload(
                    cids[i], state.algorithm, trained[i][0], lr, trained[i][2])
            out = {name: iter(self.compressor.compress_many(
                [vectors[cids[i]][name] for i in ok],
                [self._codec_state(cids[i], name) for i in ok], [ctxs[i] for i in ok]))
                for name in self.algorithm.uploads}
            for cid, (_, loss, steps) in zip(cids, trained, strict=True):
                if cid in bad:  # reported, never encoded: its state stays as it was
                    results.append(ClientResult(cid, {}, loss, float("nan"),
                                                len(self.shards[cid]), steps, bad[cid]))
                    continue
                payloads, efficiency = {}, float("nan")
                for name in self.algorithm.uploads:
                    payload, state, decoded, target = next(out[name])
                    self._set_codec_state(cid, name, state)
                    payloads[name] = payload
                    if name == self.algorithm.uploads[0]:
                        efficiency = cosine(decoded, target)
                results.append(ClientResult(cid, payloads, loss, efficiency,
                                            len(self.shards[cid]), steps))
            self.time_train += t1 - t0
            self.time_encode += time.perf_counter() - t1
        if pool is not None and pool.joined != round_:
            # none of this rank's clients was encoded this round: join the pool with nothing
            t1 = time.perf_counter()
            pool.join_empty(round_, self.compressor.solver(self.model, self.global_params))
            self.time_encode += time.perf_counter() - t1
        return results
