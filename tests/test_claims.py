"""The FedSynSAM study's analysis: analysis/claims.py on fabricated run files whose
effects are known (verdicts, numbers, missing runs, figures), its statistics against
scipy, and analysis/select_rho.py (the pick, the refusal of test-set runs, the sweep file
it rewrites)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmpi import config, sweep
from fedmpi.metrics import RunWriter, open_run
from tests.conftest import REPO

ANALYSIS = REPO / "analysis"
ROUNDS = 6


def script(name: str):
    if str(ANALYSIS) not in sys.path:
        sys.path.insert(0, str(ANALYSIS))
    spec = importlib.util.spec_from_file_location(f"analysis_{name}", ANALYSIS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fabricate(path: Path, cfg: config.Config, rows: dict[str, np.ndarray]) -> None:
    """A complete run file for ``cfg`` whose round columns are ``rows`` (others NaN)."""
    n = cfg.data.num_clients
    w = RunWriter(str(path), cfg, 3, n, np.zeros((n, 10), dtype=np.int64), swmr=False,
                  attrs={"num_params": 10, "dense_bytes": 40, "owners": "{}"})
    for i in range(ROUNDS):
        w.append({"round": i, **{k: v[i] for k, v in rows.items()}}, {})
    w.close(complete=True)


def jitter(seed: int, scale: float) -> float:
    """A small, seed-dependent deviation (-1, 0, +1) x scale."""
    return (seed - 1) * scale


def truth(method: str, comp: str, part: str, seed: int) -> dict[str, float]:
    """The fabricated final values of one run (see the effects the test asserts)."""
    dirichlet = part != "iid"
    lmax = {"dense": 1.0, "topk": 1.5, "qsgd": 1.0}[comp] * (2.0 if dirichlet else 1.0)
    if dirichlet and comp == "topk":
        lmax *= 4.0 / 3.0  # top-k sharpens x2 under non-IID, x1.5 under IID
    if comp == "qsgd":  # no effect: +-, inconclusive
        lmax *= 1.0 + 0.05 * (-1) ** seed
    lmax *= 1.0 + 0.01 * seed
    cos = {"fedlesam": {"dense": 0.8, "topk": 0.3, "qsgd": 0.8},
           "fedsynsam": {"dense": 0.8, "topk": 0.6, "qsgd": 0.8}}.get(method, {}).get(
               comp, 0.5)
    cos += jitter(seed, 0.01) if comp != "qsgd" else 0.05 * (-1) ** seed
    acc = 0.90 - (0.01 if method == "fedsynsam" else 0.0) + jitter(seed, 0.001)
    return {"lmax": lmax, "trace": 10 * lmax, "cos": cos, "acc": acc}


#: the runs left out of the fabricated study (their configs stay: "missing")
DROPPED = "method-fedsam_compressor-qsgd_data-dir0.1_seed-2"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, sweep.Sweep]:
    """jobs/fedsynsam_mnist.toml's 108 runs, fabricated, one left out."""
    out = tmp_path_factory.mktemp("study")
    sw = sweep.load(str(REPO / "jobs" / "fedsynsam_mnist.toml"))
    (out / "configs").mkdir()
    for p in sw.points:
        cfg = dataclasses.replace(p.config, run=dataclasses.replace(
            p.config.run, rounds=ROUNDS, out_dir=str(out)))
        (out / "configs" / f"{p.name}.toml").write_text(config.to_toml(cfg))
        if p.name == DROPPED:
            continue
        method, comp, part = (p.labels[k] for k in ("method", "compressor", "data"))
        v = truth(method, comp, part, p.config.run.seed)
        ramp = np.linspace(0.5, 1.0, ROUNDS)
        sharp = np.full(ROUNDS, np.nan)
        sharp[[2, 5]] = 1.0
        measured = np.full(ROUNDS, np.nan)
        measured[1::2] = 1.0
        has_ascent = method != "fedavg"
        rows = {"test_acc": v["acc"] * ramp, "wall_time": np.arange(1, ROUNDS + 1) * 2.0,
                "uplink_bytes": np.full(ROUNDS, {"dense": 800, "topk": 16, "qsgd": 80}[comp]),
                "downlink_payload_bytes": np.full(ROUNDS, 800 + (30 if method == "fedsynsam"
                                                                 else 0)),
                "sharpness_lmax": v["lmax"] * sharp, "sharpness_trace": v["trace"] * sharp,
                "perturb_cos": v["cos"] * measured * (1.0 if has_ascent else np.nan),
                "perturb_cos_update": v["cos"] * measured,
                "synth_fit_cos": np.full(ROUNDS, 0.7 if method == "fedsynsam" else np.nan)}
        fabricate(out / f"{p.name}.h5", cfg, rows)
    return out, sw


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 3)
    return text[start:end if end > 0 else None]


def rows_of(text: str, *cells: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.startswith("|") and all(f"| {c} |" in line for c in cells)]


