"""Compute slots: at most as many ranks of a node compute at once as it has cores for them.

With more ranks than cores on a node (``mpiexec -n 41`` on 2 cores) every rank that
computes at the same time as others gets time-sliced: each slice evicts the others'
caches and a rank's training step finishes only when the scheduler comes back to it, so
the same round takes several times longer than with one rank per core. The gate turns
that into queueing: a rank enters a slot before its local work of a round (training and
encoding its clients) and leaves it after; a rank that finds no free slot sleeps in the
kernel (``flock``) and costs nothing until a slot frees.

Slots are ``flock`` locks on files in a node-local directory (``/dev/shm`` when it is
writable, else the system temp directory), one set per distinct CPU affinity mask on the
node: ranks pinned to the same cores share those cores' slots, ranks pinned to other
cores do not wait for them. A mask of c cores running t threads per rank has max(1, c //
t) slots. A rank first tries every slot of its mask without blocking (starting at its
own index, so ranks spread over the slots), and if all are taken it blocks on its own
slot (index mod slots); a rank of a 3SFC fit pool uses its pool's slot only
(:meth:`Gate.pin`, :mod:`fedmpi.fitpool`). A lock is released by the kernel when its
process dies, so a crashed rank never leaves a slot taken; and the files are unlinked as
soon as every rank of the node has opened them (a lock lives on the open file, not the
name), so nothing is left behind, whatever way the run ends.

``run.compute_slots``: 0 (auto) gates a mask only when more ranks share it than it has
slots; N > 0 forces N slots per mask; -1 never gates.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fedmpi.layout import affinity


def lock_dir() -> str:
    """A node-local directory for the slot files."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    return tempfile.gettempdir()


def job_key() -> str:
    """A name unique to this run (rank 0's is broadcast to every rank)."""
    return f"{os.getpid()}-{time.time_ns():x}"


def slots_for(configured: int, cores: int, threads: int, sharing: int) -> int:
    """Slots of one affinity mask (0 = no gate) for ``sharing`` ranks on ``cores`` cores
    running ``threads`` torch threads each."""
    if configured < 0:
        return 0
    if configured > 0:
        return configured
    fit = max(1, cores // max(1, threads))
    return fit if sharing > fit else 0


class Gate:
    """The compute gate of one rank; :meth:`slot` is a context manager around its work."""

    def __init__(self, paths: list[str], own: int, mask: tuple[int, ...] = (),
                 base: str = ""):
        self.paths = paths
        self.base = base  #: node-local path prefix of this gate's files (fit pools add theirs)
        self.own = own
        self.mask = mask  #: the CPU affinity mask whose ranks share these slots
        self.pinned = -1  #: the only slot this rank uses (pin), or -1: any free one
        self.fds: list[int] = []
        for p in paths:
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
            self.fds.append(fd)
        self.held = -1

    @property
    def enabled(self) -> bool:
        return bool(self.fds)

    def pin(self, slot: int) -> None:
        """Use only ``slot`` from now on (no taking another free one): the ranks of a fit
        pool share one slot, so each slot trains one pool's clients and then runs its
        leader's fit, as one rank with all those clients would (:mod:`fedmpi.fitpool`)."""
        self.pinned = slot % len(self.fds)

    def acquire(self) -> int:
        """Take a slot (blocking); returns its index."""
        n = len(self.fds)
        if self.pinned >= 0:
            fcntl.flock(self.fds[self.pinned], fcntl.LOCK_EX)
            self.held = self.pinned
            return self.pinned
        for i in range(n):
            k = (self.own + i) % n
            try:
                fcntl.flock(self.fds[k], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            self.held = k
            return k
        k = self.own % n
        fcntl.flock(self.fds[k], fcntl.LOCK_EX)
        self.held = k
        return k

    def release(self) -> None:
        if self.held >= 0:
            fcntl.flock(self.fds[self.held], fcntl.LOCK_UN)
            self.held = -1

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold a compute slot for the body (no-op when the gate is off)."""
        if not self.fds:
            yield
            return
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def close(self) -> None:
        self.release()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def open_gate(configured: int, threads: int, job_key: str,
              node_allgather: Callable[[object], list], node_rank: int) -> Gate:
    """This rank's gate. ``node_allgather`` gathers one object from every rank of this
    node (in node-rank order); ``job_key`` is the same on every rank of the job."""
    mask = affinity()
    masks = node_allgather(mask)
    sharing = [r for r, m in enumerate(masks) if m == mask]
    n = slots_for(configured, len(mask), threads, len(sharing))
    own = sharing.index(node_rank)
    tag = f"{zlib.crc32(repr(mask).encode()):08x}"
    base = os.path.join(lock_dir(), f"fedmpi-gate-{job_key}-{socket.gethostname()}-{tag}")
    opened = Gate([f"{base}-{i}" for i in range(n)], own, mask, base)
    node_allgather(None)  # every rank of the node has its files open ...
    if own == 0:  # ... so the names can go: the locks live on the open files
        for p in opened.paths:
            os.unlink(p)
    return opened
