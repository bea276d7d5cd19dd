"""Config: validation errors name the key; TOML round trips; the embedded default."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedmpi import config
from fedmpi.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def load_text(tmp_path: Path, text: str, overrides=()):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(str(p), overrides)


@pytest.mark.parametrize("text, key", [
    ("[run]\nroundz = 3\n", "run.roundz"),
    ("[bogus]\nx = 1\n", "bogus"),
    ("[run]\nrounds = 'ten'\n", "run.rounds"),
    ("[run]\nrounds = 2.5\n", "run.rounds"),
    ("[run]\nrounds = 0\n", "run.rounds"),
    ("[run]\nrounds = true\n", "run.rounds"),
    ("[client]\nlr = -0.1\n", "client.lr"),
    ("[client]\nlr = 0\n", "client.lr"),
    ("[client]\nlr = 'fast'\n", "client.lr"),
    ("[client]\nbatch_size = 0\n", "client.batch_size"),
    ("[client]\nlocal_steps = 0\n", "client.local_steps"),
    ("[client]\nlocal_steps = 5\nlocal_epochs = 1\n", "client.local_steps"),
    ("[data]\nnum_clients = 0\n", "data.num_clients"),
    ("[data]\nalpha = 0.0\n", "data.alpha"),
    ("[data]\nalpha = -1.0\n", "data.alpha"),
    ("[data]\ndataset = 'imagenet'\n", "data.dataset"),
    ("[data]\ndataset = 'mnist'\n", "data.partition"),  # natural is synthetic-only
    ("[model]\nname = 'gpt'\n", "model.name"),
    ("[compressor]\nname = 'zip'\n", "compressor.name"),
    ("[compressor]\nratio = 0.1\n", "compressor.ratio"),  # identity has no ratio
    ("[compressor]\nef = 'yes'\n", "compressor.ef"),
    ("[sam]\nname = 'bogus'\n", "sam.name"),
    ("[server]\naggregation = 'median'\n", "server.aggregation"),
    ("[server]\nparticipation = 1.5\n", "server.participation"),
    ("[eval]\nevery = 0\n", "eval.every"),
    ("[run]\nmpi_wait = 'spin'\n", "run.mpi_wait"),
    ("run = 3\n", "run"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    assert err.value.key == key
    assert str(err.value).startswith(key)


def test_toml_syntax_error_has_line_number(tmp_path):
    with pytest.raises(ConfigError, match=r"line 3"):
        load_text(tmp_path, "[run]\nrounds = 3\nname = \n")


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="nope.toml"):
        config.load("nope.toml")


def test_set_overrides_and_types():
    cfg = config.load(None, ["client.lr=0.5", "run.rounds=7", "data.dataset=mnist",
                             "data.partition=iid", "run.name=x y"])
    assert cfg.client.lr == 0.5 and cfg.run.rounds == 7
    assert cfg.data.dataset == "mnist" and cfg.run.name == "x y"


@pytest.mark.parametrize("item, key", [("client.lrr=1", "client.lrr"), ("nosec.x=1", "nosec.x"),
                                       ("compressor.ratio=0.1", "compressor.ratio"),
                                       ("client.lr", "client.lr"), ("lr=1", "lr")])
def test_set_on_unknown_key_fails(item, key):
    with pytest.raises(ConfigError) as err:
        config.load(None, [item])
    assert err.value.key == key


def test_int_accepted_for_float():
    assert config.load(None, ["client.lr=1"]).client.lr == 1.0


def test_round_trip_through_toml():
    cfg = config.load(None, ["client.lr=0.125", "data.dataset=mnist", "data.partition=dirichlet",
                             "data.alpha=0.3", "run.name=a\"b", "server.aggregation=weighted"])
    assert config.loads(config.to_toml(cfg)) == cfg


def test_quickstart_file_is_the_embedded_default():
    assert config.load(str(REPO / "jobs" / "quickstart.toml")) == config.load(None)


def test_frozen():
    cfg = config.load(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.client.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("text, valid", [
    # every choice error lists the values that would be accepted
    ("[data]\ndataset = 'mnist'\n", "client_dirichlet, dirichlet, dirichlet_balanced, "
                                    "iid, shards"),
    ("[data]\ndataset = 'imagenet'\n", "cifar10, cifar100, emnist, fmnist, mnist, synthetic"),
    ("[data]\npartition = 'zipf'\n", "client_dirichlet, dirichlet, dirichlet_balanced, iid, "
                                     "natural, shards"),
    ("[model]\nname = 'resnet18'\n", "models that fit it: logreg, mlp"),
    ("[model]\nname = 'gpt'\n", "known: convnet, lenet5, logreg, mlp, mnistnet"),
    ("[compressor]\nname = 'zip'\n", "known: 3sfc, dgc,"),
    ("[sam]\nname = 'bogus'\n", "known: fedlesam, fedsam, fedsynsam, mofedsam, none"),
    ("[server]\naggregation = 'median'\n", "'mean', 'weighted', 'majority'"),
    ("[run]\nmpi_wait = 'spin'\n", "'sleep', 'block'"),
    ("[data]\nemnist_split = 'x'\n", "'byclass', 'bymerge', 'balanced', 'letters'"),
    ("[client]\nexecution = 'x'\n", "'auto', 'sequential', 'batched'"),
    ("[compressor]\nname = 'topk'\nvalue_dtype = 'fp8'\n", "'fp32', 'fp16'"),
    ("[data]\naugment = true\n", "cifar10, cifar100"),
])
def test_choice_errors_list_the_valid_values(tmp_path, text, valid):
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    assert valid in str(err.value), str(err.value)


@pytest.mark.parametrize("overrides, name", [
    ((), "quickstart"),
    (("client.lr=0.1",), "quickstart_lr-0.1"),
    (("client.lr=0.05",), "quickstart"),  # the default value: the same run
    (("client.lr=0.1", "client.lr=0.05"), "quickstart"),  # the last --set wins
    (("run.threads=1", "run.rounds=5", "eval.every=2", "checkpoint.every=3",
      "run.out_dir=x", "run.tensorboard=true"), "quickstart"),  # how, not what
    (("server.lr=2.0", "client.lr=0.1"), "quickstart_server.lr-2.0_client.lr-0.1"),
    (("compressor.name=topk", "compressor.ratio=0.01", "run.seed=3"),
     "quickstart_compressor-topk_ratio-0.01_seed-3"),
    (("data.partition='dirichlet'", "run.name=mine"), "mine"),  # an explicit name wins
])
def test_default_run_name_follows_the_overrides(overrides, name):
    assert config.load(None, overrides).run.name == name


def test_run_name_of_a_file_and_a_long_one(tmp_path):
    assert load_text(tmp_path, "[client]\nlr = 0.2\n").run.name == "c"  # the file's name
    named = load_text(tmp_path, "[run]\nname = 'exp'\n", ["client.lr=0.3"])
    assert named.run.name == "exp_lr-0.3"
    many = ["client.lr=0.1",
            *(f"data.syn_{k}=0.{i}" for i, k in enumerate(("alpha", "beta", "test_frac"),
                                                          start=1)),
            "data.syn_dim=61", "data.syn_classes=9", "data.syn_min_samples=51",
            "data.syn_max_samples=999", "client.momentum=0.5", "client.weight_decay=0.001"]
    a = config.load(None, many).run.name
    b = config.load(None, [*many, "client.grad_clip=1.0"]).run.name
    assert len(a) <= config.MAX_RUN_NAME and len(b) <= config.MAX_RUN_NAME and a != b
    assert a.startswith("quickstart_lr-0.1_syn_alpha-0.1")


def test_config_cli(capsys):
    assert config.main(["--set", "client.lr=0.2"]) == 0
    out = capsys.readouterr().out
    assert 'name = "quickstart_lr-0.2"' in out and "lr = 0.2" in out
    assert config.loads(out).client.lr == 0.2
    assert config.main(["--set", "data.dataset=mnist"]) == 2
    assert "data.partition" in capsys.readouterr().err
    assert config.main(["--keys"]) == 0
    assert "client.lr = 0.05\n    local SGD learning rate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        config.main(["--help"])
    assert done.value.code == 0
    assert "run name" in capsys.readouterr().out
