"""Pooled synthetic-feature fits: the client ranks that share a node's cores fit together.

A 3SFC (or FedSynth) fit is many tiny LBFGS iterations whose cost is mostly per call, not
per problem: :func:`fedmpi.synth.fit` solves B problems in about the time of a few. A rank
with many clients batches its own; at ``mpiexec -n 41`` on a 2-core node every rank has
one client, and 40 single-problem fits would cost several times one batched fit of 20
on each core. With the compute gate on (:mod:`fedmpi.gate`, more ranks than cores), the
client ranks of one gate are split into as many pools as the gate has slots, and once
per round every member sends its problems (targets u and starts (X0, Y0), float32) to
the pool's first member, which fits them all (in equal chunks of at most
``compressor.batch_clients``) and sends each member its (X, Y) back. The scale, the
error-feedback residual and the payload are then computed by the member as always.

Exactness: a problem's fit is bit-identical whatever batch it is in (see
:mod:`fedmpi.synth`), and every rank holds the same w^t and the same model, so a pooled
run equals an unpooled one bit for bit. Every member joins the pool's collectives exactly
once per round, with zero problems when it has no participating client.

Each pool uses one slot of the gate only (:meth:`fedmpi.gate.Gate.pin`): the slot trains
the pool's clients one rank after another and then runs the leader's fit, the schedule
of one rank that owns all of them (``-n 41`` then runs like ``-n 3``). A member leaves
its slot while it waits for the leader (so the pool's other members can train and the
leader can take the slot to fit) and takes it again for the rest of its encoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from fedmpi import synth
from fedmpi.gate import Gate
from fedmpi.layout import equal_chunks

#: fits the problems (targets (B, d), x0 (B, *x), y0 (B, *y)) at this rank's w^t
Solver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], synth.FitResult]


class FitPool:
    """One rank's side of a pool (``link``: a :class:`fedmpi.comm.NodePool`)."""

    def __init__(self, link, gate: Gate, batch: int):
        self.link = link
        self.gate = gate
        self.batch = max(1, batch)
        self.solver: Solver | None = None  # set by the compressor (attach_pool)
        self.shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self.d = 0
        self.joined = -1  # the last round this rank joined
        self.fitted = 0  # problems this rank fitted for the pool (leader)

    @property
    def size(self) -> int:
        return self.link.size

    def bind(self, solver: Solver, d: int, x_shape: tuple[int, ...],
             y_shape: tuple[int, ...]) -> None:
        self.solver = solver
        self.d = d
        self.shapes = (tuple(x_shape), tuple(y_shape))

    def join_empty(self, round_: int) -> None:
        """Join this round's pool with no problems (a member must join every round)."""
        x_shape, y_shape = self.shapes
        self.fit(round_, torch.zeros((0, self.d)), torch.zeros((0, *x_shape)),
                 torch.zeros((0, *y_shape)))

    def fit(self, round_: int, targets: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor
            ) -> synth.FitResult:
        """This rank's problems fitted by the pool (once per round, B may be 0)."""
        if self.joined == round_:
            raise RuntimeError(f"round {round_}: a rank joined its fit pool twice (every "
                               "member must join exactly once per round)")
        self.joined = round_
        x_shape, y_shape = self.shapes
        nx, ny = math.prod(x_shape), math.prod(y_shape)
        b = int(targets.shape[0])
        send = np.concatenate([
            targets.detach().to(torch.float32).reshape(b, self.d).cpu().numpy(),
            x0.detach().to(torch.float32).reshape(b, nx).cpu().numpy(),
            y0.detach().to(torch.float32).reshape(b, ny).cpu().numpy()], axis=1).reshape(-1)
        held = self.gate.held >= 0
        self.gate.release()
        got = self.link.gather(b, np.ascontiguousarray(send, dtype=np.float32))
        parts = None
        if got is not None:
            parts = self._fit_all(*got, nx, ny)
        out = self.link.scatter(parts, b * (nx + ny + 1)).reshape(b, nx + ny + 1)
        if held:
            self.gate.acquire()
        device = targets.device
        res = torch.from_numpy(out)
        return synth.FitResult(
            res[:, :nx].to(torch.float32).reshape(b, *x_shape).to(device).contiguous(),
            res[:, nx:nx + ny].to(torch.float32).reshape(b, *y_shape).to(device).contiguous(),
            res[:, -1].to(device))

    def _fit_all(self, counts: np.ndarray, flat: np.ndarray, nx: int, ny: int
                 ) -> list[np.ndarray]:
        """Leader: fit every member's problems; float64 [x, y, loss] rows per member."""
        total = int(counts.sum())
        rows = torch.from_numpy(flat.reshape(total, self.d + nx + ny))
        x_shape, y_shape = self.shapes
        results = []
        if total:
            self.gate.acquire()
            try:
                for lo, hi in equal_chunks(total, self.batch):
                    chunk = rows[lo:hi]
                    fit = self.solver(chunk[:, :self.d].clone(),
                                      chunk[:, self.d:self.d + nx].reshape(-1, *x_shape).clone(),
                                      chunk[:, self.d + nx:].reshape(-1, *y_shape).clone())
                    results.append(torch.cat([fit.x.reshape(hi - lo, nx).double().cpu(),
                                              fit.y.reshape(hi - lo, ny).double().cpu(),
                                              fit.loss.double().cpu()[:, None]], 1))
            finally:
                self.gate.release()
            self.fitted += total
        table = (torch.cat(results).numpy() if results
                 else np.zeros((0, nx + ny + 1), dtype=np.float64))
        ends = np.cumsum(counts)
        return [table[e - c:e].reshape(-1) for c, e in zip(counts, ends, strict=True)]


def pooled(compressor) -> bool:
    """Whether ``compressor`` (or the one inside its error feedback) fits through a pool."""
    return hasattr(getattr(compressor, "inner", compressor), "attach_pool")


def open_pool(t, enabled: bool, gate: Gate, compressor, group, batch: int) -> FitPool | None:
    """Setup-time, on every rank of the job: this rank's pool, or None.

    ``enabled``: ``run.pool_fits`` and a compressor that fits (3sfc, fedsynth). The
    members are the client ranks of this node behind one gate; its slots split them into
    pools (member i of the gate's client ranks into pool i mod slots), and each pool's
    ranks use only their own slot (:meth:`fedmpi.gate.Gate.pin`): a slot trains its
    pool's clients one rank after another and then runs the leader's fit, the schedule
    of one rank that owns all of them."""
    if not enabled:
        return None
    is_client = group is not None
    info = t.node_allgather((gate.mask, is_client and gate.enabled))
    members = [r for r, (m, on) in enumerate(info) if on and m == gate.mask]
    if t.local_rank in members:
        first = next(r for r, (m, _) in enumerate(info) if m == gate.mask)
        slot = members.index(t.local_rank) % len(gate.paths)
        color = first * len(info) + slot
    else:
        color = len(info) ** 2 + t.local_rank  # alone
    link = t.node_pool(color, t.local_rank)
    if link.size < 2:
        return None
    gate.pin(slot)  # a pool's members and its leader's fit take turns on one slot
    pool = FitPool(link, gate, batch)
    inner = getattr(compressor, "inner", compressor)
    inner.attach_pool(pool, group.model, group.global_params)
    group.pool = pool
    return pool
