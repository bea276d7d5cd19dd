"""The dataset table (name -> shape info and loader), loading on rank 0 and the
``train_frac`` / ``max_train`` / ``max_test`` resplit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedmpi.config import Config, DataConfig
from fedmpi.data.arrays import TAG_SPLIT, DataError, DatasetInfo, LoadedData
from fedmpi.data.readers import (
    _cifar10_info,
    _cifar100_info,
    _emnist_info,
    _fmnist_info,
    _load_cifar10,
    _load_cifar100,
    _load_emnist,
    _load_fmnist,
    _load_mnist,
    _mnist_info,
)
from fedmpi.data.synthetic import _load_synthetic, _synthetic_info


@dataclass(frozen=True)
class DatasetEntry:
    info: Callable[[DataConfig], DatasetInfo]
    load: Callable[[DataConfig, int], LoadedData]


DATASETS: dict[str, DatasetEntry] = {
    "synthetic": DatasetEntry(_synthetic_info, _load_synthetic),
    "mnist": DatasetEntry(_mnist_info, _load_mnist),
    "fmnist": DatasetEntry(_fmnist_info, _load_fmnist),
    "emnist": DatasetEntry(_emnist_info, _load_emnist),
    "cifar10": DatasetEntry(_cifar10_info, _load_cifar10),
    "cifar100": DatasetEntry(_cifar100_info, _load_cifar100),
}

#: datasets whose images ``data.augment`` may crop and flip
AUGMENTABLE = ("cifar10", "cifar100")


def info(cfg: DataConfig) -> DatasetInfo:
    return DATASETS[cfg.dataset].info(cfg)


def resplit(loaded: LoadedData, cfg: DataConfig, seed: int) -> LoadedData:
    """Apply ``train_frac`` (test = held-out share of the train split) and the
    ``max_train`` / ``max_test`` caps, from the stream ``[seed, TAG_SPLIT]``. The kept
    rows are moved within ``loaded``'s arrays (:meth:`ArrayDataset.compact`): ``loaded``
    is consumed."""
    if cfg.train_frac >= 1.0 and not cfg.max_train and not cfg.max_test:
        return loaded
    rng = np.random.default_rng([seed, TAG_SPLIT])
    train, test = loaded.train, loaded.test
    if cfg.train_frac < 1.0:
        n = len(train)
        cut = int(cfg.train_frac * n)
        if cut < 1 or cut >= n:
            raise DataError(f"data.train_frac = {cfg.train_frac} of {n} training samples "
                            f"leaves {cut} for training and {n - cut} for testing")
        perm = rng.permutation(n)
        train_idx, test_idx = perm[:cut], perm[cut:]
        if cfg.max_train:
            train_idx = train_idx[:cfg.max_train]
        if cfg.max_test:
            test_idx = test_idx[:cfg.max_test]
        test = train.subset(np.sort(test_idx))
        train = train.compact(np.sort(train_idx))  # in place: one copy of the data at most
    else:
        if cfg.max_train and cfg.max_train < len(train):
            train = train.compact(np.sort(rng.permutation(len(train))[:cfg.max_train]))
        if cfg.max_test and cfg.max_test < len(test):
            test = test.compact(np.sort(rng.permutation(len(test))[:cfg.max_test]))
    return LoadedData(loaded.info, train, test, loaded.natural)


def load(cfg: Config) -> LoadedData:
    """Load both splits of ``cfg.data.dataset`` (rank 0 only)."""
    loaded = DATASETS[cfg.data.dataset].load(cfg.data, cfg.run.seed)
    return resplit(loaded, cfg.data, cfg.run.seed)
