"""Readers of the image datasets' files (MNIST-family IDX files, pickled CIFAR batches) in
torchvision's on-disk layout; torchvision is imported only to download."""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass

import numpy as np

from fedmpi.config import DataConfig
from fedmpi.data.arrays import ArrayDataset, DataError, DatasetInfo, LoadedData


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
