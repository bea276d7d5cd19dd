"""Process layout: LPT client assignment, threads, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmpi import layout


def test_single_process_owns_everything():
    assert layout.client_ranks(1) == [0]
    assert layout.assign_clients([5, 3, 9], [0]) == {0: [0, 1, 2]}


def test_lpt_is_balanced_and_covers_every_client():
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.integers(1, 1000, size=40)]
    owners = layout.assign_clients(sizes, layout.client_ranks(5))
    assert sorted(c for cs in owners.values() for c in cs) == list(range(40))
    loads = [sum(sizes[c] for c in cs) for cs in owners.values()]
    assert max(loads) - min(loads) <= max(sizes)  # LPT bound


def test_lpt_known_case():
    # 10 -> r1; 9 -> r2; 8 -> r2 (9 < 10); 7 -> r1 (10 < 17); 6 -> r1 (tie 17/17: lower rank)
    assert layout.assign_clients([10, 9, 8, 7, 6], [1, 2]) == {1: [0, 3, 4], 2: [1, 2]}


def test_one_client_per_rank():
    owners = layout.assign_clients([3] * 10, layout.client_ranks(11))
    assert all(len(c) == 1 for c in owners.values())


def test_more_ranks_than_clients_is_an_error():
    with pytest.raises(ValueError, match="client ranks but only"):
        layout.assign_clients([1, 2], [1, 2, 3])


def test_threads(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert layout.thread_count(3, 8) == 3
    assert layout.thread_count(0, 10**6) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert layout.thread_count(0, 2) == 4


def test_device_cpu():
    assert layout.pick_device("cpu", 3) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert layout.pick_device("auto", 0) == torch.device("cpu")
        with pytest.raises(RuntimeError, match="CUDA"):
            layout.pick_device("cuda", 0)