def test_report_on_fabricated_runs(study, tmp_path):
    folder, _ = study
    claims = script("claims")
    out = tmp_path / "report" / "fedsynsam.md"
    assert claims.main([str(folder), "-o", str(out)]) == 0
    text = out.read_text()

    c1 = section(text, "C1")
    lmax = "final λmax"
    # top-k sharpens (x1.5 IID, x2 Dirichlet): supported; QSGD alternates: inconclusive
    (row,) = rows_of(c1, lmax, "top-k 1% + EF", "IID")
    assert row.endswith("| supported |") and "×1.50" in row
    (row,) = rows_of(c1, lmax, "top-k 1% + EF", "Dirichlet α=0.1")
    assert row.endswith("| supported |") and "×2.00" in row
    (row,) = rows_of(c1, lmax, "QSGD s=4", "IID")
    assert row.endswith("| inconclusive at this n |")
    (row,) = rows_of(c1, lmax, "top-k 1% + EF", "Dirichlet α=0.1 vs IID")
    assert row.endswith("| supported |") and "×1.33" in row
    assert "**Verdict: inconclusive at this n**" in c1  # QSGD's rows are

    c2 = section(text, "C2")
    (row,) = rows_of(c2, "FedLESAM (official) ascent", "top-k 1% + EF", "IID")
    assert row.endswith("| supported |") and "-0.500" in row
    assert "0.800 ± 0.010" in row and "0.300 ± 0.010" in row  # dense, compressed cells

    c3 = section(text, "C3")
    (row,) = rows_of(c3, "perturbation cosine (mean over rounds ≥ 1)", "top-k 1% + EF", "IID")
    assert row.endswith("| supported |") and "+0.300" in row
    (row,) = rows_of(c3, "final test accuracy (%)", "top-k 1% + EF", "IID")
    assert row.endswith("| not supported |") and "-1.000" in row  # FedSynSAM 1 point lower
    assert "**Verdict: not supported**" in c3

    # the left-out run is missing, its cell says so
    runs = section(text, "Runs")
    assert "107 of 108 expected runs are complete" in runs and f"`{DROPPED}`" in runs
    every = section(text, "Every cell")
    (row,) = rows_of(every, "FedSAM", "QSGD s=4", "Dirichlet α=0.1")
    assert "(n=2/3)" in row
    assert "summed wall time is 0.36 h" in runs  # 107 runs x 12 s, from the files

    figures = sorted(p.name for p in (out.parent / "fedsynsam").glob("*.png"))
    assert figures == ["c1_sharpness_rounds.png", "c2_c3_perturbation_cosine.png",
                       "c3_accuracy_vs_uplink.png", "c3_fedsynsam_fit_cosine.png",
                       "final_sharpness.png"]
    for name in figures:
        assert (out.parent / "fedsynsam" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](fedsynsam/{name})" in text


def test_report_names_a_study_with_no_runs_as_an_error(tmp_path):
    claims = script("claims")
    assert claims.main([str(tmp_path), "-o", str(tmp_path / "r.md")]) == 1


def test_ablation_runs_get_their_own_section(study, tmp_path):
    folder, _ = study
    abl = tmp_path / "ablation"
    (abl / "configs").mkdir(parents=True)
    sw = sweep.load(str(REPO / "jobs" / "fedsynsam_mnist_ablation.toml"))
    chosen = [p for p in sw.points if p.labels["compressor"] == "topk" and (
        p.labels["variant"] == "fixed" or (p.labels["variant"] == "window2"
                                           and p.config.run.seed == 0))]
    for p in chosen:  # fixed x top-k x seeds 0..2, window2 x top-k x seed 0
        cfg = dataclasses.replace(p.config, run=dataclasses.replace(
            p.config.run, rounds=ROUNDS, out_dir=str(abl)))
        (abl / "configs" / f"{p.name}.toml").write_text(config.to_toml(cfg))
        fabricate(abl / f"{p.name}.h5", cfg, {
            "test_acc": np.full(ROUNDS, 0.5), "uplink_bytes": np.full(ROUNDS, 16),
            "perturb_cos": np.full(ROUNDS, 0.25), "wall_time": np.ones(ROUNDS),
            "downlink_payload_bytes": np.full(ROUNDS, 830)})
    out = tmp_path / "r.md"
    assert script("claims").main([str(folder), str(abl), "-o", str(out)]) == 0
    text = section(out.read_text(), "FedSynSAM ablation")
    (row,) = rows_of(text, "FedSynSAM (perturb_mode=fixed)", "top-k 1% + EF",
                     "Dirichlet α=0.1")
    assert "| 0.250 ± 0.000 |" in row
    (row,) = rows_of(text, "FedSynSAM (traj_window=2)", "top-k 1% + EF", "Dirichlet α=0.1")
    assert "(n=1/3)" not in row  # its one expected seed is there
    assert (tmp_path / "r" / "ablation_perturbation_cosine.png").exists()


