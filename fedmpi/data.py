"""Datasets, partitions and client shards.

Only rank 0 loads a dataset (:func:`load`); it partitions the training split
(:func:`partition`) and the transport sends every client rank the samples of the clients
it owns, so a client rank holds only its own clients' data and never imports torchvision.
Rank 0 reads the image files itself (numpy: IDX files, pickled CIFAR batches), the files
torchvision's loaders read, to the same arrays; importing torchvision (~160 MiB resident:
sympy, PIL, torch._dynamo, ...) happens only to download (``data.download = true``).
Samples stay in their storage dtype (uint8 for images, channels first) until a batch is
drawn; :class:`Normalizer` turns a batch into normalised float32 on the rank's device, and
:class:`Augmenter` (``data.augment``, CIFAR only) crops and flips a batch there first.

Datasets (the image sets are read from ``data.root`` or ``$FEDMPI_DATA_ROOT`` in
torchvision's on-disk layout; torchvision downloads them only if ``data.download = true``)
  ``synthetic``  Synthetic(alpha, beta) of FedProx (Li et al., "Federated Optimization in
                 Heterogeneous Networks", MLSys 2020), the LEAF generator: client k has
                 W_k, b_k ~ N(u_k, 1), u_k ~ N(0, alpha); x ~ N(v_k, diag(j^-1.2)),
                 v_k ~ N(B_k, 1), B_k ~ N(0, beta); y = argmax softmax(W_k x + b_k);
                 n_k = lognormal(4, 2) + syn_min_samples (capped at syn_max_samples, a
                 fedmpi addition: the uncapped tail reaches 10^5 samples). Each client's
                 samples are split train/test by ``syn_test_frac``; the test set is the union
                 of the held-out parts. Partition ``natural`` keeps each client's own data.
  ``mnist``      MNIST, ``<root>/MNIST/raw/``: 1x28x28, 10 classes.
  ``fmnist``     Fashion-MNIST, ``<root>/FashionMNIST/raw/``: 1x28x28, 10 classes.
  ``emnist``     EMNIST, ``<root>/EMNIST/raw/``, split ``data.emnist_split``: byclass (62
                 classes, the 3SFC default), bymerge (47), balanced (47), letters (26; the
                 files' labels 1..26 become 0..25), digits (10), mnist (10). Images as
                 stored in the files, as torchvision returns them (transposed relative to
                 MNIST, as in 3SFC).
  ``cifar10``    CIFAR-10, ``<root>/cifar-10-batches-py/``: 3x32x32, 10 classes.
  ``cifar100``   CIFAR-100, ``<root>/cifar-100-python/``: 3x32x32, 100 (fine) classes.
  The MNIST family is only scaled to [0, 1] (as 3SFC's ``ToTensor``); CIFAR is then
  normalised per channel with the 3SFC code's mean/std (CIFAR-10: (0.4914, 0.4822, 0.4465)
  / (0.2023, 0.1994, 0.2010); CIFAR-100: (0.5071, 0.4867, 0.4408) / (0.2675, 0.2565,
  0.2761)). The test split is the official test set, unless ``data.train_frac`` < 1: then
  (3SFC's protocol) the train split is shuffled and its first ``train_frac`` share is the
  training set, the rest the test set. ``max_train`` / ``max_test`` keep a random subset
  (3SFC's EMNIST: 50,000 / 10,000). CIFAR batch files are checked against torchvision's
  md5 sums unless ``data.check_md5 = false``.

Partitions (all driven by an explicit ``numpy.random.Generator``; docs/algorithms.md section 6)
  ``natural``    the generator's own clients (synthetic only).
  ``iid``        a uniform random split into near-equal parts.
  ``dirichlet``  (variant A) per-class Dirichlet over clients, as 3SFC's ``split_noniid``:
                 for every class c, p_c ~ Dir(alpha 1_N) and the shuffled class indices are
                 cut at cumsum(p_c) n_c. Client sizes are unequal; no minimum size.
  ``dirichlet_balanced``  (variant B, NIID-Bench, Li et al., ICDE 2022) as ``dirichlet``,
                 but before normalising p_c the share of every client that already holds
                 >= n/N samples is zeroed, and the whole draw is repeated until every client
                 has at least ``data.min_size`` samples (at most 1000 draws).
  ``client_dirichlet``  (variant C, FL-Simulator) client i draws a class mixture
                 q_i ~ Dir(alpha 1_C) and its n/N class labels i.i.d. from q_i (equal client
                 sizes). Each class's demands, in random order, take the class's shuffled
                 samples in turn and wrap around when demand exceeds supply, as
                 FL-Simulator refills an exhausted class: this variant may repeat samples
                 (and then leaves others unused); the other partitions use every sample
                 exactly once.
  ``shards``     pathological non-IID: every client holds ``data.classes_per_client`` = c
                 distinct classes, chosen client by client among the classes held by the
                 fewest clients so far (random ties), so every class is held and holder
                 counts differ by at most one; each class's shuffled samples are split
                 evenly among its holders.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedmpi import registry
from fedmpi.config import Config, DataConfig

TAG_DATA = 101  # random-stream tags: numpy.random.default_rng([seed, TAG, ...])
TAG_PARTITION = 102
TAG_SPLIT = 103  # train_frac / max_train / max_test subsets
TAG_AUGMENT = 104  # per (round, client): crop offsets and flips
TAG_HOLDOUT = 105  # per client: data.client_holdout

MAX_REDRAWS = 1000  # dirichlet_balanced: give up after this many draws


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
        # in place only on a converted copy: a float32 ``x`` comes back as itself (the
        # shard). In place saves a batch-sized temporary (rank 0: 6.4 MB per 2048 images)
        fresh = out.dtype != x.dtype or out.device != x.device
        if self.scale != 1.0:
            out = out.mul_(self.scale) if fresh else out * self.scale
            fresh = True
        if self.mean is not None:
            out = out.sub_(self.mean).div_(self.std) if fresh else (out - self.mean) / self.std
        return out


class Augmenter:
    """Random crop with ``pad`` zero pixels of padding, then a random horizontal flip.

    Works on a storage-dtype (N, C, H, W) batch on its own device with one gather (no
    per-sample Python), before normalisation, so padding is black as in torchvision's
    ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``. Offsets and flips come from
    ``numpy.random.default_rng([seed, TAG_AUGMENT, round, client])``, drawn batch by batch,
    so a client's augmentation does not depend on the rank that trains it.
    """

    def __init__(self, seed: int, round_: int, client: int, pad: int = 4):
        self.rng = np.random.default_rng([seed, TAG_AUGMENT, round_, client])
        self.pad = pad

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.pad
        dy, dx = self.rng.integers(0, 2 * p + 1, size=(2, b))
        flip = self.rng.random(b) < 0.5
        rows = dy[:, None] + np.arange(h)
        cols = dx[:, None] + np.where(flip[:, None], np.arange(w)[::-1], np.arange(w))
        dev = x.device
        rows_t = torch.from_numpy(rows).to(dev)[:, None, :, None]
        cols_t = torch.from_numpy(cols).to(dev)[:, None, None, :]
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        return F.pad(x, (p, p, p, p))[bi, ci, rows_t, cols_t]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def augmenter(cfg: Config, round_: int, client: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training-batch transform of one client's round: an :class:`Augmenter` when
    ``data.augment`` is set, else the identity."""
    return Augmenter(cfg.run.seed, round_, client) if cfg.data.augment else _identity


