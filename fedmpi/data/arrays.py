"""The in-memory dataset types every data module shares, and the random-stream tags."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TAG_DATA = 101  # random-stream tags: numpy.random.default_rng([seed, TAG, ...])
TAG_PARTITION = 102
TAG_SPLIT = 103  # train_frac / max_train / max_test subsets
TAG_AUGMENT = 104  # per (round, client): crop offsets and flips
TAG_HOLDOUT = 105  # per client: data.client_holdout


class DataError(RuntimeError):
    """Missing, corrupt or unusable dataset files (the message names the path)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What every rank knows about a dataset without loading it."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    scale: float = 1.0  #: storage value * scale ...
    mean: tuple[float, ...] | None = None  #: ... then (x - mean) / std per channel
    std: tuple[float, ...] | None = None


@dataclass
class ArrayDataset:
    x: np.ndarray  #: (N, *input_shape) in storage dtype
    y: np.ndarray  #: (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.x[idx], self.y[idx])

    def compact(self, idx: np.ndarray, chunk: int = 4096) -> ArrayDataset:
        """The rows ``idx`` (strictly increasing) moved to the front of this dataset's own
        arrays, chunk by chunk, and returned as views of them: no second copy of the data
        (rank 0's peak at load). This dataset's rows are overwritten. Read-only arrays are
        copied instead (:meth:`subset`)."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError("compact needs strictly increasing indices")
        if not (self.x.flags.writeable and self.y.flags.writeable):
            return self.subset(idx)
        # row i comes from idx[i] >= i, and rows >= lo are not written before chunk lo
        for lo in range(0, len(idx), chunk):
            rows = idx[lo:lo + chunk]
            self.x[lo:lo + len(rows)] = self.x[rows]
            self.y[lo:lo + len(rows)] = self.y[rows]
        return ArrayDataset(self.x[:len(idx)], self.y[:len(idx)])


@dataclass
class LoadedData:
    """Rank 0's view: both splits, plus the generator's own client split where there is one."""

    info: DatasetInfo
    train: ArrayDataset
    test: ArrayDataset
    natural: list[np.ndarray] | None = None
