"""fedmpi.gate: at most ``slots`` ranks of a node compute at once; the rest sleep."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import numpy as np
import pytest

from fedmpi import gate
from tests.conftest import SMALL, run_and_open


@pytest.mark.parametrize("configured, cores, threads, sharing, want", [
    (0, 2, 1, 41, 2),  # oversubscribed: one slot per core
    (0, 2, 1, 2, 0),  # as many ranks as cores: no gate
    (0, 2, 1, 3, 2),
    (0, 8, 2, 16, 4),  # 2 threads per rank: a slot per 2 cores
    (0, 1, 4, 2, 1),  # more threads than cores: still one slot
    (3, 2, 1, 2, 3),  # forced
    (-1, 2, 1, 41, 0),  # never
])
def test_slot_count(configured, cores, threads, sharing, want):
    assert gate.slots_for(configured, cores, threads, sharing) == want


def _worker(paths, own, slots, inside, log, start):
    """Take a slot; inside, count the holders and wait (up to a minute, however loaded the
    machine) until ``slots`` are inside at once, so the peak does not depend on timing."""
    g = gate.Gate(paths, own)
    start.wait()
    cpu0 = time.process_time()
    with g.slot():
        with inside.get_lock():
            inside.value += 1
            seen = inside.value
        held = g.held
        deadline = time.monotonic() + 60
        while inside.value < slots and time.monotonic() < deadline:
            time.sleep(0.01)
        peak = max(seen, inside.value)
        time.sleep(0.05)  # the others see this one inside too
        with inside.get_lock():
            inside.value -= 1
    log.put((own, seen, peak, held, time.process_time() - cpu0))
    g.close()


@pytest.mark.parametrize("slots", [1, 2])
def test_no_more_than_slots_processes_inside_and_every_slot_used(tmp_path, slots):
    """6 processes take a slot: never more than ``slots`` inside at once, the slots are
    used in parallel (``slots`` holders inside together), every slot is used, and a
    waiting process sleeps in the kernel. No wall-time bound: the holders wait for each
    other inside, so a loaded machine changes how long it takes, not what is checked."""
    paths = [str(tmp_path / f"slot-{i}") for i in range(slots)]
    for p in paths:
        open(p, "w").close()
    ctx = mp.get_context("spawn")
    log, start, inside = ctx.Queue(), ctx.Event(), ctx.Value("i", 0)
    procs = [ctx.Process(target=_worker, args=(paths, i, slots, inside, log, start))
             for i in range(6)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    spans = [log.get(timeout=5) for _ in procs]
    assert max(seen for _, seen, _, _, _ in spans) <= slots  # never more inside
    assert max(peak for _, _, peak, _, _ in spans) == slots  # the slots used together
    assert {held for _, _, _, held, _ in spans} == set(range(slots))
    assert max(cpu for *_, cpu in spans) < 0.5  # holding (and waiting) costs ~no CPU


def test_a_dead_holder_frees_its_slot(tmp_path):
    """The kernel drops a flock when its process dies: a crashed rank never blocks others."""
    path = str(tmp_path / "slot-0")
    open(path, "w").close()
    ctx = mp.get_context("spawn")
    holder = ctx.Process(target=_hold_forever, args=([path],))
    holder.start()
    try:
        deadline = time.monotonic() + 30
        g = gate.Gate([path], 0)
        while time.monotonic() < deadline:  # wait until the child holds the slot
            import fcntl

            try:
                fcntl.flock(g.fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(g.fds[0], fcntl.LOCK_UN)
                time.sleep(0.05)
            except BlockingIOError:
                break
        else:
            pytest.fail("the child never took the slot")
        holder.kill()
        holder.join(10)
        got = []
        taker = threading.Thread(target=lambda: got.append(g.acquire()), daemon=True)
        taker.start()
        taker.join(120)  # a bound for a broken gate, not a timing check
        assert got == [0]
        g.close()
    finally:
        if holder.is_alive():
            holder.kill()


def _hold_forever(paths):
    g = gate.Gate(paths, 0)
    g.acquire()
    time.sleep(600)


def test_open_gate_unlinks_its_files_and_spreads_ranks(tmp_path, monkeypatch):
    """open_gate on one process (a node of one rank, forced to 2 slots): the files are
    gone once opened, the locks still work, and the rank's own slot follows its index."""
    monkeypatch.setattr(gate, "lock_dir", lambda: str(tmp_path))
    g = gate.open_gate(2, 1, "testjob", lambda obj: [obj], 0)
    assert len(g.paths) == 2 and g.enabled
    assert not any(os.path.exists(p) for p in g.paths)
    assert os.listdir(tmp_path) == []
    with g.slot():
        assert g.held == 0
    assert g.held == -1
    g.close()
    off = gate.open_gate(0, 1, "testjob", lambda obj: [obj], 0)  # 1 rank: no gate
    assert not off.enabled
    with off.slot():
        pass


def test_runs_are_identical_with_and_without_the_gate(tmp_path):
    """The gate changes when ranks compute, never what: -n 3 forced to one slot equals the
    ungated run bit for bit; the run file records each rank's slot count."""
    args = [*SMALL, "--set", "compressor.name='topk'"]
    gated = run_and_open(tmp_path, 3, [*args, "--set", "run.compute_slots=1"], name="gated")
    free = run_and_open(tmp_path, 3, [*args, "--set", "run.compute_slots=-1"], name="free")
    assert list(gated.attrs["compute_slots"]) == [1, 1, 1]
    assert list(free.attrs["compute_slots"]) == [0, 0, 0]
    for key in ("test_loss", "train_loss", "uplink_bytes"):
        assert np.array_equal(gated.rounds[key], free.rounds[key]), key
    cores = len(gate.affinity())
    auto = run_and_open(tmp_path, 3, args, name="auto")  # run.threads = 1 in SMALL
    want = gate.slots_for(0, cores, 1, 3)
    assert list(auto.attrs["compute_slots"]) == [want] * 3


def test_a_pinned_gate_waits_for_its_own_slot(tmp_path):
    """pin(): a fit pool's ranks use only their slot, even when another one is free."""
    import threading

    paths = [str(tmp_path / f"slot-{i}") for i in range(2)]
    first, pinned = gate.Gate(paths, 0), gate.Gate(paths, 1)
    assert first.acquire() == 0
    pinned.pin(0)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pinned.acquire()))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not got  # slot 1 is free, but it waits for slot 0
    first.release()
    waiter.join(10)
    assert got == [0]
    pinned.release()
    free = gate.Gate(paths, 1)
    assert free.acquire() == 1  # unpinned: its own slot first
    free.close()
    first.close()
    pinned.close()