def test_t_quantiles_and_intervals_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    claims = script("claims")
    for df in (1, 2, 3, 7, 30):
        assert claims.t_ppf(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-6)
    d = [0.3, 0.5, 0.2, 0.45]
    e = claims.effect(d)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
    assert (e.lo, e.hi) == (pytest.approx(lo, rel=1e-6), pytest.approx(hi, rel=1e-6))
    a, b = [1.0, 1.2, 0.9], [0.5, 0.7, 0.4, 0.6]
    w = claims.welch(a, b)
    res = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (w.lo, w.hi) == (pytest.approx(res.low, rel=1e-6), pytest.approx(res.high, rel=1e-6))
    assert e.verdict(+1) == "supported" and e.verdict(-1) == "not supported"
    assert claims.effect([0.1, -0.2, 0.15]).verdict(+1) == "inconclusive at this n"
    assert claims.effect([5.0]).verdict(+1) == "inconclusive at this n"  # one seed


# ---------------------------------------------------------------------------- rho


OFFSET = {"dense": 0.002, "topk": -0.002, "qsgd": 0.0}  #: accuracy added per compressor


@pytest.fixture
def tuning(tmp_path) -> Path:
    """jobs/fedsynsam_mnist_rho.toml's runs, fabricated: each method's accuracy peaks at
    its own rho (FedSAM and MoFedSAM tie at 0.05 and 0.1: the smaller wins)."""
    peak = {"fedsam": 0.05, "mofedsam": 0.05, "fedlesam": 0.2, "fedlesam-client": 0.1,
            "fedsynsam": 0.5}
    sw = sweep.load(str(REPO / "jobs" / "fedsynsam_mnist_rho.toml"))
    for p in sw.points:
        cfg = dataclasses.replace(p.config, run=dataclasses.replace(
            p.config.run, rounds=ROUNDS, out_dir=str(tmp_path)))
        method, rho = p.labels["method"], p.config.sam.rho
        acc = 0.9 - abs(math.log(rho / peak[method])) / 100
        if method in ("fedsam", "mofedsam") and rho == 0.1:
            acc = 0.9  # a tie with the peak
        acc += OFFSET[p.labels["compressor"]]
        fabricate(tmp_path / f"{p.name}.h5", cfg, {"test_acc": np.full(ROUNDS, acc)})
    return tmp_path


def test_select_rho_picks_per_method_and_rewrites_the_sweep_files(tuning, tmp_path, capsys):
    select = script("select_rho")
    study = tmp_path / "study.toml"
    ablation = tmp_path / "ablation.toml"
    shutil.copy(REPO / "jobs" / "fedsynsam_mnist.toml", study)
    shutil.copy(REPO / "jobs" / "fedsynsam_mnist_ablation.toml", ablation)
    assert select.main([str(tuning), "--update", str(study), str(ablation)]) == 0
    table = capsys.readouterr().out
    (row,) = [r for r in table.splitlines() if r.startswith("| fedlesam |")]
    tuned = {p.labels["compressor"] for p in sweep.load(
        str(REPO / "jobs" / "fedsynsam_mnist_rho.toml")).points}
    best = 90 + 100 * np.mean([OFFSET[c] for c in tuned])  # the peak, over the compressors
    assert row.endswith("| 0.2 |") and f"**{best:.2f} (n={len(tuned)})**" in row
    sw = sweep.load(str(study))
    got = {}
    for p in sw.points:
        got.setdefault(p.labels["method"], set()).add(p.config.sam.rho)
    assert got == {"fedavg": {0.05}, "fedsam": {0.05}, "mofedsam": {0.05},
                   "fedlesam": {0.2}, "fedlesam-client": {0.1}, "fedsynsam": {0.5}}
    text = study.read_text()
    assert "NOT SELECTED" not in text and "the test set was never read" in text
    assert {p.config.sam.rho for p in sweep.load(str(ablation)).points} == {0.5}
    # the rest of the file is untouched
    old = (REPO / "jobs" / "fedsynsam_mnist.toml").read_text()
    cut = old.index("# rho-selection:start")
    assert text[:cut] == old[:cut]


def test_select_rho_refuses_runs_that_evaluated_on_the_test_set(tmp_path):
    sw = sweep.load(str(REPO / "jobs" / "fedsynsam_mnist.toml"))
    p = next(p for p in sw.points if p.labels["method"] == "fedsam")
    fabricate(tmp_path / "r.h5", p.config, {"test_acc": np.full(ROUNDS, 0.9)})
    assert open_run(str(tmp_path / "r.h5")).config.data.train_frac == 1.0
    with pytest.raises(SystemExit, match="official test set"):
        script("select_rho").main([str(tmp_path)])
    assert os.path.exists(tmp_path / "r.h5")


def test_notes_are_appended_and_named_in_the_command(study, tmp_path):
    folder, _ = study
    notes = tmp_path / "notes.md"
    notes.write_text("## What was checked\n\nThe rho picks were close.\n")
    out = tmp_path / "with_notes.md"
    assert script("claims").main([str(folder), "-o", str(out), "--notes", str(notes)]) == 0
    text = out.read_text()
    assert text.rstrip().endswith("The rho picks were close.")
    assert f"--notes {notes}`" in text.splitlines()[2]  # the command that made it
