"""Datasets (generated files in torchvision's formats, read through the real code path),
splits, partitions, normalisation and augmentation."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmpi import config, data
from fedmpi.config import ConfigError, DataConfig
from fedmpi.data import DataError

from . import datagen
from .conftest import REPO, mnist_root

BASE = ["data.partition=iid", "data.check_md5=false"]


def cfg_for(root, dataset: str, *extra: str) -> config.Config:
    return config.load(None, [*BASE, f"data.dataset={dataset}", f"data.root={root}", *extra,
                              *(["model.name=convnet"] if dataset.startswith("cifar") else [])])


#: where the real MNIST files are, read before the fixture below hides the variable
MNIST_ROOT = mnist_root()


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("FEDMPI_DATA_ROOT", raising=False)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return str(root), datagen.all_datasets(str(root), 120, 30)


# ---------------------------------------------------------------------------- loading


@pytest.mark.parametrize("dataset, shape, classes", [
    ("mnist", (1, 28, 28), 10), ("fmnist", (1, 28, 28), 10), ("emnist", (1, 28, 28), 62),
    ("cifar10", (3, 32, 32), 10), ("cifar100", (3, 32, 32), 100)])
def test_generated_files_load_exactly(gen, dataset, shape, classes):
    root, expected = gen
    loaded = data.load(cfg_for(root, dataset))
    e = expected[dataset]
    assert loaded.info.input_shape == shape and loaded.info.num_classes == classes
    for split in ("train", "test"):
        got = getattr(loaded, split)
        assert got.x.dtype == np.uint8 and got.x.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(got.x, e[f"x_{split}"])
        np.testing.assert_array_equal(got.y, e[f"y_{split}"])
        assert got.y.dtype == np.int64


@pytest.mark.parametrize("split, classes", list(datagen.EMNIST_CLASSES.items()))
def test_emnist_splits_and_class_counts(tmp_path, split, classes):
    expected = datagen.emnist(str(tmp_path), split, 3 * classes, classes)
    cfg = cfg_for(tmp_path, "emnist", f"data.emnist_split={split}")
    assert data.info(cfg.data).num_classes == classes
    loaded = data.load(cfg)
    np.testing.assert_array_equal(loaded.train.y, expected["y_train"])  # letters: 1..26 -> 0..25
    assert loaded.train.y.min() == 0 and loaded.train.y.max() == classes - 1


TORCHVISION = {"mnist": ("MNIST", {}), "fmnist": ("FashionMNIST", {}),
               "emnist": ("EMNIST", {"split": "byclass"}), "cifar10": ("CIFAR10", {}),
               "cifar100": ("CIFAR100", {})}


@pytest.mark.parametrize("dataset", list(TORCHVISION))
def test_own_readers_give_torchvision_arrays(gen, dataset):
    """fedmpi reads the files itself (no torchvision import on rank 0): the same arrays as
    torchvision's datasets, channels first."""
    import torchvision

    root, _ = gen
    name, kwargs = TORCHVISION[dataset]
    loaded = data.load(cfg_for(root, dataset))
    cls = getattr(torchvision.datasets, name)
    if dataset.startswith("cifar"):  # generated files: torchvision's loader minus its md5s
        cls = type(name, (cls,), {"train_list": [[f, None] for f, _ in cls.train_list],
                                  "test_list": [[f, None] for f, _ in cls.test_list],
                                  "meta": {**cls.meta, "md5": None}})
    for split, train in (("train", True), ("test", False)):
        ref = cls(root, train=train, **kwargs)
        x = np.asarray(ref.data)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # CIFAR: NHWC -> NCHW
        np.testing.assert_array_equal(getattr(loaded, split).x, x)
        np.testing.assert_array_equal(getattr(loaded, split).y, np.asarray(ref.targets))


