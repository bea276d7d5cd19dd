"""Synthetic(alpha, beta) of FedProx / LEAF: the generator, client by client, and its
memory check before generating."""

from __future__ import annotations

import os

import numpy as np

from fedmpi.config import DataConfig
from fedmpi.data.arrays import TAG_DATA, ArrayDataset, DataError, DatasetInfo, LoadedData


def _synthetic_info(cfg: DataConfig) -> DatasetInfo:
    return DatasetInfo("synthetic", (cfg.syn_dim,), cfg.syn_classes)


def synthetic_client(cfg: DataConfig, seed: int, client: int) -> tuple[np.ndarray, np.ndarray]:
    """All samples of one Synthetic(alpha, beta) client, from its own random stream."""
    dim, classes = cfg.syn_dim, cfg.syn_classes
    rng = np.random.default_rng([seed, TAG_DATA, client])
    n = int(rng.lognormal(4, 2)) + cfg.syn_min_samples
    if cfg.syn_max_samples:
        n = min(n, cfg.syn_max_samples)
    if cfg.syn_iid:
        shared = np.random.default_rng([seed, TAG_DATA, 2**31])
        w = shared.normal(0, 1, (dim, classes))
        b = shared.normal(0, 1, classes)
        mean_x = np.zeros(dim)
    else:
        u = rng.normal(0, cfg.syn_alpha)
        big_b = rng.normal(0, cfg.syn_beta)
        mean_x = rng.normal(big_b, 1, dim)
        w = rng.normal(u, 1, (dim, classes))
        b = rng.normal(u, 1, classes)
    std_x = np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2 / 2)  # diag cov j^-1.2
    x = mean_x + rng.standard_normal((n, dim)) * std_x
    y = np.argmax(x @ w + b, axis=1)  # argmax of softmax == argmax of logits
    return x.astype(np.float32), y.astype(np.int64)


def available_memory() -> int:
    """Bytes of memory this process could still get: MemAvailable (Linux), else the
    physical memory; 0 where neither is known."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def synthetic_bytes(cfg: DataConfig) -> int:
    """The memory generating the synthetic set takes, estimated before it is generated:
    the clients' mean sample count (from 4,096 draws of the size distribution) x the
    bytes of a sample in the float64 draw, its float32 copy and the joined splits."""
    rng = np.random.default_rng(0)
    n = np.floor(rng.lognormal(4, 2, 4096)) + cfg.syn_min_samples
    if cfg.syn_max_samples:
        n = np.minimum(n, cfg.syn_max_samples)
    per_sample = cfg.syn_dim * (8 + 4 + 4) + 8 + 8
    return int(float(np.mean(n)) * cfg.num_clients * per_sample)


def check_synthetic_size(cfg: DataConfig) -> None:
    """Refuse a synthetic set that cannot fit in memory, before generating any of it (10^9
    clients would generate for minutes and end in a MemoryError)."""
    need, have = synthetic_bytes(cfg), available_memory()
    if have and need > have:
        raise DataError(f"data.num_clients: {cfg.num_clients:,} synthetic clients of "
                        f"~{need / cfg.num_clients / 1e3:.0f} KB each need ~{need / 1e9:,.1f} "
                        f"GB of memory to generate, {have / 1e9:,.1f} GB are available; use "
                        "fewer clients, data.syn_max_samples or data.syn_dim")


def _load_synthetic(cfg: DataConfig, seed: int) -> LoadedData:
    check_synthetic_size(cfg)
    info = _synthetic_info(cfg)
    train_x, train_y, test_x, test_y, natural = [], [], [], [], []
    offset = 0
    for k in range(cfg.num_clients):
        x, y = synthetic_client(cfg, seed, k)
        n_test = max(1, int(round(cfg.syn_test_frac * len(y))))
        n_train = len(y) - n_test
        train_x.append(x[:n_train])
        train_y.append(y[:n_train])
        test_x.append(x[n_train:])
        test_y.append(y[n_train:])
        natural.append(np.arange(offset, offset + n_train))
        offset += n_train
    return LoadedData(info, ArrayDataset(np.concatenate(train_x), np.concatenate(train_y)),
                      ArrayDataset(np.concatenate(test_x), np.concatenate(test_y)), natural)
