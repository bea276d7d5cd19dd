"""Small generated datasets in the exact on-disk formats torchvision reads.

* MNIST / FashionMNIST: ``<root>/<Name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
  IDX files (big-endian header: magic 0x0803 / 0x0801, then the sizes), plus the ``.gz``
  archives torchvision downloads beside them (it reads the unpacked files).
* EMNIST: ``<root>/EMNIST/raw/emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte``
  (the ``letters`` files hold labels 1..26, as the real ones do), plus the ``.gz``
  archives in ``raw/gzip/`` where torchvision's download leaves them.
* CIFAR-10: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``;
  CIFAR-100: ``<root>/cifar-100-python/{train,test,meta}``: pickled dicts (protocol 2, as
  the originals) with ``data`` an (N, 3072) uint8 array in R, G, B planes.

Images carry a class-dependent bright band over uniform noise, so a model can learn them.
Every writer returns the arrays as fedmpi should load them: ``x`` channels first
(N, C, H, W) uint8 and ``y`` 0-based int64 class indices, for the train and test splits.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np

EMNIST_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10,
                  "mnist": 10}


def images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, int, int]
           ) -> np.ndarray:
    """(N, C, H, W) uint8: noise in [0, 64) plus a bright 3-row band whose place and
    channel depend on the label."""
    c, h, w = shape
    x = rng.integers(0, 64, size=(len(labels), c, h, w), dtype=np.uint8)
    rows = (labels * 3) % (h - 3)
    for dr in range(3):
        x[np.arange(len(labels)), labels % c, rows + dr, :] = 255
    return x


def _labels(n_train: int, n_test: int, num_classes: int, rng: np.random.Generator):
    """Labels covering every class (when there are enough samples), shuffled."""
    out = []
    for n in (n_train, n_test):
        y = np.arange(n) % num_classes
        out.append(rng.permutation(y).astype(np.int64))
    return out


def write_idx(path: str, array: np.ndarray, gz_dir: str | None = None) -> None:
    """An IDX file of unsigned bytes (magic 0x08 type, then one 4-byte size per dimension),
    and a gzip copy in ``gz_dir`` if given."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(
        struct.pack(">I", s) for s in array.shape)
    blob = header + array.tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(blob)
    if gz_dir is not None:
        os.makedirs(gz_dir, exist_ok=True)
        with gzip.open(os.path.join(gz_dir, os.path.basename(path) + ".gz"), "wb") as fh:
            fh.write(blob)


def mnist_like(root: str, name: str = "MNIST", n_train: int = 200, n_test: int = 50,
               seed: int = 0, num_classes: int = 10) -> dict[str, np.ndarray]:
    """MNIST or FashionMNIST (``name``) IDX files under ``<root>/<name>/raw``."""
    rng = np.random.default_rng([seed, 1])
    raw = os.path.join(root, name, "raw")
    y_train, y_test = _labels(n_train, n_test, num_classes, rng)
    out = {}
    for prefix, y, key in (("train", y_train, "train"), ("t10k", y_test, "test")):
        x = images(rng, y, (1, 28, 28))
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), x[:, 0], raw)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), y, raw)
        out[f"x_{key}"], out[f"y_{key}"] = x, y
    return out


def emnist(root: str, split: str = "byclass", n_train: int = 200, n_test: int = 50,
           seed: int = 0) -> dict[str, np.ndarray]:
    """EMNIST ``split`` IDX files under ``<root>/EMNIST/raw`` (+ ``raw/gzip/*.gz``)."""
    rng = np.random.default_rng([seed, 2])
    raw = os.path.join(root, "EMNIST", "raw")
    y_train, y_test = _labels(n_train, n_test, EMNIST_CLASSES[split], rng)
    shift = 1 if split == "letters" else 0  # the letters files label a..z as 1..26
    out = {}
    for part, y in (("train", y_train), ("test", y_test)):
        x = images(rng, y, (1, 28, 28))
        stem = os.path.join(raw, f"emnist-{split}-{part}")
        gz = os.path.join(raw, "gzip")
        write_idx(f"{stem}-images-idx3-ubyte", x[:, 0], gz)
        write_idx(f"{stem}-labels-idx1-ubyte", y + shift, gz)
        out[f"x_{part}"], out[f"y_{part}"] = x, y
    return out


def _dump(path: str, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def _batch(x: np.ndarray, names: str, label_keys: dict[str, list[int]], tag: str) -> dict:
    return {"batch_label": tag, **label_keys, "data": x.reshape(len(x), -1),
            "filenames": [f"{names}_{i:05d}.png" for i in range(len(x))]}


def cifar10(root: str, n_train: int = 200, n_test: int = 50, seed: int = 0
            ) -> dict[str, np.ndarray]:
    """``<root>/cifar-10-batches-py``: five training batches, ``test_batch``, ``batches.meta``."""
    rng = np.random.default_rng([seed, 3])
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    y_train, y_test = _labels(n_train, n_test, 10, rng)
    x_train, x_test = images(rng, y_train, (3, 32, 32)), images(rng, y_test, (3, 32, 32))
    for b, idx in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _dump(os.path.join(folder, f"data_batch_{b}"), _batch(
            x_train[idx], "train", {"labels": [int(v) for v in y_train[idx]]},
            f"training batch {b} of 5"))
    _dump(os.path.join(folder, "test_batch"), _batch(
        x_test, "test", {"labels": [int(v) for v in y_test]}, "testing batch 1 of 1"))
    _dump(os.path.join(folder, "batches.meta"), {
        "num_cases_per_batch": max(1, n_train // 5), "num_vis": 3072,
        "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                        "horse", "ship", "truck"]})
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def cifar100(root: str, n_train: int = 200, n_test: int = 100, seed: int = 0
             ) -> dict[str, np.ndarray]:
    """``<root>/cifar-100-python``: ``train``, ``test`` and ``meta``."""
    rng = np.random.default_rng([seed, 4])
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    y_train, y_test = _labels(n_train, n_test, 100, rng)
    out = {}
    for part, y in (("train", y_train), ("test", y_test)):
        x = images(rng, y, (3, 32, 32))
        labels = {"fine_labels": [int(v) for v in y], "coarse_labels": [int(v) // 5 for v in y]}
        _dump(os.path.join(folder, part), _batch(x, part, labels, f"{part}ing batch 1 of 1"))
        out[f"x_{part}"], out[f"y_{part}"] = x, y
    _dump(os.path.join(folder, "meta"), {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    return out


def all_datasets(root: str, n_train: int = 200, n_test: int = 50, seed: int = 0,
                 emnist_split: str = "byclass") -> dict[str, dict[str, np.ndarray]]:
    """Every torchvision dataset fedmpi reads, under one root."""
    return {
        "mnist": mnist_like(root, "MNIST", n_train, n_test, seed),
        "fmnist": mnist_like(root, "FashionMNIST", n_train, n_test, seed + 1),
        "emnist": emnist(root, emnist_split, n_train, n_test, seed),
        "cifar10": cifar10(root, n_train, n_test, seed),
        "cifar100": cifar100(root, n_train, max(n_test, 100), seed),
    }


if __name__ == "__main__":  # python tests/datagen.py ROOT [N_TRAIN N_TEST]: real-size files
    import sys

    target = sys.argv[1]
    sizes = [int(v) for v in sys.argv[2:4]] or [50000, 10000]
    cifar10(target, *sizes)
    print(f"CIFAR-10 ({sizes[0]} + {sizes[1]} images) written under {target}")
