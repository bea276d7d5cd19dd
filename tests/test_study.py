"""The FedSynSAM study's sweep files (jobs/fedsynsam_*.toml): the grid the issue asks for,
the tuning runs on a validation split and in step with the study, the ablation one knob at
a time from the study's FedSynSAM, the same measurement subset in every run."""

from __future__ import annotations

import functools
import itertools

import pytest

from fedmpi import config, sweep
from tests.conftest import REPO

DATASETS = ("mnist", "cifar10")
METHODS = {("none", "server"), ("fedsam", "server"), ("mofedsam", "server"),
           ("fedlesam", "server"), ("fedlesam", "client"), ("fedsynsam", "server")}
COMPRESSORS = {("identity", False), ("topk", True), ("qsgd", False)}
PARTITIONS = {("iid", None), ("client_dirichlet", 0.1)}


@functools.cache
def load(name: str) -> sweep.Sweep:
    """Each file expanded once (validating a point builds its model)."""
    return sweep.load(str(REPO / "jobs" / f"{name}.toml"))


def flat(cfg: config.Config) -> dict:
    return {f"{s}.{k}": v for s, table in config.to_dict(cfg).items() for k, v in table.items()}


def method(cfg: config.Config) -> tuple[str, str]:
    return cfg.sam.name, cfg.sam.lesam_source if cfg.sam.name == "fedlesam" else "server"


def cell(cfg: config.Config) -> tuple:
    alpha = cfg.data.alpha if cfg.data.partition != "iid" else None
    return (*method(cfg), cfg.compressor.name, cfg.compressor.ef, cfg.data.partition, alpha)


@pytest.mark.parametrize("dataset", DATASETS)
def test_the_study_is_the_grid_the_issue_asks_for(dataset):
    sw = load(f"fedsynsam_{dataset}")
    seeds = sorted({p.config.run.seed for p in sw.points})
    assert len(seeds) >= 3
    cells = [cell(p.config) for p in sw.points]
    want = {(*m, *c, *d) for m, c, d in itertools.product(METHODS, COMPRESSORS, PARTITIONS)}
    assert set(cells) == want and len(cells) == len(want) * len(seeds)
    for p in sw.points:
        c = p.config
        assert c.data.dataset == dataset
        assert c.compressor.name != "topk" or c.compressor.params.ratio == 0.01
        assert c.compressor.name != "qsgd" or c.compressor.params.levels == 4
        assert c.server.participation < 1  # FedLESAM's two forms differ only then
        assert c.data.train_frac == 1.0  # the official test set, for the claims
        ev = c.eval
        assert ev.sharpness_every > 0 and ev.perturbation_every > 0
        assert ev.sharpness_trace_rule == "stderr"
    # one measurement subset for every run: same split, same subset seed and size
    assert len({(p.config.eval.subset_seed, p.config.eval.sharpness_samples,
                 p.config.data.max_train) for p in sw.points}) == 1
    # the sam knobs other than rho and the method's own are the same everywhere
    knobs = {(c.sam.round0, c.sam.m, c.sam.s_steps, c.sam.perturb_mode, c.sam.synth_site,
              c.sam.traj_window) for c in (p.config for p in sw.points)}
    assert len(knobs) == 1


@pytest.mark.parametrize("dataset", DATASETS)
def test_rho_is_tuned_on_a_validation_split_in_step_with_the_study(dataset):
    study = {cell(p.config): p.config for p in load(f"fedsynsam_{dataset}").points
             if p.config.run.seed == 0}
    tuning = load(f"fedsynsam_{dataset}_rho").points
    rhos = {p.config.sam.rho for p in tuning}
    assert len(rhos) >= 3
    assert {method(p.config) for p in tuning} == METHODS - {("none", "server")}
    for p in tuning:
        c = p.config
        assert c.data.train_frac < 1.0  # the held-out share of the training split
        ref = flat(study[cell(c)])
        diff = {k for k, v in flat(c).items() if ref.get(k) != v}
        # only the split, the length, the measurements' cadence, rho and bookkeeping
        assert diff <= {"data.train_frac", "run.rounds", "run.out_dir", "run.name",
                        "sam.rho"} | {k for k in diff if k.startswith("eval.")}, diff
    tuned = {(p.config.compressor.name, p.config.compressor.ef) for p in tuning}
    assert ("topk", True) in tuned and tuned <= set(COMPRESSORS)  # the claims' compressor
    for m, c in itertools.product(METHODS - {("none", "server")}, tuned):
        got = {p.config.sam.rho for p in tuning if method(p.config) == m
               and (p.config.compressor.name, p.config.compressor.ef) == c}
        assert got == rhos  # every method sees the whole grid under every tuned compressor


@pytest.mark.parametrize("dataset", DATASETS)
def test_the_ablation_moves_one_fedsynsam_knob_from_the_study(dataset):
    study = {cell(p.config): p.config for p in load(f"fedsynsam_{dataset}").points
             if p.config.sam.name == "fedsynsam" and p.config.run.seed == 0}
    moved = set()
    for p in load(f"fedsynsam_{dataset}_ablation").points:
        c = p.config
        assert c.sam.name == "fedsynsam" and c.data.partition == "client_dirichlet"
        ref = flat(study[cell(c)])
        diff = {k for k, v in flat(c).items() if ref.get(k) != v} - {
            "run.out_dir", "run.name", "run.seed"}
        assert len(diff) == 1, diff
        moved |= diff
    assert moved == {"sam.perturb_mode", "sam.traj_window", "sam.m", "sam.synth_site"}
