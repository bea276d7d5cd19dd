"""Datasets, partitions and client shards.

Only rank 0 loads a dataset (:func:`load`); it partitions the training split
(:func:`partition`) and the transport sends every client rank the samples of the clients
it owns, so a client rank holds only its own clients' data and never imports torchvision.
Samples stay in their storage dtype (uint8 for images) until a batch is drawn;
:class:`Normalizer` turns a batch into normalised float32 on the rank's device.

Datasets
  ``synthetic``  Synthetic(alpha, beta) of FedProx (Li et al., "Federated Optimization in
                 Heterogeneous Networks", MLSys 2020), the LEAF generator: client k has
                 W_k, b_k ~ N(u_k, 1), u_k ~ N(0, alpha); x ~ N(v_k, diag(j^-1.2)),
                 v_k ~ N(B_k, 1), B_k ~ N(0, beta); y = argmax softmax(W_k x + b_k);
                 n_k = lognormal(4, 2) + syn_min_samples (capped at syn_max_samples, a
                 fedmpi addition: the uncapped tail reaches 10^5 samples). Each client's
                 samples are split train/test by ``syn_test_frac``; the test set is the union
                 of the held-out parts. Partition ``natural`` keeps each client's own data.
  ``mnist``      torchvision MNIST (official train/test split), no normalisation beyond /255.

Partitions (all driven by an explicit ``numpy.random.Generator``)
  ``natural``    the generator's own clients (synthetic only).
  ``iid``        a uniform random split into near-equal parts.
  ``dirichlet``  per-class Dirichlet over clients, as 3SFC's ``split_noniid``: for every
                 class c, p_c ~ Dir(alpha 1_N) and the shuffled class indices are cut at
                 cumsum(p_c) n_c. Client sizes are unequal.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedmpi.config import Config, DataConfig

TAG_DATA = 101  # random-stream tags: numpy.random.default_rng([seed, TAG, ...])
TAG_PARTITION = 102


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


@dataclass
class LoadedData:
    """Rank 0's view: both splits, plus the generator's own client split where there is one."""

    info: DatasetInfo
    train: ArrayDataset
    test: ArrayDataset
    natural: list[np.ndarray] | None = None


class Normalizer:
    """Storage-dtype batch -> normalised float32 tensor on ``device``."""

    def __init__(self, info: DatasetInfo, device: torch.device | str = "cpu"):
        self.scale = info.scale
        shape = (1, -1) + (1,) * (len(info.input_shape) - 1)
        self.mean = None if info.mean is None else torch.tensor(
            info.mean, dtype=torch.float32, device=device).view(shape)
        self.std = None if info.std is None else torch.tensor(
            info.std, dtype=torch.float32, device=device).view(shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = x.to(torch.float32)
        if self.scale != 1.0:
            out = out * self.scale  # never in place: ``out`` may be the shard itself
        if self.mean is not None:
            out = (out - self.mean) / self.std
        return out


# ---------------------------------------------------------------------------- datasets


def data_root(cfg: DataConfig) -> str:
    """``FEDMPI_DATA_ROOT`` if set, else ``data.root``."""
    return os.environ.get("FEDMPI_DATA_ROOT") or cfg.root


def _synthetic_info(cfg: DataConfig) -> DatasetInfo:
    return DatasetInfo("synthetic", (cfg.syn_dim,), cfg.syn_classes)


def _mnist_info(cfg: DataConfig) -> DatasetInfo:
    return DatasetInfo("mnist", (1, 28, 28), 10, scale=1.0 / 255.0)


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


def _load_synthetic(cfg: DataConfig, seed: int) -> LoadedData:
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


def _torchvision_split(cls_name: str, root: str, train: bool, download: bool, expected: str,
                       **kwargs) -> tuple[np.ndarray, np.ndarray]:
    import torchvision  # only rank 0 loads datasets; client ranks never import this

    cls = getattr(torchvision.datasets, cls_name)
    try:
        ds = cls(root, train=train, download=download, **kwargs)
    except RuntimeError as exc:
        hint = "" if download else " (set data.download = true to let torchvision fetch them)"
        raise DataError(f"{cls_name} not found or corrupt under {os.path.abspath(root)}: "
                        f"expected {expected}{hint}; torchvision said: {exc}") from None
    except (OSError, EOFError, ValueError, AssertionError) as exc:
        raise DataError(f"{cls_name} files under {os.path.abspath(root)} could not be read "
                        f"(expected {expected}): {type(exc).__name__}: {exc}") from None
    x = np.asarray(ds.data)
    y = np.asarray(ds.targets, dtype=np.int64)
    return x, y


def _load_mnist(cfg: DataConfig, seed: int) -> LoadedData:
    root = data_root(cfg)
    expected = ("MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]")
    splits = [_torchvision_split("MNIST", root, t, cfg.download, expected) for t in (True, False)]
    (trx, try_), (tex, tey) = splits
    return LoadedData(_mnist_info(cfg), ArrayDataset(trx[:, None], try_),
                      ArrayDataset(tex[:, None], tey))


@dataclass(frozen=True)
class DatasetEntry:
    info: Callable[[DataConfig], DatasetInfo]
    load: Callable[[DataConfig, int], LoadedData]


DATASETS: dict[str, DatasetEntry] = {
    "synthetic": DatasetEntry(_synthetic_info, _load_synthetic),
    "mnist": DatasetEntry(_mnist_info, _load_mnist),
}


def info(cfg: DataConfig) -> DatasetInfo:
    return DATASETS[cfg.dataset].info(cfg)


def load(cfg: Config) -> LoadedData:
    """Load both splits of ``cfg.data.dataset`` (rank 0 only)."""
    return DATASETS[cfg.data.dataset].load(cfg.data, cfg.run.seed)


# ---------------------------------------------------------------------------- partitions


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


PARTITIONS: dict[str, Callable | None] = {"natural": None, "iid": _iid, "dirichlet": _dirichlet}


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
                        f"without samples (alpha = {cfg.data.alpha}); raise data.alpha or "
                        "lower data.num_clients")
    return parts


def class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """clients x classes sample counts (the HDF5 ``/partition`` table)."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]
                    ).astype(np.int64)
