"""Transport collectives and byte counters, run inside MPI jobs of several sizes.

These tests are marked ``mpi`` (pytest-mpi): a plain ``pytest`` skips them, and
``test_transport_at_several_sizes`` below runs this file under
``mpiexec -n {1,2,3,5} python -m pytest --with-mpi``. Every assertion comes after the
collectives, so a failing rank cannot leave the others waiting.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedmpi import launch


def transport(wait="sleep"):
    from fedmpi.comm import Transport
    from fedmpi.layout import client_ranks

    t = Transport(wait=wait)
    t.set_client_ranks(client_ranks(t.size))
    return t


@pytest.mark.mpi
@pytest.mark.parametrize("wait", ["sleep", "block"])
def test_bcast_counts_bytes_times_receivers(wait):
    t = transport(wait)
    header = np.arange(6, dtype=np.int64) * (7 if t.is_server else 0)
    t.bcast_header(header)
    payload = (np.arange(1000) % 251).astype(np.uint8) if t.is_server else np.zeros(
        1000, np.uint8)
    t.bcast_payload(payload)
    assert np.array_equal(header, np.arange(6) * 7)
    assert np.array_equal(payload, (np.arange(1000) % 251).astype(np.uint8))
    assert t.counters.downlink == 1000 * len(t.client_ranks)


@pytest.mark.mpi
@pytest.mark.parametrize("wait", ["sleep", "block"])
def test_gatherv_uneven_counts(wait):
    t = transport(wait)
    mine = np.full(3 * t.rank + (t.rank % 2), t.rank, dtype=np.uint8)  # rank 0 may send 0 B
    record = np.array([t.rank, mine.size], dtype=np.float64)
    table = t.gather_meta(record)
    counts = table[:, 1].astype(np.int64) if t.is_server else np.bincount(
        [t.rank], weights=[mine.size], minlength=t.size).astype(np.int64)
    got = t.gatherv_payloads(mine, counts)
    if t.is_server:
        expect = np.concatenate([np.full(3 * r + (r % 2), r, np.uint8) for r in range(t.size)])
        assert np.array_equal(table[:, 0], np.arange(t.size))
        assert np.array_equal(got, expect)
        assert t.counters.uplink == expect.size
        assert t.counters.per_rank_uplink == [3 * r + (r % 2) for r in range(t.size)]
    else:
        assert got is None


class SlowRequest:
    """A request that completes ``after`` seconds from now; counts its polls."""

    def __init__(self, after: float):
        import time

        self.clock = time.perf_counter
        self.ready = self.clock() + after
        self.polls = 0

    def Test(self) -> bool:  # noqa: N802 - the mpi4py name
        self.polls += 1
        return self.clock() >= self.ready


@pytest.mark.mpi
@pytest.mark.parametrize("wait", ["sleep", "block"])
def test_node_pool_gathers_and_scatters_point_to_point(wait):
    """A NodePool of the whole node: uneven (and empty) sends arrive at the leader in
    member order although members send in reverse order, large ones included (above any
    eager limit); each member gets its own result; ``posted`` runs once per rank after
    its sends / receive are posted."""
    import time

    t = transport(wait)
    pool = t.node_pool(0, t.local_rank)
    me, size = pool.rank, pool.size
    time.sleep(0.02 * (size - 1 - me))  # later members send first
    n_of = [(0 if r % 3 == 1 else 50_000 * (r + 1)) for r in range(size)]
    got = pool.gather(np.full(n_of[me], me + 0.5, dtype=np.float32))
    posted = []
    parts = ([np.arange(r + 2, dtype=np.float64) * (r + 1) for r in range(size)]
             if pool.leader else None)
    out = pool.scatter(parts, me + 2, lambda: posted.append(me))
    assert posted == [me]
    assert np.array_equal(out, np.arange(me + 2) * (me + 1.0))
    if pool.leader:
        assert [g.size for g in got] == n_of
        assert all(bool((g == r + 0.5).all()) for r, g in enumerate(got))
    else:
        assert got is None


@pytest.mark.mpi
@pytest.mark.parametrize("wait", ["sleep", "block"])
def test_node_pool_gather_hands_messages_to_a_consumer_as_they_arrive(wait):
    """gather(send, consume): the leader's own send first, then every member's exactly
    once, in arrival order (later members send first here), empty ones included; the
    leader keeps none of them (it returns None), nor does any other rank."""
    import time

    t = transport(wait)
    pool = t.node_pool(0, t.local_rank)
    me, size = pool.rank, pool.size
    time.sleep(0.05 * (size - 1 - me))
    n_of = [(0 if r % 3 == 1 else 40_000 * (r + 1)) for r in range(size)]
    seen = []
    got = pool.gather(np.full(n_of[me], me + 0.5, dtype=np.float32),
                      lambda member, buf: seen.append((member, buf.size, float(buf.sum()))))
    assert got is None
    if pool.leader:
        assert sorted(m for m, _, _ in seen) == list(range(size))
        assert seen[0][0] == 0
        assert all(n == n_of[m] and total == pytest.approx(n * (m + 0.5))
                   for m, n, total in seen)
    else:
        assert seen == []
    assert t.agree(True)


@pytest.mark.mpi
def test_long_waits_poll_rarely_and_return_promptly():
    """A 1.2 s wait polls far less than every poll_max (0.5 ms: ~2,400 polls; ~700 with
    the long-wait back-off to 0.5% of the time waited); it still returns within ~10 ms."""
    import time

    from fedmpi.comm import LONG_WAIT_MAX

    t = transport()
    req = SlowRequest(1.2)
    t._wait(req)
    late = time.perf_counter() - req.ready
    assert 0 <= late < LONG_WAIT_MAX + 0.01
    assert req.polls < 1000
    short = SlowRequest(0.02)  # a short wait keeps polling at poll_max
    t._wait(short)
    assert short.polls >= 15
    assert t.agree(True)


@pytest.mark.mpi
def test_quiet_barrier_waits_asleep():
    """Ranks waiting for rank 0 in quiet_barrier sleep (a blocking MPICH barrier spins)."""
    import time

    t = transport()
    t0, cpu0 = time.perf_counter(), time.process_time()
    if t.is_server:
        time.sleep(0.5)
    t.quiet_barrier()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert t.agree(True)
    if t.size > 1:
        assert wall > 0.45
    assert cpu < 0.2


@pytest.mark.mpi
def test_wrong_count_is_refused_before_the_collective():
    t = transport()
    with pytest.raises(RuntimeError, match="gatherv count"):
        t.gatherv_payloads(np.zeros(3, np.uint8), np.zeros(t.size, np.int64))
    assert t.agree(True)


@pytest.mark.mpi
def test_agree_and_arrays():
    t = transport()
    assert t.agree(True) is True
    assert t.agree(t.rank != t.size - 1) is False
    if t.is_server:
        for r in range(1, t.size):
            t.send_arrays(r, [np.arange(r, dtype=np.int64), np.ones((r, 2), np.float32)])
        got = None
    else:
        got = t.recv_arrays(0)
    if not t.is_server:
        assert np.array_equal(got[0], np.arange(t.rank))
        assert got[1].shape == (t.rank, 2) and got[1].dtype == np.float32


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.mpi_skip  # the launcher itself must not run inside the MPI job
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_transport_at_several_sizes(n):
    """Run the mpi-marked tests of this file inside an n-rank MPI job."""
    cmd = launch.command(n, "pytest", ["--with-mpi", "-q", "-p", "no:cacheprovider",
                                       str(Path(__file__))])
    env = launch.environment()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.mpi_skip
def test_only_comm_imports_mpi4py():
    """comm.py is the only fedmpi module that imports mpi4py (the memory floor,
    bench/floor.py, gathers through comm.world_gather; tests/test_structure.py also
    checks the name MPI and comm's private members)."""
    importers = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "fedmpi").rglob("*.py")
        if any(line.strip().startswith(("import mpi4py", "from mpi4py"))
               for line in p.read_text().splitlines()))
    assert importers == ["fedmpi/comm.py"]