def test_read_idx_rejects_what_torchvision_rejects(tmp_path):
    path = tmp_path / "f"
    datagen.write_idx(str(path), np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    assert data.read_idx(str(path), 3).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="dimension"):
        data.read_idx(str(path), 1)
    raw = path.read_bytes()
    for bad, what in ((raw[:-1], "data bytes"), (raw + b"\0", "data bytes"),
                      (raw[:10], "truncated header"), (b"\1" + raw[1:], "not an IDX"),
                      (raw[:2] + b"\x0d" + raw[3:], "type 13")):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match=what):
            data.read_idx(str(path), 3)


def test_real_mnist_when_present():
    root = MNIST_ROOT
    if root is None:
        pytest.skip("real MNIST not available")
    loaded = data.load(cfg_for(root, "mnist"))
    assert loaded.train.x.shape == (60000, 1, 28, 28) and loaded.test.x.shape == (10000, 1, 28, 28)
    assert np.bincount(loaded.train.y).tolist()[:2] == [5923, 6742]


def test_normalisation():
    x = torch.arange(0, 256, 85, dtype=torch.uint8).repeat(3, 1).T.reshape(4, 3, 1, 1)
    cifar = data.Normalizer(data.info(DataConfig(dataset="cifar10")))
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(cifar(x), (x.float() / 255 - mean) / std)
    assert data.CIFAR10_STD == (0.2023, 0.1994, 0.2010)  # the 3SFC code's values
    mnist = data.Normalizer(data.info(DataConfig(dataset="emnist")))
    torch.testing.assert_close(mnist(x), x.float() / 255)
    assert x.dtype == torch.uint8  # the shard itself is never modified


def test_normalisation_never_touches_a_float32_shard():
    """float32 storage (synthetic) comes back from ``to`` as itself: no in-place work on it;
    a converted copy may be worked on in place, to the same bits as out of place."""
    info = data.DatasetInfo("f", (3, 2, 2), 4, 0.5, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    norm = data.Normalizer(info)
    x = torch.linspace(-1, 1, 24).reshape(2, 3, 2, 2)
    keep = x.clone()
    mean, std = norm.mean, norm.std
    assert torch.equal(norm(x), (x * 0.5 - mean) / std) and torch.equal(x, keep)
    assert torch.equal(data.Normalizer(dataclasses.replace(info, scale=1.0))(x),
                       (x - mean) / std) and torch.equal(x, keep)
    u = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 2, 2)
    assert torch.equal(norm(u), (u.float() * 0.5 - mean) / std)


def test_env_root_wins(gen, monkeypatch):
    root, _ = gen
    monkeypatch.setenv("FEDMPI_DATA_ROOT", root)
    assert len(data.load(cfg_for("/nonexistent", "fmnist")).train) == 120


# ---------------------------------------------------------------------------- bad files


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if torchvision tries to fetch anything."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.mnist as tv_mnist

    def forbidden(*a, **k):
        raise AssertionError(f"download attempted: {a}")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", forbidden)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", forbidden)


@pytest.mark.parametrize("dataset, folder, files", [
    ("mnist", "MNIST/raw", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    ("fmnist", "FashionMNIST/raw", ["train-labels-idx1-ubyte"]),
    ("emnist", "EMNIST/raw", ["emnist-byclass-train-images-idx3-ubyte"]),
    ("cifar10", "cifar-10-batches-py", ["data_batch_1", "data_batch_5", "batches.meta"]),
    ("cifar100", "cifar-100-python", ["train", "test", "meta"])])
def test_missing_files_name_path_and_files_and_never_download(tmp_path, no_download, dataset,
                                                              folder, files):
    with pytest.raises(DataError) as err:
        data.load(cfg_for(tmp_path, dataset))
    msg = str(err.value)
    assert str(tmp_path / folder) in msg
    assert all(f in msg for f in files)
    assert "data.download" in msg


def test_only_archives_present_hints_to_unpack(tmp_path, no_download):
    datagen.mnist_like(str(tmp_path), "MNIST", 20, 10)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz are there: unpack"):
        data.load(cfg_for(tmp_path, "mnist"))


def test_download_true_is_passed_to_torchvision(tmp_path, monkeypatch):
    """download = true hands the fetch to torchvision (here a stand-in that writes the files
    the real one would unpack); its failure is a DataError."""
    import torchvision.datasets.mnist as tv_mnist

    calls = []

    def fake_fetch(url, download_root, filename=None, md5=None, **kw):
        calls.append(filename)
        datagen.mnist_like(str(tmp_path), "FashionMNIST", 20, 10)

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fake_fetch)
    loaded = data.load(cfg_for(tmp_path, "fmnist", "data.download=true"))
    assert calls and len(loaded.train) == 20

    def offline(*a, **k):
        raise RuntimeError("no network")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="could not be downloaded"):
        data.load(cfg_for(tmp_path / "other", "mnist", "data.download=true"))


