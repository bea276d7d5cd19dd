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

Nothing is attached to the compressor or the client group: the group is handed the pool
(``ClientGroup.run_round(..., pool)``) and passes :meth:`FitPool.fit` to the compressor
in each client's :class:`~fedmpi.compress.base.Context` (``fit``); the compressor calls
it with its problems and its :class:`fedmpi.synth.Solver` (the fit at this rank's w^t),
which the leader runs on the whole pool's problems. All MPI traffic goes through
:class:`fedmpi.comm.NodePool`.

Exactness: a problem's fit is bit-identical whatever batch it is in (see
:mod:`fedmpi.synth`), and every rank holds the same w^t and the same model, so a pooled
run equals an unpooled one bit for bit. Every member joins the pool's collectives exactly
once per round, with zero problems when it has no participating client.

Each pool uses one slot of the gate only (:meth:`fedmpi.gate.Gate.pin`): the slot trains
the pool's clients one rank after another and then runs the leader's fit, the schedule
of one rank that owns all of them (``-n 41`` then runs like ``-n 3``). A member leaves
its slot while it waits for the leader (so the pool's other members can train and the
leader can take the slot to fit) and takes it again for the rest of its encoding.

Waiting without waking: a member would otherwise poll MPI for seconds per round (the
pool's training, then the leader's fit); at ``-n 41`` forty such pollers cost more CPU
than they save. Two :class:`Door` s per pool let members sleep in the kernel instead:
the *start* door keeps members from training until the leader has trained and is
receiving (so a member's send completes at once), the *done* door keeps them asleep
until the leader has posted their results. Traffic is point to point
(:class:`fedmpi.comm.NodePool`), so a sleeping member never holds up another's data.
The doors only decide when a member waits in MPI, never what it receives.
"""

from __future__ import annotations

import fcntl
import heapq
import math
import os

import numpy as np
import torch

from fedmpi import synth
from fedmpi.gate import Gate
from fedmpi.layout import equal_chunks


class Door:
    """An event the pool's leader signals and its members sleep on (``flock``, in the
    kernel: no CPU while waiting), once per join n. Two lock files alternate by the
    parity of n: the leader holds door n shut from before any member can reach it (door
    0 from setup, door n + 1 from the moment it opens door n), and opening n releases it;
    a member passes n by taking and dropping a shared lock. Every member joins every
    round, so all agree on n; a member from join n - 1 is past its door before the
    leader can reach join n (the round's gather to rank 0 orders them), so shutting
    door n + 1 never waits. A dead leader's locks are released by the kernel."""

    def __init__(self, paths: list[str], leader: bool):
        self.fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in paths]
        self.leader = leader
        if leader:
            fcntl.flock(self.fds[0], fcntl.LOCK_EX)

    def open(self, n: int) -> None:
        """Leader: shut door n + 1, then open door n."""
        fcntl.flock(self.fds[(n + 1) % 2], fcntl.LOCK_EX)
        fcntl.flock(self.fds[n % 2], fcntl.LOCK_UN)

    def wait(self, n: int) -> None:
        """Member: sleep until door n is open."""
        fcntl.flock(self.fds[n % 2], fcntl.LOCK_SH)
        fcntl.flock(self.fds[n % 2], fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)  # drops any lock held on it
        self.fds = []