# ---------------------------------------------------------------------------- datasets


def data_root(cfg: DataConfig) -> str:
    """``FEDMPI_DATA_ROOT`` if set, else ``data.root``."""
    return os.environ.get("FEDMPI_DATA_ROOT") or cfg.root


EMNIST_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10,
                  "mnist": 10}
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class CifarFiles:
    """One CIFAR archive's unpacked files with the official md5 sums (as torchvision's
    ``CIFAR10`` / ``CIFAR100`` list them)."""

    folder: str
    train: tuple[tuple[str, str], ...]
    test: tuple[tuple[str, str], ...]
    meta: tuple[str, str]

    @property
    def entries(self) -> tuple[tuple[str, str], ...]:
        return (*self.train, *self.test, self.meta)


CIFAR_FILES = {
    "CIFAR10": CifarFiles(
        "cifar-10-batches-py",
        (("data_batch_1", "c99cafc152244af753f735de768cd75f"),
         ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
         ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
         ("data_batch_4", "634d18415352ddfa80567beed471001a"),
         ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
        (("test_batch", "40351d587109b95175f43aff81a1287e"),),
        ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")),
    "CIFAR100": CifarFiles(
        "cifar-100-python",
        (("train", "16019d7e3df5f24257cddd939b257f8d"),),
        (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        ("meta", "7973b15100ade9c7d40fb424638fde48")),
}


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


def _mnist_info(cfg: DataConfig) -> DatasetInfo:
    return DatasetInfo("mnist", (1, 28, 28), 10, scale=1.0 / 255.0)


def _fmnist_info(cfg: DataConfig) -> DatasetInfo:
    return DatasetInfo("fmnist", (1, 28, 28), 10, scale=1.0 / 255.0)


def _emnist_info(cfg: DataConfig) -> DatasetInfo:
    return DatasetInfo("emnist", (1, 28, 28), EMNIST_CLASSES[cfg.emnist_split],
                       scale=1.0 / 255.0)


def _cifar10_info(cfg: DataConfig) -> DatasetInfo:
    return DatasetInfo("cifar10", (3, 32, 32), 10, 1.0 / 255.0, CIFAR10_MEAN, CIFAR10_STD)


def _cifar100_info(cfg: DataConfig) -> DatasetInfo:
    return DatasetInfo("cifar100", (3, 32, 32), 100, 1.0 / 255.0, CIFAR100_MEAN,
                       CIFAR100_STD)


def _require_files(cfg: DataConfig, folder: str, files: tuple[str, ...], what: str) -> None:
    """DataError naming ``folder`` and the missing files (skipped when downloading)."""
    if cfg.download:
        return
    missing = _missing(folder, files)
    if not missing:
        return
    packed = [f for f in missing if os.path.isfile(os.path.join(folder, f + ".gz"))]
    hint = (f"; the archives {', '.join(f + '.gz' for f in packed)} are there: unpack them "
            "(gunzip -k)" if packed else "")
    raise DataError(f"{what} not found: {os.path.abspath(folder)} lacks {', '.join(missing)} "
                    f"(expected: {', '.join(files)}){hint}. Point data.root (or "
                    "FEDMPI_DATA_ROOT) at the folder that holds it, or set data.download = "
                    "true to let torchvision fetch it")


def _download(cls_name: str, root: str, folder: str, files: tuple[str, ...],
              **kwargs) -> None:
    """``data.download = true`` and files missing (or, CIFAR, failing their md5 check):
    let torchvision fetch and unpack them (instantiating its dataset does that); any
    failure becomes a DataError naming ``folder``."""
    import torchvision  # only here: rank 0 reads the files itself (module docstring)

    cls = getattr(torchvision.datasets, cls_name)
    try:
        cls(root, train=True, download=True, **kwargs)
    except Exception as exc:  # torchvision raises RuntimeError, OSError, ValueError, ...
        raise DataError(f"{cls_name} files under {os.path.abspath(folder)} could not be "
                        f"downloaded (expected: {', '.join(files)}): "
                        f"{type(exc).__name__}: {exc}") from None


def _missing(folder: str, files: tuple[str, ...]) -> list[str]:
    return [f for f in files if not os.path.isfile(os.path.join(folder, f))]


def _unreadable(cls_name: str, folder: str, files: tuple[str, ...], exc: Exception
                ) -> DataError:
    return DataError(f"{cls_name} files under {os.path.abspath(folder)} could not be read "
                     f"(expected: {', '.join(files)}; corrupt or truncated?): "
                     f"{type(exc).__name__}: {exc}")


def read_idx(path: str, ndim: int) -> np.ndarray:
    """A uint8 IDX file (the MNIST family's format) as a C-contiguous array, checked as
    torchvision's ``read_image_file`` / ``read_label_file`` check it: magic 0x0000 0x08
    (unsigned byte) and ``ndim`` big-endian uint32 sizes, then exactly their product of
    bytes. Raises ValueError on anything else."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or not 8 <= head[2] <= 14:
            raise ValueError(f"{path}: not an IDX file (magic {head.hex()})")
        if head[2] != 8 or head[3] != ndim:
            raise ValueError(f"{path}: an IDX file of type {head[2]} with {head[3]} "
                             f"dimension(s), expected type 8 (uint8) with {ndim}")
        dims = fh.read(4 * ndim)
        if len(dims) != 4 * ndim:
            raise ValueError(f"{path}: truncated header")
        shape = tuple(int(v) for v in np.frombuffer(dims, dtype=">u4"))
        count = int(np.prod(shape, dtype=np.int64))
        if size - 4 - 4 * ndim != count:
            raise ValueError(f"{path}: {size - 4 - 4 * ndim} data bytes, expected {count} "
                             f"for shape {shape}")
        x = np.fromfile(fh, dtype=np.uint8, count=count)
    if x.size != count:  # the file changed under us
        raise ValueError(f"{path}: {x.size} data bytes read, expected {count}")
    return x.reshape(shape)


def file_md5(path: str) -> str:
    """md5 of a file (the hex digest torchvision's ``check_integrity`` compares)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_cifar_batches(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pickled CIFAR batches (python version) as (N, 3, 32, 32) uint8 images and int64
    labels (``labels``, or CIFAR-100's ``fine_labels``), in file order: torchvision's
    ``CIFAR10`` arrays, without its channels-last transpose."""
    x = np.zeros((0, 3 * 32 * 32), dtype=np.uint8)
    ys = []
    for path in paths:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        batch = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3 * 32 * 32)
        ys.append(np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"],
                             dtype=np.int64))
        del entry
        n = len(x)
        # grown in place (realloc, mremap for large arrays): the batches are never held
        # twice, as a list and its concatenation
        x.resize((n + len(batch), x.shape[1]), refcheck=False)
        x[n:] = batch
    return x.reshape(-1, 3, 32, 32), np.concatenate(ys)


def _checked(x: np.ndarray, y: np.ndarray, info: DatasetInfo, folder: str,
             split: str) -> ArrayDataset:
    """Sanity of what was read: sample shape, matching lengths, labels in range."""
    where = f"{info.name} {split} split under {os.path.abspath(folder)}"
    if x.shape[1:] != info.input_shape:
        raise DataError(f"{where}: samples of shape {x.shape[1:]}, expected {info.input_shape}")
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{where}: no samples")
    if y.min() < 0 or y.max() >= info.num_classes:
        raise DataError(f"{where}: labels in [{y.min()}, {y.max()}], expected "
                        f"0..{info.num_classes - 1} (wrong files for this dataset or split?)")
    return ArrayDataset(x, y)


def _load_idx(cfg: DataConfig, info: DatasetInfo, cls_name: str, split: str | None = None
              ) -> LoadedData:
    """The MNIST family: IDX files in ``<root>/<cls_name>/raw/``."""
    root = data_root(cfg)
    folder = os.path.join(root, cls_name, "raw")
    kwargs = {}
    if split is None:
        files = IDX_FILES
    else:
        kwargs["split"] = split
        files = tuple(f"emnist-{split}-{s}-{kind}-ubyte" for s in ("train", "test")
                      for kind in ("images-idx3", "labels-idx1"))
    _require_files(cfg, folder, files, cls_name)
    if cfg.download and _missing(folder, files):
        _download(cls_name, root, folder, files, **kwargs)
    out = []
    for i, name in enumerate(_splits(cfg)):
        try:
            x = read_idx(os.path.join(folder, files[2 * i]), 3)[:, None]
            y = read_idx(os.path.join(folder, files[2 * i + 1]), 1).astype(np.int64)
        except (OSError, ValueError) as exc:
            raise _unreadable(cls_name, folder, files, exc) from None
        if split == "letters":
            y = y - 1  # the files' labels are 1..26 (torchvision's class 0 is "N/A")
        out.append(_checked(x, y, info, folder, name))
    return LoadedData(info, out[0], out[1] if len(out) > 1 else _empty(info))


def _splits(cfg: DataConfig) -> tuple[str, ...]:
    """The files' splits to read: not the test split when ``train_frac`` < 1 (the test
    set is then held out of the train split; its files must exist but are not read)."""
    return ("train", "test") if cfg.train_frac >= 1.0 else ("train",)


def _empty(info: DatasetInfo) -> ArrayDataset:
    return ArrayDataset(np.zeros((0, *info.input_shape), dtype=np.uint8),
                        np.zeros(0, dtype=np.int64))


def _load_cifar(cfg: DataConfig, info: DatasetInfo, cls_name: str) -> LoadedData:
    """CIFAR-10/100: pickled batches in ``<root>/<base folder>/``, stored channels first."""
    spec = CIFAR_FILES[cls_name]
    root = data_root(cfg)
    folder = os.path.join(root, spec.folder)
    files = tuple(f for f, _ in spec.entries)
    _require_files(cfg, folder, files, cls_name)

    def mismatched() -> list[str]:
        return [f for f, md5 in spec.entries if not os.path.isfile(os.path.join(folder, f))
                or file_md5(os.path.join(folder, f)) != md5] if cfg.check_md5 else []

    bad = mismatched()
    if cfg.download and (bad or _missing(folder, files)):
        _download(cls_name, root, folder, files)
        bad = mismatched()
    if bad:
        raise DataError(f"{cls_name} files under {os.path.abspath(folder)} differ from "
                        f"the official archive (md5 mismatch: {', '.join(bad)}); replace "
                        "them, or set data.check_md5 = false to accept re-packed files")
    out = []
    splits = (("train", spec.train), ("test", spec.test))[:len(_splits(cfg))]
    for name, entries in splits:
        try:
            x, y = read_cifar_batches([os.path.join(folder, f) for f, _ in entries])
        except Exception as exc:  # unpickling raises anything: corrupt or foreign files
            raise _unreadable(cls_name, folder, files, exc) from None
        out.append(_checked(x, y, info, folder, name))
    return LoadedData(info, out[0], out[1] if len(out) > 1 else _empty(info))


def _load_mnist(cfg: DataConfig, seed: int) -> LoadedData:
    return _load_idx(cfg, _mnist_info(cfg), "MNIST")


def _load_fmnist(cfg: DataConfig, seed: int) -> LoadedData:
    return _load_idx(cfg, _fmnist_info(cfg), "FashionMNIST")


def _load_emnist(cfg: DataConfig, seed: int) -> LoadedData:
    return _load_idx(cfg, _emnist_info(cfg), "EMNIST", cfg.emnist_split)


def _load_cifar10(cfg: DataConfig, seed: int) -> LoadedData:
    return _load_cifar(cfg, _cifar10_info(cfg), "CIFAR10")


def _load_cifar100(cfg: DataConfig, seed: int) -> LoadedData:
    return _load_cifar(cfg, _cifar100_info(cfg), "CIFAR100")


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

# the names fedmpi.config accepts, and the shapes it checks a model against
registry.provide(datasets=DATASETS, partitions=PARTITIONS, augmentable=AUGMENTABLE,
                 dataset_info=info)


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