def _write_mnist(tmp_path, **changes):
    out = datagen.mnist_like(str(tmp_path), "MNIST", 40, 10)
    raw = tmp_path / "MNIST" / "raw"
    for name, array in changes.items():
        datagen.write_idx(str(raw / name), array)
    return out, raw


def test_truncated_file_is_a_data_error(tmp_path):
    _, raw = _write_mnist(tmp_path)
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=str(raw)):
        data.load(cfg_for(tmp_path, "mnist"))


def test_label_count_mismatch_is_a_data_error(tmp_path):
    _write_mnist(tmp_path, **{"train-labels-idx1-ubyte": np.zeros(39, np.uint8)})
    with pytest.raises(DataError, match="40 images but 39 labels"):
        data.load(cfg_for(tmp_path, "mnist"))


def test_labels_out_of_range_are_a_data_error(tmp_path):
    _write_mnist(tmp_path, **{"t10k-labels-idx1-ubyte": np.full(10, 12, np.uint8)})
    with pytest.raises(DataError, match="expected 0..9"):
        data.load(cfg_for(tmp_path, "mnist"))


def test_cifar_md5_checked_by_default(gen, no_download):
    root, _ = gen
    cfg = cfg_for(root, "cifar10", "data.check_md5=true")
    with pytest.raises(DataError, match="md5 mismatch: data_batch_1, .*batches.meta"):
        data.load(cfg)


# ---------------------------------------------------------------------------- splits


def _rows(x: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in x.reshape(len(x), -1)}


def test_train_frac_holds_out_part_of_the_train_split(gen):
    root, e = gen
    a = data.load(cfg_for(root, "cifar10", "data.train_frac=0.75"))
    assert len(a.train) == 90 and len(a.test) == 30
    train, test, full = _rows(a.train.x), _rows(a.test.x), _rows(e["cifar10"]["x_train"])
    assert len(full) == 120 and not train & test and train | test == full
    assert not test & _rows(e["cifar10"]["x_test"])  # the official test set is unused
    b = data.load(cfg_for(root, "cifar10", "data.train_frac=0.75"))
    np.testing.assert_array_equal(a.train.x, b.train.x)
    c = data.load(cfg_for(root, "cifar10", "data.train_frac=0.75", "run.seed=1"))
    assert _rows(c.train.x) != train


def test_max_train_and_max_test(gen):
    root, e = gen
    a = data.load(cfg_for(root, "fmnist", "data.max_train=50", "data.max_test=7"))
    assert len(a.train) == 50 and len(a.test) == 7
    assert _rows(a.train.x) <= _rows(e["fmnist"]["x_train"])
    assert _rows(a.test.x) <= _rows(e["fmnist"]["x_test"])
    # 3SFC's EMNIST protocol: random 50k / 10k out of the train split
    b = data.load(cfg_for(root, "emnist", "data.train_frac=0.5", "data.max_train=40",
                          "data.max_test=20"))
    assert len(b.train) == 40 and len(b.test) == 20 and not _rows(b.train.x) & _rows(b.test.x)


