"""MPI transport: the only module that imports mpi4py.

Round-loop traffic is buffer-mode and uppercase only (no pickling, no padding):

* ``bcast_header``  -- a small int64 round header (control bits, sizes, participants),
                       rank 0 -> all;
* ``bcast_payload`` -- the downlink payload bytes (``MPI.BYTE``), rank 0 -> all;
* ``gather_meta``   -- one fixed-size float64 record per rank (payload sizes and telemetry
                       that is *not* part of the counted payload), all -> rank 0 (with
                       polled waits point to point, so rank 0 knows who has reported);
* ``gatherv_payloads`` -- the concatenated raw payload bytes of every rank's participating
                       clients (``MPI.BYTE``, exact per-rank counts), all -> rank 0.

Counters: ``moved`` holds the bytes each call actually moved this round: for a broadcast,
buffer bytes x client ranks that receive it (rank 0 counts as a receiver when it owns
clients itself, e.g. with one process); for the payload gather, the sum of the receive
counts. Setup-time traffic (config agreement, data shards) may use pickled objects and is
not counted.

Waiting: with ``mpi_wait = "sleep"`` (the default) every collective is started
nonblocking and polled with ``Test`` and a sleep that doubles from 20 us up to
``mpi_poll_max_ms``, so a rank that waits (the server while clients train, a client rank
while others finish) yields its core instead of spinning; MPICH's blocking collectives
busy-poll. ``"block"`` uses the blocking calls.

A polled wait of the round loop gives up after ``wait_limit`` seconds (``run.round_timeout``,
:class:`RoundLimit`) with :class:`WaitTimeout`, which names the ranks that did not report;
fedmpi.train then aborts the job, so a frozen rank cannot hold it for ever.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

SERVER = 0


@dataclass
class Counters:
    uplink: int = 0  #: payload bytes gathered (Gatherv receive counts)
    downlink: int = 0  #: payload bytes broadcast x receiving client ranks
    meta: int = 0  #: header + per-rank record bytes (not part of any payload)
    per_rank_uplink: list[int] = field(default_factory=list)


def _displacements(counts: np.ndarray) -> np.ndarray:
    """Where each rank's block starts in a Gatherv / Scatterv buffer."""
    displs = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=displs[1:])
    return displs


#: seconds a rank waits between printing why it aborts and MPI_Abort (``Transport.abort``)
ABORT_GRACE = 1.0
#: tag of the per-rank round records (``gather_meta``, point to point when polled)
TAG_META = 31


class WaitTimeout(RuntimeError):
    """A rank waited longer than its round limit (``Transport.wait_limit``) for the
    others; ``missing``: on rank 0, the ranks whose round record had not arrived."""

    def __init__(self, message: str, missing: list[int] | None = None):
        self.missing = missing
        super().__init__(message)


#: ``run.round_timeout = 0`` (auto): a wait may last this many times the slowest round so
#: far (each rank's own round: header to header) ...
AUTO_FACTOR = 10.0
#: ... and never less than this many seconds (the first round has nothing to go by)
AUTO_FLOOR = 600.0
#: client ranks wait this many times longer than rank 0, so that rank 0, the one that
#: knows which ranks did not report, is the one that ends a stuck round
CLIENT_SHARE = 2.0


class RoundLimit:
    """How long a rank may wait for the others in one round (``run.round_timeout``):
    fixed seconds, auto (0: :data:`AUTO_FACTOR` x the slowest round so far, at least
    :data:`AUTO_FLOOR`), or never (< 0); client ranks x :data:`CLIENT_SHARE`."""

    def __init__(self, timeout: float, is_server: bool):
        self.timeout = timeout
        self.share = 1.0 if is_server else CLIENT_SHARE
        self.slowest = 0.0
        self.last: float | None = None

    def next_round(self) -> float | None:
        """Call at the top of every round: the limit of this round's waits (None = none)."""
        now = time.perf_counter()
        if self.last is not None:
            self.slowest = max(self.slowest, now - self.last)
        self.last = now
        if self.timeout < 0:
            return None
        base = self.timeout or max(AUTO_FLOOR, AUTO_FACTOR * self.slowest)
        return base * self.share


