"""Partitions of the training split over the clients, each client's holdout, and the
clients x classes count table."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedmpi.config import Config, DataConfig
from fedmpi.data.arrays import TAG_HOLDOUT, TAG_PARTITION, DataError, LoadedData

MAX_REDRAWS = 1000  # dirichlet_balanced: give up after this many draws



def _iid(labels: np.ndarray, n: int, cfg: DataConfig, rng: np.random.Generator):
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), n)]


def _dirichlet(labels: np.ndarray, n: int, cfg: DataConfig, rng: np.random.Generator):
    classes = int(labels.max()) + 1
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in range(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fracs = rng.dirichlet(np.full(n, cfg.alpha))
        cuts = (np.cumsum(fracs)[:-1] * len(idx)).astype(int)
        for i, piece in enumerate(np.split(idx, cuts)):
            parts[i].append(piece)
    return [np.sort(np.concatenate(p)) for p in parts]


def _dirichlet_balanced(labels: np.ndarray, n: int, cfg: DataConfig,
                        rng: np.random.Generator):
    total = len(labels)
    if cfg.min_size * n > total:
        raise DataError(f"data.min_size = {cfg.min_size} x data.num_clients = {n} exceeds "
                        f"the {total} training samples")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(MAX_REDRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        sizes = np.zeros(n, dtype=np.int64)
        for members in by_class:
            idx = rng.permutation(members)
            fracs = rng.dirichlet(np.full(n, cfg.alpha))
            open_ = sizes < total / n  # clients below the mean size may still grow
            fracs = fracs * open_
            if fracs.sum() <= 0:  # every open share underflowed (tiny alpha)
                fracs = open_.astype(np.float64)
            fracs = fracs / fracs.sum()
            cuts = (np.cumsum(fracs)[:-1] * len(idx)).astype(int)
            for i, piece in enumerate(np.split(idx, cuts)):
                parts[i].append(piece)
                sizes[i] += len(piece)
        if sizes.min() >= cfg.min_size:
            return [np.sort(np.concatenate(p)) for p in parts]
    raise DataError(f"data.partition 'dirichlet_balanced': no draw in {MAX_REDRAWS} gave every "
                    f"one of {n} clients at least data.min_size = {cfg.min_size} samples "
                    f"(alpha = {cfg.alpha}); raise data.alpha or lower data.min_size")


def _client_dirichlet(labels: np.ndarray, n: int, cfg: DataConfig,
                      rng: np.random.Generator):
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    quota = np.full(n, len(labels) // n, dtype=np.int64)
    quota[:len(labels) % n] += 1
    mix = rng.dirichlet(np.full(len(classes), cfg.alpha), size=n)
    demand = np.stack([rng.multinomial(quota[i], mix[i] / mix[i].sum()) for i in range(n)])
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for j, members in enumerate(by_class):
        takers = rng.permutation(np.repeat(np.arange(n), demand[:, j]))
        taken = members[np.arange(len(takers)) % len(members)]  # wraps: a refilled class
        taken = taken[np.argsort(takers, kind="stable")]
        for i, piece in enumerate(np.split(taken, np.cumsum(demand[:, j])[:-1])):
            parts[i].append(piece)
    return [np.sort(np.concatenate(p)) for p in parts]


def _shards(labels: np.ndarray, n: int, cfg: DataConfig, rng: np.random.Generator):
    classes = np.unique(labels)
    k, c = len(classes), cfg.classes_per_client
    if c > k:
        raise DataError(f"data.classes_per_client = {c} exceeds the {k} classes in the "
                        "training set")
    if n * c < k:
        raise DataError(f"data.num_clients x data.classes_per_client = {n} x {c} < {k} "
                        "classes: some classes would belong to no client")
    holders: list[list[int]] = [[] for _ in range(k)]
    count = np.zeros(k, dtype=np.int64)
    for i in range(n):  # the c least-held classes, ties broken at random
        chosen = np.lexsort((rng.random(k), count))[:c]
        count[chosen] += 1
        for j in chosen:
            holders[j].append(i)
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for j, cls in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        for i, piece in zip(holders[j], np.array_split(idx, len(holders[j])), strict=True):
            parts[i].append(piece)
    return [np.sort(np.concatenate(p)) for p in parts]


PARTITIONS: dict[str, Callable | None] = {
    "natural": None, "iid": _iid, "dirichlet": _dirichlet,
    "dirichlet_balanced": _dirichlet_balanced, "client_dirichlet": _client_dirichlet,
    "shards": _shards,
}

#: partitions that may give a sample to several clients (the others use each exactly once)
REPEATING = ("client_dirichlet",)


def partition(loaded: LoadedData, cfg: Config) -> list[np.ndarray]:
    """Indices into ``loaded.train`` for every client, in client-id order."""
    n = cfg.data.num_clients
    if cfg.data.partition == "natural":
        parts = loaded.natural
        if parts is None:
            raise DataError(f"dataset {cfg.data.dataset!r} has no natural client split")
    else:
        if n > len(loaded.train):
            raise DataError(f"data.num_clients = {n} exceeds the {len(loaded.train)} "
                            "training samples")
        rng = np.random.default_rng([cfg.run.seed, TAG_PARTITION])
        parts = PARTITIONS[cfg.data.partition](loaded.train.y, n, cfg.data, rng)
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(f"data.partition {cfg.data.partition!r} left clients {empty[:10]} "
                        f"without samples (alpha = {cfg.data.alpha}, classes_per_client = "
                        f"{cfg.data.classes_per_client}); raise data.alpha, use "
                        "dirichlet_balanced, or lower data.num_clients")
    return parts


def hold_out(parts: list[np.ndarray], cfg: Config
             ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every client's indices into (trained on, held out) by ``data.client_holdout``.

    Client ``i`` keeps ``int(n_i * (1 - share))`` of its ``n_i`` samples, a random subset
    from ``numpy.random.default_rng([seed, TAG_HOLDOUT, i])`` (the 3SFC code's
    ``random_split`` of ``int(n_i * train_frac)``), so the split depends on the seed and
    the partition only, never on the ranks. Without a holdout every client keeps all.
    """
    share = cfg.data.client_holdout
    if share <= 0:
        return parts, [np.zeros(0, dtype=np.int64) for _ in parts]
    train, held = [], []
    for cid, p in enumerate(parts):
        perm = np.random.default_rng([cfg.run.seed, TAG_HOLDOUT, cid]).permutation(len(p))
        keep = int(len(p) * (1.0 - share))
        if keep < 1:
            raise DataError(f"data.client_holdout = {share} leaves client {cid} with none of "
                            f"its {len(p)} samples to train on; lower it")
        train.append(np.sort(p[perm[:keep]]))
        held.append(np.sort(p[perm[keep:]]))
    return train, held


def class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """clients x classes sample counts (the HDF5 ``/partition`` table)."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]
                    ).astype(np.int64)