class FitPool:
    """One rank's side of a pool (``link``: a :class:`fedmpi.comm.NodePool`; ``start``
    and ``done``: its :class:`Door` s)."""

    def __init__(self, link, gate: Gate, batch: int, start: Door, done: Door,
                 capacity: int = 0):
        self.link = link
        self.gate = gate
        self.start = start
        self.done = done
        self.joins = 0  # joins so far: the next join's number
        self.batch = max(1, batch)
        self.joined = -1  # the last round this rank joined
        self.fitted = 0  # problems this rank fitted for the pool (leader)
        # leader: the round's problems, in arrival order, in buffers kept across rounds
        # (``capacity`` rows to start with: the pool's clients; grown if ever short)
        self.capacity = max(0, capacity)
        self._targets: torch.Tensor | None = None  # (rows, d) float32
        self._starts: torch.Tensor | None = None  # (rows, nx + ny) float32
        self._arrived: list[tuple[int, int, int]] = []  # (member, first row, rows)

    @property
    def size(self) -> int:
        return self.link.size

    def join_empty(self, round_: int, solver: synth.Solver) -> None:
        """Join this round's pool with no problems (a member must join every round; the
        leader still fits the others' with ``solver``)."""
        self.fit(round_, solver, torch.zeros((0, solver.d)), torch.zeros((0, *solver.x_shape)),
                 torch.zeros((0, *solver.y_shape)))

    def before_round(self) -> None:
        """Before this rank takes its compute slot for a round: a member sleeps until the
        leader is receiving (the start door), so that the leader trains first."""
        if not self.link.leader:
            self.start.wait(self.joins)

    def close(self) -> None:
        self.start.close()
        self.done.close()

    def fit(self, round_: int, solver: synth.Solver, targets: torch.Tensor,
            x0: torch.Tensor, y0: torch.Tensor) -> synth.FitResult:
        """This rank's problems fitted by the pool (once per round, B may be 0); the
        leader fits every member's with its own ``solver`` (the members' w^t is its own).
        The :attr:`fedmpi.compress.base.Context.fit` of a pooled rank's clients."""
        if self.joined == round_:
            raise RuntimeError(f"round {round_}: a rank joined its fit pool twice (every "
                               "member must join exactly once per round)")
        self.joined = round_
        n = self.joins
        self.joins += 1
        d, x_shape, y_shape = solver.d, solver.x_shape, solver.y_shape
        nx, ny = math.prod(x_shape), math.prod(y_shape)
        b = int(targets.shape[0])
        send = np.concatenate([
            targets.detach().to(torch.float32).reshape(b, d).cpu().numpy(),
            x0.detach().to(torch.float32).reshape(b, nx).cpu().numpy(),
            y0.detach().to(torch.float32).reshape(b, ny).cpu().numpy()], axis=1).reshape(-1)
        held = self.gate.held >= 0
        self.gate.release()
        leader = self.link.leader
        parts = None
        if leader:
            self.start.open(n)  # members may train now: the leader is receiving
            self._arrived = []
            self.link.gather(send, lambda member, buf: self._take(solver, member, buf))
            parts = self._fit_all(solver)
        else:
            self.link.gather(send)
        door = (lambda: self.done.open(n)) if leader else (lambda: self.done.wait(n))
        out = self.link.scatter(parts, b * (nx + ny + 1), door).reshape(b, nx + ny + 1)
        if held:
            self.gate.acquire()
        device = targets.device
        res = torch.from_numpy(out)
        return synth.FitResult(
            res[:, :nx].to(torch.float32).reshape(b, *x_shape).to(device).contiguous(),
            res[:, nx:nx + ny].to(torch.float32).reshape(b, *y_shape).to(device).contiguous(),
            res[:, -1].to(device))

    def _take(self, solver: synth.Solver, member: int, buf: np.ndarray) -> None:
        """Leader: file one member's rows [u, x0, y0] (as they arrive) into the buffers."""
        d = solver.d
        rows = torch.from_numpy(buf).view(
            -1, d + math.prod(solver.x_shape) + math.prod(solver.y_shape))
        lo = self._filled
        hi = lo + rows.shape[0]
        if self._targets is None or self._targets.shape[0] < hi:
            self._grow(hi, lo, d, rows.shape[1] - d)
        self._targets[lo:hi] = rows[:, :d]
        self._starts[lo:hi] = rows[:, d:]
        self._arrived.append((member, lo, hi - lo))

    @property
    def _filled(self) -> int:
        """Rows filed so far this round."""
        return self._arrived[-1][1] + self._arrived[-1][2] if self._arrived else 0

    def _grow(self, rows: int, keep: int, d: int, width: int) -> None:
        n = max(rows, self.capacity, 2 * (0 if self._targets is None else len(self._targets)))
        targets, starts = torch.empty((n, d)), torch.empty((n, width))
        if keep:
            targets[:keep] = self._targets[:keep]
            starts[:keep] = self._starts[:keep]
        self._targets, self._starts = targets, starts

    def _fit_all(self, solver: synth.Solver) -> list[np.ndarray]:
        """Leader: fit the round's problems (in arrival order, in equal chunks of at most
        ``batch``); float64 [x, y, loss] rows per member, in member order."""
        total = self._filled
        x_shape, y_shape = solver.x_shape, solver.y_shape
        nx, ny = math.prod(x_shape), math.prod(y_shape)
        table = np.zeros((total, nx + ny + 1), dtype=np.float64)
        if total:
            out = torch.from_numpy(table)
            self.gate.acquire()
            try:
                for lo, hi in equal_chunks(total, self.batch):
                    starts = self._starts[lo:hi]
                    fit = solver(self._targets[lo:hi],
                                 starts[:, :nx].reshape(-1, *x_shape).clone(),
                                 starts[:, nx:].reshape(-1, *y_shape).clone())
                    out[lo:hi, :nx] = fit.x.reshape(hi - lo, nx).cpu()
                    out[lo:hi, nx:nx + ny] = fit.y.reshape(hi - lo, ny).cpu()
                    out[lo:hi, -1] = fit.loss.cpu()
            finally:
                self.gate.release()
            self.fitted += total
        parts: list[np.ndarray] = [np.zeros(0)] * self.size
        for member, lo, k in self._arrived:
            parts[member] = table[lo:lo + k].reshape(-1)
        return parts