#: a long wait's polls back off to this share of the time waited so far ...
LONG_WAIT_SHARE = 0.005
#: ... but never to more than this many seconds between two polls
LONG_WAIT_MAX = 0.01


class Transport:
    def __init__(self, comm: MPI.Comm | None = None, wait: str = "sleep",
                 poll_max_ms: float = 0.5):
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.wait_mode = wait
        self.poll_max = poll_max_ms / 1000.0
        self.node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self.node.Get_rank()
        self.local_size = self.node.Get_size()
        self.client_ranks: list[int] = []  # set by set_client_ranks
        self.counters = Counters()
        #: seconds a polled wait of this round may take before WaitTimeout (None = no
        #: limit; ``mpi_wait = "block"`` calls cannot time out); set by ``begin_round``
        self.wait_limit: float | None = None
        self.round = -1  #: the round in progress (0-based; for messages)
        self._meta: tuple[np.ndarray, dict[int, MPI.Request]] | None = None

    # ------------------------------------------------------------------ basics
    @property
    def is_server(self) -> bool:
        return self.rank == SERVER

    def set_client_ranks(self, ranks: Sequence[int]) -> None:
        self.client_ranks = list(ranks)

    def reset_counters(self) -> Counters:
        old, self.counters = self.counters, Counters()
        return old

    def begin_round(self, rnd: int, limit: float | None) -> None:
        """Top of a round: its number and the limit of its waits (:class:`RoundLimit`)."""
        self.round, self.wait_limit = rnd, limit

    def expect_records(self, record_size: int) -> None:
        """Rank 0, once the round goes ahead (after its header): post the receives of
        every rank's round record (``gather_meta``) now, so that a wait that runs out
        anywhere in the round can name the ranks that have not reported."""
        if self.is_server and self.wait_mode != "block" and self.size > 1:
            self._post_meta(record_size)

    def _post_meta(self, record_size: int) -> None:
        out = np.empty((self.size, record_size), dtype=np.float64)
        self._meta = out, {r: self.comm.Irecv([out[r], MPI.DOUBLE], source=r, tag=TAG_META)
                           for r in range(1, self.size)}

    def unreported(self) -> list[int]:
        """Rank 0: the ranks whose record of this round has not arrived (posted ones)."""
        if self._meta is None:
            return []
        return [r for r, req in self._meta[1].items() if not req.Test()]

    def _wait(self, req: MPI.Request, what: str = "the others") -> None:
        if self.wait_mode == "block":
            req.Wait()
            return
        self._poll(req.Test, what)

    def _poll(self, done: Callable[[], bool], what: str = "the others") -> None:
        """Call ``done`` until it says True, sleeping in between (see ``_wait``); past
        ``wait_limit`` seconds raise :class:`WaitTimeout` saying who is missing."""
        delay = 2e-5
        start = time.perf_counter()
        while not done():
            time.sleep(delay)
            # back off to poll_max; a long wait (a fit pool's members waiting for the
            # others to train) backs off further, to LONG_WAIT_SHARE of the time waited so
            # far and at most LONG_WAIT_MAX, so forty waiting ranks do not wake thousands
            # of times a second while two compute; the added latency stays <= 0.5%
            waited = time.perf_counter() - start
            delay = min(delay * 2.0, max(self.poll_max, min(LONG_WAIT_MAX,
                                                              LONG_WAIT_SHARE * waited)))
            if self.wait_limit is not None and waited > self.wait_limit:
                raise self._timeout(what, waited)

    def _timeout(self, what: str, waited: float) -> WaitTimeout:
        head = (f"round {self.round + 1}: rank {self.rank} waited {waited:.0f} s for {what} "
                f"(its limit, see run.round_timeout)")
        tail = "; aborting the job"
        if not self.is_server:
            return WaitTimeout(f"{head}: rank 0 (the server) or a rank it waits for is "
                               f"frozen or gone{tail}")
        missing = self.unreported()
        if missing:
            return WaitTimeout(f"{head}: rank(s) {', '.join(map(str, missing))} did not "
                               f"report (frozen, or waiting on a frozen rank){tail}", missing)
        return WaitTimeout(f"{head}: every rank sent its round record, one stalled after "
                           f"it{tail}", [])

    def _timed(self, fn: Callable[[], None]) -> None:
        fn()

    # ------------------------------------------------------------------ round loop
    def bcast_header(self, header: np.ndarray) -> None:
        """Broadcast a small int64 array in place (rank 0's values win)."""
        assert header.dtype == np.int64
        self._timed(lambda: self._bcast(header))
        self.counters.meta += header.nbytes * (self.size - 1)

    def bcast_payload(self, buf: np.ndarray) -> None:
        """Broadcast downlink bytes in place; every rank must pass a buffer of equal size."""
        assert buf.dtype == np.uint8
        self._timed(lambda: self._bcast(buf))
        self.counters.downlink += buf.nbytes * len(self.client_ranks)

    def bcast_plumbing(self, buf: np.ndarray) -> None:
        """Broadcast a contiguous array in place that is simulator plumbing, not federated
        traffic (the true gradient of :mod:`fedmpi.perturbation`): never counted."""
        self._timed(lambda: self._bcast(buf.reshape(-1).view(np.uint8)))

    def _bcast(self, buf: np.ndarray) -> None:
        if self.size == 1:
            return
        if self.wait_mode == "block":
            self.comm.Bcast([buf, MPI.BYTE], root=SERVER)
        else:
            self._wait(self.comm.Ibcast([buf, MPI.BYTE], root=SERVER),
                       "the server's broadcast" if not self.is_server else
                       "the broadcast to the client ranks")

    def gather_meta(self, record: np.ndarray) -> np.ndarray | None:
        """Gather one equal-length float64 record per rank; rank 0 gets (size, len).

        Polled (``mpi_wait = "sleep"``): point to point, into the receives that
        ``expect_records`` posted (posted here if it was not called), so that rank 0 knows
        which ranks have reported; ``"block"``: one ``MPI_Gather``."""
        assert record.dtype == np.float64
        if self.wait_mode == "block" or self.size == 1:
            out = (np.empty((self.size, record.size), dtype=np.float64) if self.is_server
                   else None)
            self._timed(lambda: self.comm.Gather(record, out, root=SERVER))
        elif self.is_server:
            if self._meta is None or self._meta[0].shape[1] != record.size:
                self._post_meta(record.size)
            out, reqs = self._meta
            out[SERVER] = record
            pending = list(reqs.values())
            self._timed(lambda: self._poll(lambda: MPI.Request.Testall(pending),
                                           "the client ranks' round records"))
            self._meta = None
        else:
            out = None
            self._timed(lambda: self._wait(self.comm.Isend(record, dest=SERVER, tag=TAG_META),
                                           "the server to take this rank's round record"))
        self.counters.meta += record.nbytes * (self.size - 1)
        return out

    def gatherv_payloads(self, send: np.ndarray, counts: Sequence[int] | None
                         ) -> np.ndarray | None:
        """Gather every rank's payload bytes; ``counts[r]`` must equal rank r's ``send.size``.

        ``counts`` is needed on rank 0 only (other ranks may pass None; where given it is
        checked). Rank 0 gets one uint8 buffer with the ranks' bytes back to back in rank
        order.
        """
        assert send.dtype == np.uint8
        if counts is None and self.is_server:
            raise RuntimeError("rank 0 needs the gatherv counts of every rank")
        if counts is not None:
            counts = np.asarray(counts, dtype=np.int64)
            if counts[self.rank] != send.size:
                raise RuntimeError(f"rank {self.rank}: gatherv count {counts[self.rank]} != "
                                   f"{send.size} bytes to send")
        recv = None
        if self.is_server:
            displs = _displacements(counts)
            recv = np.empty(int(counts.sum()), dtype=np.uint8)
            spec = [recv, (counts, displs), MPI.BYTE]
        else:
            spec = None

        def run() -> None:
            if self.wait_mode == "block":
                self.comm.Gatherv([send, MPI.BYTE], spec, root=SERVER)
            else:
                self._wait(self.comm.Igatherv([send, MPI.BYTE], spec, root=SERVER),
                           "the payload gather")

        self._timed(run)
        if self.is_server:
            self.counters.uplink += int(counts.sum())
            self.counters.per_rank_uplink = [int(c) for c in counts]
        return recv

    # ------------------------------------------------------------------ setup time
    def agree(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` is true on every rank."""
        return bool(self.comm.allreduce(1 if ok else 0, op=MPI.MIN))

    def bcast_object(self, obj):
        return self.comm.bcast(obj, root=SERVER)

    def gather_object(self, obj) -> list | None:
        return self.comm.gather(obj, root=SERVER)

    def send_object(self, dest: int, obj) -> None:
        self.comm.send(obj, dest=dest, tag=13)

    def recv_object(self, source: int = SERVER):
        return self.comm.recv(source=source, tag=13)

    def send_arrays(self, dest: int, arrays: Sequence[np.ndarray]) -> None:
        """Send contiguous arrays to ``dest`` (shapes/dtypes first, then raw buffers)."""
        arrays = [np.ascontiguousarray(a) for a in arrays]
        self.comm.send([(a.dtype.str, a.shape) for a in arrays], dest=dest, tag=11)
        for a in arrays:
            self.comm.Send([a.reshape(-1).view(np.uint8), MPI.BYTE], dest=dest, tag=12)

    def recv_arrays(self, source: int = SERVER) -> list[np.ndarray]:
        meta = self.comm.recv(source=source, tag=11)
        out = []
        for dtype, shape in meta:
            a = np.empty(shape, dtype=np.dtype(dtype))
            self.comm.Recv([a.reshape(-1).view(np.uint8), MPI.BYTE], source=source, tag=12)
            out.append(a)
        return out

    def node_allgather(self, obj) -> list:
        """Setup-time: one object from every rank of this node, in node-rank order."""
        return self.node.allgather(obj)

    def node_pool(self, color: int, key: int) -> NodePool:
        """Setup-time, every rank of this node: the ranks of this node with the same
        ``color`` as one :class:`NodePool` (ordered by ``key``; member 0 leads)."""
        return NodePool(self.node.Split(color, key), self)

    def barrier(self) -> None:
        self.comm.Barrier()

    def quiet_barrier(self) -> None:
        """A barrier whose waiting ranks sleep (nonblocking, polled like the round's
        collectives): used before the blocking end-of-run collectives, so that ranks that
        finished their last round do not spin while rank 0 decodes and evaluates it."""
        if self.size > 1:
            self._timed(lambda: self._wait(self.comm.Ibarrier(), "the final barrier"))

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # MPI_Abort has mpiexec kill the job at once, and the lines this rank just wrote
        # may still sit in the launcher's pipes (seen on a loaded machine: the error
        # message lost, only the exit status left); give them a moment to get through
        time.sleep(ABORT_GRACE)
        self.comm.Abort(code)


#: message tags of a NodePool's own communicator
POOL_GATHER, POOL_SCATTER = 21, 22


class NodePool:
    """A few ranks of one node that send work to their first member and get results back
    (:mod:`fedmpi.fitpool`), on their own communicator, point to point: no member ever
    forwards another's data (as the tree algorithms of a collective may), so a member
    only has to make MPI progress for its own messages and may sleep outside MPI
    otherwise (the pool's doors). Waits are polled like the round's (sleep-polling)."""

    def __init__(self, comm: MPI.Comm, transport: Transport):
        self.comm = comm
        self.t = transport
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Setup-time: every member has reached this point (blocking)."""
        self.comm.Barrier()

    def _run(self, req: MPI.Request) -> None:
        self.t._timed(lambda: self.t._wait(req))

    def gather(self, send: np.ndarray,
               consume: Callable[[int, np.ndarray], None] | None = None
               ) -> list[np.ndarray] | None:
        """Every member's float32 ``send`` (any length, 0 included) at the leader, in
        member order; None on the others. The leader receives the messages in the order
        they arrive (matched probe), so a member's send completes as soon as the leader
        next polls, not when the last member arrives. With ``consume``, the leader hands
        each message to ``consume(member, array)`` as it arrives (its own first) and keeps
        none of them (it returns None): one message at a time is held, not the pool's."""
        assert send.dtype == np.float32
        if not self.leader:
            self._run(self.comm.Isend([send, MPI.FLOAT], dest=0, tag=POOL_GATHER))
            return None
        kept: list[np.ndarray | None] | None = None
        if consume is None:  # keep them all, in member order
            kept = [None] * self.size
            consume = kept.__setitem__
        arrived = [True] + [False] * (self.size - 1)
        consume(0, send)
        status = MPI.Status()

        def receive(msg: MPI.Message) -> None:
            buf = np.empty(status.Get_count(MPI.FLOAT), dtype=np.float32)
            msg.Recv([buf, MPI.FLOAT])
            source = status.Get_source()
            arrived[source] = True
            consume(source, buf)

        def take() -> bool:
            while (msg := self.comm.Improbe(MPI.ANY_SOURCE, POOL_GATHER, status)) is not None:
                receive(msg)
            return all(arrived)

        def blocking() -> None:
            for _ in range(self.size - 1):
                receive(self.comm.Mprobe(MPI.ANY_SOURCE, POOL_GATHER, status))

        self.t._timed(blocking if self.t.wait_mode == "block" else lambda: self.t._poll(take))
        return kept

    def scatter(self, parts: list[np.ndarray] | None, size: int,
                posted: Callable[[], None] = lambda: None) -> np.ndarray:
        """The leader's float64 ``parts[i]`` to member i; ``size`` floats arrive here.
        ``posted`` runs once this rank's sends / receive are posted, before it waits."""
        if self.leader:
            sends = [np.ascontiguousarray(p, dtype=np.float64) for p in parts]  # alive
            reqs = [self.comm.Isend([sends[i], MPI.DOUBLE], dest=i, tag=POOL_SCATTER)
                    for i in range(1, self.size)]  # until the sends complete
            posted()
            self.t._timed(lambda: MPI.Request.Waitall(reqs) if self.t.wait_mode == "block"
                          else self.t._poll(lambda: MPI.Request.Testall(reqs)))
            return sends[0]
        out = np.empty(size, dtype=np.float64)
        req = self.comm.Irecv([out, MPI.DOUBLE], source=0, tag=POOL_SCATTER)
        posted()
        self._run(req)
        return out


def world_rank() -> int:
    """This process's rank in the whole job (``MPI_COMM_WORLD``), without a Transport."""
    return MPI.COMM_WORLD.Get_rank()


def world_gather(obj) -> list | None:
    """One (pickled) object from every rank of the job at rank 0, in rank order; None on
    the others. Without a Transport (benchmarks that need no node communicator)."""
    return MPI.COMM_WORLD.gather(obj, root=SERVER)


def finalize_and_exit(code: int) -> None:
    """Finalize MPI and leave at once (a normal interpreter exit at 41 ranks takes ~15 s)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    os._exit(code)