def test_held_out_test_sets_do_not_read_the_test_files(tmp_path, gen):
    """With train_frac < 1 the test set comes from the train split: the official test
    files must exist but are not read (rank 0 never holds them); with 1 they are."""
    _, raw = _write_mnist(tmp_path)
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    held = data.load(cfg_for(tmp_path, "mnist", "data.train_frac=0.5"))
    assert len(held.train) == 20 and len(held.test) == 20
    with pytest.raises(DataError, match=str(raw)):
        data.load(cfg_for(tmp_path, "mnist"))
    path.unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):  # still required
        data.load(cfg_for(tmp_path, "mnist", "data.train_frac=0.5"))


def test_compact_moves_the_kept_rows_into_the_datasets_own_arrays():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (10_000, 3, 4), dtype=np.uint8)
    y = rng.integers(0, 10, 10_000)
    ds = data.ArrayDataset(x.copy(), y.copy())
    for idx in (np.sort(rng.choice(10_000, 7_001, replace=False)), np.arange(3, 10_000),
                np.arange(0), np.asarray([9_999])):
        ds = data.ArrayDataset(x.copy(), y.copy())
        out = ds.compact(idx, chunk=1000)  # several chunks
        np.testing.assert_array_equal(out.x, x[idx])
        np.testing.assert_array_equal(out.y, y[idx])
        assert not idx.size or (np.shares_memory(out.x, ds.x) and np.shares_memory(out.y, ds.y))
    with pytest.raises(ValueError, match="increasing"):
        ds.compact(np.asarray([4, 2]))
    frozen = data.ArrayDataset(x.copy(), y.copy())
    frozen.x.flags.writeable = False
    out = frozen.compact(np.asarray([1, 5]))  # a read-only dataset is copied, not written
    np.testing.assert_array_equal(out.x, x[[1, 5]])
    np.testing.assert_array_equal(frozen.x, x)


def test_train_frac_leaving_nothing_is_a_data_error(gen):
    root, _ = gen
    with pytest.raises(DataError, match="train_frac"):
        data.load(cfg_for(root, "mnist", "data.train_frac=0.001"))


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, key", [
    (["data.dataset=mnist", "data.augment=true"], "data.augment"),
    (["data.dataset=cifar10", "data.train_frac=0.0", "model.name=convnet"], "data.train_frac"),
    (["data.dataset=mnist", "data.train_frac=1.5"], "data.train_frac"),
    (["data.train_frac=0.8"], "data.train_frac"),  # synthetic has its own split
    (["data.max_train=10"], "data.max_train"),
    (["data.dataset=mnist", "data.max_test=-1"], "data.max_test"),
    (["data.dataset=mnist", "data.min_size=0"], "data.min_size"),
    (["data.dataset=mnist", "data.classes_per_client=0"], "data.classes_per_client"),
    (["data.dataset=mnist", "data.partition=shards", "data.classes_per_client=11"],
     "data.classes_per_client"),
    (["data.dataset=emnist", "data.emnist_split=byletter"], "data.emnist_split"),
    (["data.dataset=mnist", "data.partition=pathological"], "data.partition"),
])
def test_config_errors_name_the_key(overrides, key):
    image = any(o.startswith("data.dataset=") for o in overrides)
    if image and not any(o.startswith("data.partition=") for o in overrides):
        overrides = ["data.partition=iid", *overrides]
    with pytest.raises(ConfigError) as err:
        config.load(None, overrides)
    assert err.value.key == key


def test_new_keys_round_trip_through_toml():
    cfg = config.load(None, ["data.dataset=emnist", "data.partition=client_dirichlet",
                             "data.emnist_split=letters", "data.train_frac=0.8",
                             "data.max_train=500", "data.min_size=3"])
    assert config.loads(config.to_toml(cfg)) == cfg


# ---------------------------------------------------------------------------- partitions


def labels_of(sizes: list[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)), sizes))


def split(name: str, labels: np.ndarray, n: int, seed: int = 0, **kw) -> list[np.ndarray]:
    cfg = dataclasses.replace(DataConfig(dataset="mnist", partition=name, num_clients=n), **kw)
    return data.PARTITIONS[name](labels, n, cfg, np.random.default_rng([seed, 7]))


ONCE = ["iid", "dirichlet", "dirichlet_balanced", "shards"]
LABELS = labels_of([120, 80, 100, 60, 140, 90, 110, 70, 100, 130])


