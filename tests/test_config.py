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
