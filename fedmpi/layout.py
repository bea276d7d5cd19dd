"""Process layout: which rank owns which clients, which device and how many threads.

* Rank 0 is the server. With one process it is also the only client group; with P > 1
  processes ranks 1..P-1 own the clients, or ranks 0..P-1 with ``run.server_trains``.
* Clients go to client ranks by longest-processing-time on sample counts: clients sorted
  by size (descending, ties by id) each go to the least-loaded rank (ties: lowest rank).
  Every rank computes the same table from the broadcast sample counts.
* Device: ``cuda:(local_rank % n_gpus)`` when CUDA is visible (``run.device = auto``),
  else the CPU.
* Threads: ``run.threads`` if set, else ``SLURM_CPUS_PER_TASK`` if set, else the cores this
  process may use divided by the ranks on its node (at least 1), so the ranks of a node
  share its cores without oversubscribing them.
"""

from __future__ import annotations

import heapq
import os

import torch


def client_ranks(size: int, server_trains: bool = False) -> list[int]:
    """Ranks that own clients: all of them with one process or ``run.server_trains``."""
    return list(range(size)) if size == 1 or server_trains else list(range(1, size))


def assign_clients(sizes: list[int], ranks: list[int]) -> dict[int, list[int]]:
    """LPT: rank -> sorted list of client ids."""
    if len(ranks) > len(sizes):
        raise ValueError(f"{len(ranks)} client ranks but only {len(sizes)} clients: every "
                         "client rank needs at least one client (run with fewer processes "
                         "or raise data.num_clients)")
    heap = [(0, r) for r in ranks]
    heapq.heapify(heap)
    owned: dict[int, list[int]] = {r: [] for r in ranks}
    for cid in sorted(range(len(sizes)), key=lambda c: (-sizes[c], c)):
        load, r = heapq.heappop(heap)
        owned[r].append(cid)
        heapq.heappush(heap, (load + max(1, sizes[cid]), r))
    return {r: sorted(c) for r, c in owned.items()}


def pick_device(mode: str, local_rank: int) -> torch.device:
    if mode == "cpu" or (mode == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but CUDA is not available on this node")
    return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")


def affinity() -> tuple[int, ...]:
    """The CPUs this process may run on (sorted)."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return tuple(range(os.cpu_count() or 1))


def cores() -> int:
    """How many CPUs this process may run on."""
    return len(affinity())


def equal_chunks(n: int, most: int) -> list[tuple[int, int]]:
    """[start, stop) ranges cutting n items into the fewest chunks of at most ``most``
    items, as equal as possible (20 by 16: 10 + 10, not 16 + 4)."""
    pieces = -(-n // max(1, most))
    bounds = [n * i // max(1, pieces) for i in range(pieces + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def thread_count(configured: int, ranks_on_node: int) -> int:
    if configured > 0:
        return configured
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    return max(1, cores() // max(1, ranks_on_node))
