"""fedmpi.fitpool: the client ranks behind one compute slot fit their 3SFC samples on one
of them, bit-identically to fitting each on its own."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import numpy as np
import pytest

from fedmpi.fitpool import Door, split_pools
from tests.conftest import SMALL, run_and_open

SFC = [*SMALL, "--set", "compressor.name='3sfc'", "--set", "compressor.s_steps=2",
       "--set", "compressor.max_iter=4", "--set", "data.num_clients=7"]


def same(a, b) -> None:
    for key in ("test_loss", "train_loss", "uplink_bytes", "efficiency_mean"):
        assert np.array_equal(a.rounds[key], b.rounds[key]), key
    assert np.array_equal(a.clients["efficiency"], b.clients["efficiency"], equal_nan=True)


@pytest.mark.parametrize("slots, sizes, extra", [
    (1, [0, 4, 4, 4, 4], []),  # one pool of the 4 client ranks
    (2, [0, 2, 2, 2, 2], ["--set", "server.participation=0.5"]),  # 2 pools; empty ranks
])
def test_pooled_fits_equal_own_fits(tmp_path, slots, sizes, extra):
    args = [*SFC, *extra, "--set", f"run.compute_slots={slots}"]
    pooled = run_and_open(tmp_path, 5, args, name="pooled")
    alone = run_and_open(tmp_path, 5, [*args, "--set", "run.pool_fits=false"], name="alone")
    assert list(pooled.attrs["fit_pool_size"]) == sizes
    assert list(alone.attrs["fit_pool_size"]) == [0] * 5
    fitted = pooled.attrs["fit_pool_fitted"]
    assert int(fitted.sum()) == int(pooled.rounds["participants"].sum())  # every fit, once
    assert np.count_nonzero(fitted) == slots  # by the pools' leaders only
    same(pooled, alone)
    assert pooled.complete and alone.complete


def test_pooled_run_equals_one_process(tmp_path):
    """And both equal the single-process run (rank-count invariance holds with pooling)."""
    args = [*SFC, "--set", "run.compute_slots=1"]
    pooled = run_and_open(tmp_path, 4, args, name="pooled")
    one = run_and_open(tmp_path, 1, args, name="one")
    assert list(pooled.attrs["fit_pool_size"]) == [0, 3, 3, 3]
    same(pooled, one)


def test_split_pools_balances_training_load():
    loads = {1: 2635, 2: 2108, 3: 1990, 4: 1767, 5: 1758, 6: 1713, 7: 120, 8: 0}
    pools = split_pools(loads, 2)
    totals = [sum(v for r, v in loads.items() if pools[r] == p) for p in (0, 1)]
    assert sorted(set(pools.values())) == [0, 1]
    assert abs(totals[0] - totals[1]) <= max(loads.values())  # the LPT bound
    assert abs(totals[0] - totals[1]) < 200  # here: 6,115 vs 5,976
    assert split_pools({4: 5, 9: 5}, 3) == {4: 0, 9: 1}  # ties by rank; a pool may be empty


def _locked(path: str, kind: int) -> bool:
    """Whether a fresh open file description of ``path`` is refused lock ``kind``."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_door_members_sleep_until_the_leader_opens_it(tmp_path):
    """Door n is shut from setup (n = 0) or from the moment door n - 1 opens; a member
    waiting on it returns only once the leader opens it; doors alternate by parity."""
    paths = [str(tmp_path / "d0"), str(tmp_path / "d1")]
    leader = Door(paths, leader=True)
    member = Door(paths, leader=False)
    assert _locked(paths[0], fcntl.LOCK_SH) and not _locked(paths[1], fcntl.LOCK_SH)
    for n in range(3):
        passed = []
        waiter = threading.Thread(target=lambda n=n, passed=passed: (member.wait(n),
                                                                     passed.append(n)))
        waiter.start()
        time.sleep(0.1)
        assert passed == [] and waiter.is_alive()  # asleep in flock, door n shut
        leader.open(n)
        waiter.join(5)
        assert passed == [n]
        assert not _locked(paths[n % 2], fcntl.LOCK_SH)  # door n open ...
        assert _locked(paths[(n + 1) % 2], fcntl.LOCK_SH)  # ... door n + 1 shut
    member.wait(2)  # an open door does not block
    leader.close()
    assert not _locked(paths[1], fcntl.LOCK_SH)  # a closed (or dead) leader shuts nothing
    member.close()


class _Link:
    """An in-process leader's side of a NodePool: the members' sends arrive in ``order``."""

    leader = True

    def __init__(self, sends: dict[int, np.ndarray], order: list[int]):
        self.sends, self.order = sends, order
        self.size = len(sends) + 1
        self.parts = None

    def gather(self, send, consume=None):
        assert consume is not None  # the leader never keeps the pool's messages
        consume(0, send)
        for m in self.order:
            consume(m, self.sends[m])

    def scatter(self, parts, size, posted):
        self.parts = parts
        posted()
        return parts[0]


class _Gate:
    held = -1

    def acquire(self):
        pass

    def release(self):
        pass


class _Door:
    def open(self, n):
        pass


@pytest.mark.parametrize("capacity, batch", [(6, 8), (1, 2), (0, 1)])
def test_leader_files_problems_in_arrival_order_and_answers_each_member(capacity, batch):
    """The leader files every message's rows into its buffers as it arrives (growing them
    when ``capacity`` is short, keeping the rows filed so far), fits them in chunks of
    ``batch``, and answers member m with exactly its own problems' rows, in its order;
    the buffers are reused the next round."""
    import torch

    from fedmpi import synth
    from fedmpi.fitpool import FitPool

    d, xs, ys = 5, (2,), (3,)
    width = d + 2 + 3
    calls = []

    def solver(targets, x0, y0):  # problem-wise: x = x0 + sum(u), y = y0 * 2, loss = u[0]
        calls.append(len(targets))
        assert targets.is_contiguous() and targets.shape[1] == d
        return synth.FitResult(x0 + targets.sum(1, keepdim=True), y0 * 2,
                               targets[:, 0].double())

    rng = np.random.default_rng(0)
    rows = {m: rng.normal(size=(k, width)).astype(np.float32) for m, k in
            [(0, 1), (1, 2), (2, 0), (3, 3)]}
    link = _Link({m: rows[m].reshape(-1) for m in (1, 2, 3)}, [3, 2, 1])
    pool = FitPool(link, _Gate(), batch, _Door(), _Door(), capacity=capacity)
    fitter = synth.Solver(solver, d, xs, ys)  # passed in per call, never bound to the pool
    for rnd in range(2):
        mine = torch.from_numpy(rows[0])
        got = pool.fit(rnd, fitter, mine[:, :d], mine[:, d:d + 2], mine[:, d + 2:])
        for m in range(4):
            u = torch.from_numpy(rows[m]).double()
            expect = torch.cat([u[:, d:d + 2] + u[:, :d].sum(1, keepdim=True),
                                u[:, d + 2:] * 2, u[:, :1]], 1)
            part = torch.from_numpy(pool.link.parts[m]).reshape(-1, 2 + 3 + 1)
            assert torch.allclose(part, expect, atol=1e-5), (rnd, m)
        assert torch.allclose(got.x, mine[:, d:d + 2] + mine[:, :d].sum(1, keepdim=True))
        assert len(pool._targets) >= 6
    assert sum(calls) == 12 and max(calls) <= batch
    assert pool.fitted == 12
