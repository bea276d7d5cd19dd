"""Every (dataset, model) pair of the papers trains for two rounds at -n 1 and -n 3.

The image datasets are small generated files in torchvision's on-disk formats
(tests/datagen.py), read through the real loading code; MNIST uses the real files when
present (capped by data.max_train / max_test). To keep process launches few, one MPI job
per rank count runs every pair in turn through ``fedmpi.train.run`` (this file is also
the driver: ``python -m mpi4py -m tests.test_datasets_e2e SPEC OUT``); the driver records,
on every rank, which clients' samples that rank holds after the shard distribution and
whether it imported torchvision.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from . import datagen
from .conftest import mnist_root, run_train

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
N_TRAIN, N_TEST, MNIST_CAP = 160, 40, 200
SAMPLE_BYTES = {"mnist": 784, "fmnist": 784, "emnist": 784, "cifar10": 3072, "cifar100": 3072,
                "synthetic": 60 * 4}  # storage bytes of one sample (uint8 images, fp32)

#: ResNet-18 (11.2M parameters) gets the smallest run -n 3 allows: one client per rank
SMALLEST = ["data.num_clients=2", "client.batch_size=4"]

#: (run name, dataset, model, extra --set items); partitions rotate over all variants
PAIRS = [
    ("mnist-mlp", "mnist", "mlp", ["data.partition=iid"]),
    ("mnist-mnistnet", "mnist", "mnistnet", ["data.partition=dirichlet"]),
    ("mnist-convnet", "mnist", "convnet", ["data.partition=shards",
                                           "data.classes_per_client=3"]),
    ("fmnist-mlp", "fmnist", "mlp", ["data.partition=dirichlet_balanced"]),
    ("fmnist-mnistnet", "fmnist", "mnistnet", ["data.partition=client_dirichlet"]),
    ("emnist-mlp", "emnist", "mlp", ["data.partition=dirichlet"]),
    ("emnist-mnistnet", "emnist", "mnistnet", ["data.partition=iid"]),
    ("cifar10-convnet", "cifar10", "convnet", ["data.partition=dirichlet"]),
    ("cifar10-convnet-aug", "cifar10", "convnet", ["data.partition=dirichlet",
                                                   "data.augment=true"]),
    ("cifar10-resnet18", "cifar10", "resnet18", ["data.partition=iid", *SMALLEST]),
    ("cifar10-regnetx_200mf", "cifar10", "regnetx_200mf", ["data.partition=client_dirichlet"]),
    ("cifar10-vgg11star", "cifar10", "vgg11star", ["data.partition=dirichlet_balanced"]),
    ("cifar10-lenet5", "cifar10", "lenet5", ["data.partition=shards",
                                             "data.classes_per_client=3"]),
    ("cifar100-convnet", "cifar100", "convnet", ["data.partition=iid"]),
    ("cifar100-resnet18", "cifar100", "resnet18", ["data.partition=dirichlet", *SMALLEST]),
    ("cifar100-regnetx_200mf", "cifar100", "regnetx_200mf", ["data.partition=iid"]),
    ("cifar100-vgg11star", "cifar100", "vgg11star", ["data.partition=client_dirichlet"]),
    ("cifar100-lenet5", "cifar100", "lenet5", ["data.partition=dirichlet_balanced"]),
    ("synthetic-logreg", "synthetic", "logreg", ["data.partition=natural"]),
]
COMMON = ["run.rounds=2", "run.threads=1", "client.local_steps=1", "client.batch_size=8",
          "data.num_clients=4", "data.check_md5=false", "data.min_size=5"]


def _spec(gen_root: str) -> list[dict]:
    """Run name -> argv for fedmpi.train, for every pair."""
    real_mnist = mnist_root()
    out = []
    for name, dataset, model, extra in PAIRS:
        items = [*COMMON, f"data.dataset={dataset}", f"model.name={model}", *extra]
        if dataset == "mnist" and real_mnist:
            items += [f"data.root={real_mnist}", f"data.max_train={MNIST_CAP}",
                      f"data.max_test={N_TEST}"]
        elif dataset != "synthetic":
            items.append(f"data.root={gen_root}")
        if dataset == "synthetic":
            items += ["model.hidden=16", "data.syn_max_samples=60"]
        out.append({"name": name, "args": [a for it in items for a in ("--set", it)]})
    return out


def _clients(extra: list[str]) -> int:
    return 2 if "data.num_clients=2" in extra else 4


def _train_size(dataset: str) -> int:
    return MNIST_CAP if dataset == "mnist" and mnist_root() else N_TRAIN


def _launch(n: int, spec: list[dict], out: Path, timeout: float = 600):
    from fedmpi import launch

    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    base = launch.command(n, "fedmpi.train")
    cmd = [*base[:base.index(sys.executable)], sys.executable, "-m", "mpi4py", "-m",
           "tests.test_datasets_e2e", str(spec_path), str(out)]
    env = launch.environment()
    env.pop("FEDMPI_DATA_ROOT", None)  # every run names its own data.root
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(REPO))
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n"
                             f"{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return json.loads((out / "ranks.json").read_text())


@pytest.fixture(scope="module")
def gen_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("gen")
    datagen.all_datasets(str(root), N_TRAIN, N_TEST)
    return str(root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gen_root) -> dict[int, tuple[Path, list[dict]]]:
    spec = _spec(gen_root)
    out = {}
    for n in (1, 3):
        folder = tmp_path_factory.mktemp(f"n{n}")
        out[n] = (folder, _launch(n, spec, folder))
    return out


def _read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {"complete": bool(f.attrs.get("complete", False)),
                "partition": f["partition"][()],
                "owners": f.attrs["owners"],
                **{k: f["rounds"][k][()] for k in ("round", "test_acc", "test_loss",
                                                   "train_loss")}}


@pytest.mark.slow
@pytest.mark.parametrize("name, dataset, model, extra", PAIRS, ids=[p[0] for p in PAIRS])
def test_pair_trains_two_rounds_at_1_and_3_ranks(runs, name, dataset, model, extra):
    res = {n: _read(runs[n][0] / f"{name}.h5") for n in (1, 3)}
    for n, r in res.items():
        assert r["complete"], f"-n {n}: run not marked complete"
        assert list(r["round"]) == [0, 1]
        assert np.all(np.isfinite(r["test_loss"])) and np.all(np.isfinite(r["train_loss"]))
        assert r["partition"].shape[0] == _clients(extra)
        if dataset != "synthetic":
            assert r["partition"].sum() == _train_size(dataset)
    # the same seed gives the same numbers whatever the number of ranks
    np.testing.assert_array_equal(res[1]["partition"], res[3]["partition"])
    for key in ("test_acc", "test_loss", "train_loss"):
        np.testing.assert_array_equal(res[1][key], res[3][key], err_msg=key)


@pytest.mark.slow
def test_client_ranks_hold_only_their_clients_and_no_rank_imports_torchvision(runs):
    folder, ranks = runs[3]
    by_rank = {r["rank"]: r for r in ranks}
    assert sorted(by_rank) == [0, 1, 2]
    for r in (0, 1, 2):  # fedmpi reads the files itself: torchvision only downloads
        assert not by_rank[r]["torchvision"], f"rank {r} imported torchvision"
    for name, dataset, _, extra in PAIRS:
        res = _read(folder / f"{name}.h5")
        owners = ast.literal_eval(str(res["owners"]))
        sizes = res["partition"].sum(axis=1)
        assert by_rank[0]["runs"][name]["held"] == {}, "the server holds no client data"
        seen = []
        for r in (1, 2):
            rec = by_rank[r]["runs"][name]
            held = {int(c): n for c, n in rec["held"].items()}
            assert sorted(held) == owners[r]
            assert all(held[c] == sizes[c] for c in held), name
            assert rec["bytes"] == sum(held.values()) * SAMPLE_BYTES[dataset], name
            seen += list(held)
        assert sorted(seen) == list(range(_clients(extra))), name

@pytest.mark.slow
def test_augment_changes_training(runs):
    """data.augment routes every training batch through the crop + flip (client.py); the
    pair differs from cifar10-convnet in that key only."""
    for n in (1, 3):
        plain = _read(runs[n][0] / "cifar10-convnet.h5")
        aug = _read(runs[n][0] / "cifar10-convnet-aug.h5")
        np.testing.assert_array_equal(plain["partition"], aug["partition"])
        assert not np.array_equal(plain["train_loss"], aug["train_loss"])


@pytest.mark.parametrize("n, case", [(3, "missing"), (1, "corrupt")])
def test_bad_data_exits_2_on_every_rank_without_a_run_file(tmp_path, monkeypatch, n, case):
    monkeypatch.delenv("FEDMPI_DATA_ROOT", raising=False)  # it would win over data.root
    root = tmp_path / "data"
    items = ["data.num_clients=4", "run.threads=1", "data.partition=iid"]
    if case == "missing":  # an empty root
        root.mkdir()
        items += ["data.dataset=cifar10", "model.name=convnet"]
        expect = ["cifar-10-batches-py", "data_batch_1", "test_batch", "data.download"]
    else:  # a truncated image file
        datagen.mnist_like(str(root), "FashionMNIST", 40, 10)
        path = root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:5000])
        items += ["data.dataset=fmnist", "model.name=mlp"]
        expect = [str(root / "FashionMNIST" / "raw"), "train-images-idx3-ubyte"]
    items.append(f"data.root={root}")
    out = tmp_path / "runs"
    proc = run_train(out, n, [a for it in items for a in ("--set", it)], name="bad",
                     check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for text in expect:
        assert text in proc.stderr, (text, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not list(out.glob("*.h5")), "a run file was left behind"


def _driver(spec_path: str, out: str) -> None:
    """Under mpiexec: run every spec entry through fedmpi.train.run on one Transport."""
    from fedmpi import train
    from fedmpi.comm import Transport, finalize_and_exit

    t = Transport()
    records: dict[str, dict] = {}
    current = {"name": ""}
    original = train.distribute_shards

    def recording(tr, loaded, parts, owners, device):
        mine = original(tr, loaded, parts, owners, device)
        records[current["name"]] = {
            "held": {int(c): len(s) for c, s in mine.items()},
            "bytes": int(sum(s.x.numel() * s.x.element_size() for s in mine.values()))}
        return mine

    train.distribute_shards = recording
    for entry in json.loads(Path(spec_path).read_text()):
        current["name"] = entry["name"]
        argv = [*entry["args"], "--set", f"run.name={entry['name']}", "--set",
                f"run.out_dir={out}", "--quiet", "--overwrite"]
        train.run(train.parse_args(argv), t)
    report = {"rank": t.rank, "torchvision": "torchvision" in sys.modules, "runs": records}
    gathered = t.gather_object(report)
    if t.is_server:
        Path(out, "ranks.json").write_text(json.dumps(gathered))
    t.barrier()
    finalize_and_exit(0)


if __name__ == "__main__":
    _driver(sys.argv[1], sys.argv[2])