def pooled(compressor) -> bool:
    """Whether ``compressor`` (error feedback included) fits synthetic features, so its
    fits can go through a pool (:attr:`fedmpi.compress.base.Compressor.fits`)."""
    return bool(getattr(compressor, "fits", False))


def split_pools(loads: dict[int, int], pools: int) -> dict[int, int]:
    """member -> pool: longest-processing-time on the members' loads (training samples),
    so the pools' slots train about as long as each other."""
    heap = [(0, p) for p in range(pools)]
    out = {}
    for member in sorted(loads, key=lambda r: (-loads[r], r)):
        load, p = heapq.heappop(heap)
        out[member] = p
        heapq.heappush(heap, (load + loads[member], p))
    return out


def open_pool(t, enabled: bool, gate: Gate, is_client: bool, batch: int, load: int = 0,
              clients: int = 0) -> FitPool | None:
    """Setup-time, on every rank of the job: this rank's pool, or None. Nothing else is
    changed (but ``gate``, pinned to the pool's slot): the caller hands the pool to its
    client group (``ClientGroup.run_round``).

    ``enabled``: ``run.pool_fits`` and a compressor that fits (3sfc, fedsynth);
    ``is_client``: this rank owns clients. The members are the client ranks of this node
    behind one gate; its slots split them into pools (:func:`split_pools` on ``load``,
    the training samples each owns), and each pool's ranks use only their own slot
    (:meth:`fedmpi.gate.Gate.pin`): a slot trains its pool's clients one rank after
    another and then runs the leader's fit, the schedule of one rank that owns all of
    them. ``clients``: the clients this rank owns (the leader sizes its buffers for the
    pool's total)."""
    if not enabled:
        return None
    info = t.node_allgather((gate.mask, is_client and gate.enabled, load, clients))
    members = [r for r, (m, on, _, _) in enumerate(info) if on and m == gate.mask]
    capacity = 0
    if t.local_rank in members:
        first = next(r for r, (m, *_) in enumerate(info) if m == gate.mask)
        pools = split_pools({r: info[r][2] for r in members}, len(gate.paths))
        slot = pools[t.local_rank]
        capacity = sum(info[r][3] for r in members if pools[r] == slot)
        color = first * len(info) + slot
    else:
        color = len(info) ** 2 + t.local_rank  # alone
    link = t.node_pool(color, t.local_rank)
    if link.size < 2:
        return None
    gate.pin(slot)  # a pool's members and its leader's fit take turns on one slot
    # the doors' files: the leader creates them (and shuts door 0 of each) before the
    # others open them; the names go once all have (the locks live on the open files)
    base = f"{gate.base}-pool{color}"
    paths = [[f"{base}-{kind}{i}" for i in range(2)] for kind in ("start", "done")]
    doors = []
    for step in (0, 1):
        if link.leader == (step == 0):
            doors = [Door(p, link.leader) for p in paths]
        link.barrier()
    if link.leader:
        for p in paths[0] + paths[1]:
            os.unlink(p)
    return FitPool(link, gate, batch, *doors, capacity=capacity)  # (buffers: leader only)