@pytest.mark.parametrize("name", ONCE)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_sample_exactly_once(name, seed):
    parts = split(name, LABELS, 7, seed, alpha=0.5, classes_per_client=3, min_size=5)
    assert len(parts) == 7
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(len(LABELS)))
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


@pytest.mark.parametrize("name", [*ONCE, "client_dirichlet"])
def test_reproducible_under_the_same_seed(name):
    a = split(name, LABELS, 6, 3, classes_per_client=3)
    b = split(name, LABELS, 6, 3, classes_per_client=3)
    c = split(name, LABELS, 6, 4, classes_per_client=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of client label distributions from the global one."""
    k = labels.max() + 1
    glob = np.bincount(labels, minlength=k) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - glob
                                       ).sum() for p in parts]))


@pytest.mark.parametrize("name", ["dirichlet", "dirichlet_balanced", "client_dirichlet"])
def test_skew_grows_as_alpha_falls(name):
    labels = labels_of([300] * 10)
    s = [np.mean([skew(labels, split(name, labels, 10, seed, alpha=a, min_size=1))
                  for seed in range(3)]) for a in (100.0, 1.0, 0.1)]
    assert s[0] < s[1] < s[2], s
    assert s[0] < 0.1 and s[2] > 0.5, s


def test_dirichlet_balanced_honours_min_size_where_dirichlet_does_not():
    labels = labels_of([100] * 10)
    plain = [min(map(len, split("dirichlet", labels, 20, s, alpha=0.1))) for s in range(5)]
    assert min(plain) < 20
    for s in range(5):
        parts = split("dirichlet_balanced", labels, 20, s, alpha=0.1, min_size=20)
        assert min(map(len, parts)) >= 20


def test_impossible_requests_raise():
    with pytest.raises(DataError, match="min_size = 11 x data.num_clients = 10"):
        split("dirichlet_balanced", labels_of([10] * 10), 10, min_size=11)
    with pytest.raises(DataError, match="no draw in 1000"):  # 10 classes cannot feed 50
        split("dirichlet_balanced", labels_of([50] * 10), 50, alpha=1e-3, min_size=10)
    with pytest.raises(DataError, match="classes_per_client = 4 exceeds the 3 classes"):
        split("shards", labels_of([5, 5, 5]), 2, classes_per_client=4)
    with pytest.raises(DataError, match="some classes would belong to no client"):
        split("shards", labels_of([5] * 10), 3, classes_per_client=3)


def test_client_dirichlet_equal_sizes_and_documented_repeats():
    labels = labels_of([400, 50, 50, 50, 50, 50, 50, 50, 50, 50])
    parts = split("client_dirichlet", labels, 9, alpha=0.3)
    sizes = sorted(map(len, parts))
    assert sum(sizes) == len(labels) and sizes[-1] - sizes[0] <= 1
    used = np.concatenate(parts)
    for c in range(10):  # a class is reused in turn: no sample twice before all once
        members = np.flatnonzero(labels == c)
        uses = np.bincount(used[np.isin(used, members)], minlength=len(labels))[members]
        assert uses.max() - uses.min() <= 1
    assert len(np.unique(used)) < len(labels)  # small classes were demanded more than held
    near_iid = split("client_dirichlet", labels_of([100] * 10), 5, alpha=1e4)
    assert skew(labels_of([100] * 10), near_iid) < 0.1


def test_shards_give_each_client_c_classes_and_cover_all():
    labels = labels_of([60] * 10)
    for n, c in ((10, 2), (7, 3), (4, 3), (20, 1)):
        parts = split("shards", labels, n, classes_per_client=c)
        held = [set(np.unique(labels[p]).tolist()) for p in parts]
        assert all(len(h) == c for h in held)
        counts = np.bincount([k for h in held for k in h], minlength=10)
        assert counts.min() >= 1 and counts.max() - counts.min() <= 1
    assert len({frozenset(h) for h in held}) > 1


def test_partition_wrapper_and_class_counts(gen):
    root, _ = gen
    cfg = cfg_for(root, "fmnist", "data.partition=shards", "data.num_clients=5",
                  "data.classes_per_client=2")
    loaded = data.load(cfg)
    parts = data.partition(loaded, cfg)
    counts = data.class_counts(loaded.train.y, parts, 10)
    assert counts.shape == (5, 10) and counts.sum() == len(loaded.train)
    assert ((counts > 0).sum(axis=1) == 2).all()
    again = data.partition(loaded, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_empty_client_is_a_data_error(gen):
    root, _ = gen
    cfg = cfg_for(root, "mnist", "data.partition=dirichlet", "data.alpha=0.001",
                  "data.num_clients=30")
    with pytest.raises(DataError, match="without samples"):
        data.partition(data.load(cfg), cfg)


# ---------------------------------------------------------------------------- augmentation


def test_augmenter_crops_and_flips_each_image():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = data.Augmenter(seed=0, round_=2, client=5)(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    offsets, flips = set(), 0
    for i in range(len(x)):
        found = None
        for dy in range(9):
            for dx in range(9):
                crop = padded[i, :, dy:dy + 32, dx:dx + 32]
                for flip in (False, True):
                    if torch.equal(out[i], crop.flip(-1) if flip else crop):
                        found = (dy, dx, flip)
        assert found is not None, i
        offsets.add(found[:2])
        flips += found[2]
    assert len(offsets) > 20 and 10 < flips < 54


def test_augmenter_streams():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = data.Augmenter(0, 1, 2)
    b = data.Augmenter(0, 1, 2)
    first, second = a(x), a(x)
    assert torch.equal(first, b(x)) and torch.equal(second, b(x))  # batch by batch
    assert not torch.equal(first, second)
    assert not torch.equal(first, data.Augmenter(0, 1, 3)(x))  # per client
    assert not torch.equal(first, data.Augmenter(0, 2, 2)(x))  # per round


def test_augmenter_only_when_configured():
    on = config.load(None, ["data.dataset=cifar10", "data.partition=iid", "model.name=convnet",
                            "data.augment=true"])
    off = config.load(None, ["data.dataset=cifar10", "data.partition=iid", "model.name=convnet"])
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert isinstance(data.augmenter(on, 0, 0), data.Augmenter)
    assert data.augmenter(off, 0, 0)(x) is x


# ---------------------------------------------------------------------------- rank roles


#: modules a client rank must never load (each costs resident memory on every rank:
#: torchvision ~160 MiB with its sympy / PIL / torch._dynamo imports, h5py ~10 MiB)
HEAVY = ("torchvision", "h5py", "sympy", "PIL", "torch._dynamo", "torch._inductor", "triton",
         "matplotlib", "scipy")


def test_client_side_modules_do_not_import_torchvision():
    code = ("import sys\n"
            "from fedmpi import client, config, data, models, server, train\n"
            "cfg = config.load(None, ['data.dataset=cifar100', 'data.partition=iid',"
            " 'model.name=resnet18', 'data.augment=true'])\n"
            "data.info(cfg.data)\n"
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "assert not heavy, f'imported: {heavy}'\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=str(Path(REPO)), timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_loading_image_files_imports_no_torchvision(gen):
    """Rank 0 reads MNIST-family and CIFAR files without torchvision (download = false)."""
    root, _ = gen
    code = ("import sys\n"
            "from fedmpi import config, data\n"
            "for name in ('mnist', 'emnist', 'cifar10', 'cifar100'):\n"
            f"    cfg = config.load(None, ['data.root={root}', 'data.dataset=' + name,"
            " 'data.partition=iid', 'data.check_md5=false'] + (['model.name=convnet']"
            " if name.startswith('cifar') else []))\n"
            "    assert len(data.load(cfg).train) == 120\n"
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "assert not heavy, f'imported: {heavy}'\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FEDMPI_DATA_ROOT", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=str(Path(REPO)), timeout=120)
    assert proc.returncode == 0, proc.stderr
