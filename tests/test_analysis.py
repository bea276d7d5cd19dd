"""analysis/*.py and fedmpi.analysis on small real runs: the table's numbers against values
read directly from the HDF5 files (h5py, not the reader), the figures as valid PNG and
PDF files, the summary, and the grouping rules."""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedmpi import analysis

from .conftest import REPO, SMALL, run_train

ANALYSIS = REPO / "analysis"
METHODS = {"fedavg": ["--set", "compressor.name=identity"],
           "topk": ["--set", "compressor.name=topk", "--set", "compressor.ef=true",
                    "--set", "compressor.ratio=0.1"]}
SEEDS = (0, 1)
SHARP = ["--set", "eval.sharpness_every=3", "--set", "eval.sharpness_samples=128",
         "--set", "eval.sharpness_iters=10", "--set", "eval.sharpness_trace_samples=10"]


def _script(name: str):
    if str(ANALYSIS) not in sys.path:
        sys.path.insert(0, str(ANALYSIS))  # the scripts import their sibling _path
    spec = importlib.util.spec_from_file_location(f"analysis_{name}", ANALYSIS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """2 methods x 2 seeds, 3 rounds of the small synthetic job, sharpness at the end."""
    out = tmp_path_factory.mktemp("runs")
    jobs = [(m, s) for m in METHODS for s in SEEDS]

    def one(job):
        m, s = job
        run_train(out, 1, [*SMALL, *METHODS[m], *SHARP, "--set", f"run.seed={s}"],
                  name=f"{m}_s{s}")

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, jobs))
    return out


def h5_final_acc(path: Path) -> float:
    with h5py.File(path, "r") as f:
        return 100 * float(f["rounds/test_acc"][-1])


def h5_ratio(path: Path) -> float:
    with h5py.File(path, "r") as f:
        dense = float(f.attrs["dense_bytes"]) * float(np.sum(f["rounds/participants"][()]))
        return dense / float(np.sum(f["rounds/uplink_bytes"][()]))


def expected(runs: Path, method: str, fn) -> tuple[float, float]:
    v = np.array([fn(runs / f"{method}_s{s}.h5") for s in SEEDS])
    return float(v.mean()), float(v.std(ddof=1))


def test_table_numbers_match_hdf5(runs, capsys):
    table = _script("table")
    assert table.main([str(runs), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["setting"], r["method"]) for r in rows] == [
        ("Synthetic / MLP", "FedAvg"), ("Synthetic / MLP", "Top-k")]
    means = {}
    for r, m in zip(rows, METHODS, strict=True):
        mean, std = expected(runs, m, h5_final_acc)
        assert float(r["mean"]) == pytest.approx(mean, abs=1e-9)
        assert float(r["std"]) == pytest.approx(std, abs=1e-9)
        assert int(r["n"]) == 2 and r["metric"] == "final_acc"
        assert float(r["ratio"]) == pytest.approx(expected(runs, m, h5_ratio)[0])
        means[m] = mean
    assert float(rows[0]["ratio"]) == pytest.approx(1.0)
    assert float(rows[1]["ratio"]) > 5  # top-10% with int32 indices: about 5x
    top = max(means.values())
    assert [int(r["best"]) for r in rows] == [int(means[m] == top) for m in METHODS]


def test_table_md_and_latex(runs, capsys):
    table = _script("table")
    assert table.main([str(runs)]) == 0
    md = capsys.readouterr().out
    lines = md.splitlines()
    assert lines[0] == "| setting | FedAvg | Top-k |"
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[0] == "Synthetic / MLP"
    fedavg_mean, fedavg_std = expected(runs, "fedavg", h5_final_acc)
    topk_mean, topk_std = expected(runs, "topk", h5_final_acc)
    assert f"{fedavg_mean:.2f} ± {fedavg_std:.2f} (1.0×)" in cells[1]
    assert f"{topk_mean:.2f} ± {topk_std:.2f} (" in cells[2]
    top = max(fedavg_mean, topk_mean)
    assert [c.startswith("**") for c in cells[1:]] == [fedavg_mean == top, topk_mean == top]
    assert "mean ± std over 2 seed(s)" in md

    out = runs.parent / "t.tex"
    assert table.main([str(runs), "--format", "latex", "--metric", "final_loss",
                       "-o", str(out)]) == 0
    tex = out.read_text()
    assert r"\begin{tabular}{lcc}" in tex and r"\bottomrule" in tex
    row = next(ln for ln in tex.splitlines() if ln.startswith("Synthetic / MLP"))
    losses = {}
    for m in METHODS:
        with h5py.File(runs / f"{m}_s0.h5") as f0, h5py.File(runs / f"{m}_s1.h5") as f1:
            losses[m] = np.mean([f0["rounds/test_loss"][-1], f1["rounds/test_loss"][-1]])
    lowest = min(losses, key=losses.get)  # best = lowest for a loss metric
    cells = row.split(" & ")[1:]
    assert [c.startswith(r"$\mathbf{") for c in cells] == [
        losses[m] == losses[lowest] for m in METHODS]
    assert cells[list(METHODS).index(lowest)].startswith(r"$\mathbf{"
                                                         + f"{losses[lowest]:.4f}")


def _valid_png(path: str) -> None:
    import matplotlib.image

    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 400
    assert float(img[..., :3].std()) > 0.02  # not a blank canvas


def _valid_pdf(path: str) -> None:
    data = Path(path).read_bytes()
    assert data.startswith(b"%PDF-") and b"%%EOF" in data[-64:] and len(data) > 2000


def test_curves_cli_writes_png_and_pdf(runs, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get(
        "PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ANALYSIS / "curves.py"), str(runs), "-o",
                           str(tmp_path / "figs")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.split()
    assert [Path(p).name for p in paths] == ["curves_Synthetic_MLP.png",
                                             "curves_Synthetic_MLP.pdf",
                                             "traffic_Synthetic_MLP.png",
                                             "traffic_Synthetic_MLP.pdf"]
    _valid_png(paths[2])
    _valid_png(paths[0])
    _valid_pdf(paths[1])


def test_curves_panels_and_series(runs, tmp_path):
    curves = _script("curves")
    table = analysis.group(analysis.load([str(runs)]))
    paths = curves.plot_setting(table, table.rows[0], str(tmp_path))
    assert [Path(p).suffix for p in paths] == [".png", ".pdf"]
    # the plotted series is the mean over seeds, against cumulative uplink bytes
    s = analysis.series(table.runs(table.rows[0], "Top-k"), "test_acc", 100.0)
    with h5py.File(runs / "topk_s0.h5") as f0, h5py.File(runs / "topk_s1.h5") as f1:
        acc = 50 * (f0["rounds/test_acc"][()] + f1["rounds/test_acc"][()])
        up = 0.5 * (np.cumsum(f0["rounds/uplink_bytes"][()])
                    + np.cumsum(f1["rounds/uplink_bytes"][()]))
    np.testing.assert_allclose(s.mean, acc)
    np.testing.assert_allclose(s.x_bytes, up)
    assert list(s.rounds) == [1, 2, 3] and s.n == 2


def test_efficiency(runs, tmp_path, capsys):
    eff = _script("efficiency")
    assert eff.main([str(runs), "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| setting | Top-k |" in out  # FedAvg (cosine 1 by construction) left out
    vals = []
    for s in SEEDS:
        with h5py.File(runs / f"topk_s{s}.h5") as f:
            vals.append(float(np.mean(f["rounds/efficiency_mean"][()])))
    assert f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}" in out
    png = tmp_path / "efficiency_Synthetic_MLP.png"
    _valid_png(str(png))
    _valid_pdf(str(png.with_suffix(".pdf")))


def test_sharpness(runs, tmp_path, capsys):
    sharp = _script("sharpness")
    assert sharp.main([str(runs), "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for m, label in (("fedavg", "FedAvg"), ("topk", "Top-k")):
        lmax, trace = [], []
        for s in SEEDS:
            with h5py.File(runs / f"{m}_s{s}.h5") as f:
                lam = f["rounds/sharpness_lmax"][()]
                assert np.isnan(lam[:2]).all() and np.isfinite(lam[2])  # last round only
                lmax.append(lam[2])
                trace.append(f["rounds/sharpness_trace"][2])
        label = "none (dense)" if label == "FedAvg" else label  # FedAvg compresses nothing
        row = next(ln for ln in out.splitlines() if f"| no SAM | {label} |" in ln)
        assert f"{np.mean(lmax):.3f} ± {np.std(lmax, ddof=1):.3f}" in row
        assert f"{np.mean(trace):.2f} ± {np.std(trace, ddof=1):.2f}" in row
    _valid_png(str(tmp_path / "sharpness_Synthetic_MLP.png"))
    _valid_pdf(str(tmp_path / "sharpness_Synthetic_MLP.pdf"))
    assert not (tmp_path / "sharpness_rounds_Synthetic_MLP.png").exists()  # measured once


def test_summary(runs, capsys):
    summary = _script("summary")
    path = runs / "topk_s1.h5"
    assert summary.main([str(path), "--config"]) == 0
    out = capsys.readouterr().out
    with h5py.File(path) as f:
        acc = 100 * f["rounds/test_acc"][-1]
        up = int(np.sum(f["rounds/uplink_bytes"][()]))
        d = int(f.attrs["num_params"])
    assert "run        topk_s1" in out
    assert "status     complete: 3 of 3 rounds" in out
    assert f"final {acc:.2f}% (round 3)" in out
    assert f"uplink {summary.fmt_bytes(up)}" in out and f"d = {d:,} parameters" in out
    assert "compressor topk + EF" in out and "seed 1" in out
    assert "train " in out and "sharpness  lambda_max" in out
    assert '[compressor]\nname = "topk"' in out  # --config


def test_incomplete_runs_are_skipped_unless_asked(runs, tmp_path, capsys):
    for s in SEEDS:
        shutil.copy(runs / f"fedavg_s{s}.h5", tmp_path / f"fedavg_s{s}.h5")
    with h5py.File(tmp_path / "fedavg_s1.h5", "r+") as f:
        del f.attrs["complete"]
    got = analysis.load([str(tmp_path)])
    assert [Path(r.path).name for r in got] == ["fedavg_s0.h5"]
    assert "incomplete" in capsys.readouterr().err
    assert len(analysis.load([str(tmp_path)], include_incomplete=True)) == 2
    with pytest.raises(FileNotFoundError):
        analysis.load([str(tmp_path / "nope")])


def fake(path: str, **flat) -> analysis.RunInfo:
    base = {"run.seed": 0, "run.name": path, "data.dataset": "mnist", "model.name": "mlp",
            "data.num_clients": 10, "compressor.name": "identity", "compressor.ef": False,
            "sam.name": "none", "sam.rho": 0.05, "server.aggregation": "mean",
            "eval.every": 1, "run.threads": 1}
    base.update({k.replace("__", "."): v for k, v in flat.items()})
    return analysis.RunInfo(path, None, base)


def test_grouping_labels_rows_and_methods():
    runs = [
        fake("a"), fake("b", run__seed=1, run__threads=4, eval__every=5),
        fake("c", compressor__name="3sfc", compressor__ef=True),
        fake("d", compressor__name="3sfc", compressor__ef=False),
        fake("e", compressor__name="topk", compressor__ef=True, sam__name="fedsam"),
        fake("f", data__num_clients=20),
        fake("g", data__dataset="cifar10", model__name="resnet18"),
        fake("h", data__dataset="emnist", data__max_train=50000),  # follows the dataset
    ]
    t = analysis.group(runs, warn=lambda msg: None)
    assert t.methods == ["FedAvg", "3SFC (ef=false)", "3SFC (ef=true)", "FedSAM+Top-k"]
    assert t.rows == ["MNIST / MLP, num_clients=10", "MNIST / MLP, num_clients=20",
                      "EMNIST / MLP, num_clients=10", "CIFAR-10 / ResNet-18, num_clients=10"]
    # seeds (and bookkeeping keys) share a cell
    assert [r.path for r in t.runs("MNIST / MLP, num_clients=10", "FedAvg")] == ["a", "b"]
    # row keys move a method key to the rows
    budget = [fake("x", compressor__name="3sfc", compressor__budget_bytes=3180),
              fake("y", compressor__name="3sfc", compressor__budget_bytes=6360)]
    assert analysis.group(budget).methods == ["3SFC (budget_bytes=3180)",
                                              "3SFC (budget_bytes=6360)"]
    t = analysis.group(budget, row_keys=["compressor.budget_bytes"])
    assert t.methods == ["3SFC"]
    assert t.rows == ["MNIST / MLP, budget_bytes=3180", "MNIST / MLP, budget_bytes=6360"]
    # a key that changes only with the setting (a budget matched per dataset) splits no
    # method; within a setting it does
    matched = [fake("m", compressor__name="dgc", compressor__budget_bytes=3180),
               fake("n", compressor__name="dgc", compressor__budget_bytes=12332,
                    data__dataset="cifar10", model__name="convnet")]
    t = analysis.group(matched)
    assert t.methods == ["DGC"] and t.rows == ["MNIST / MLP", "CIFAR-10 / ConvNet"]
    t = analysis.group([*matched, fake("o", compressor__name="dgc", compressor__budget_bytes=1)])
    assert t.methods == ["DGC (budget_bytes=1)", "DGC (budget_bytes=3180)",
                         "DGC (budget_bytes=12332)"]
    # a duplicate seed is reported and dropped
    warned = []
    t = analysis.group([fake("p"), fake("q")], warn=warned.append)
    assert len(t.runs(t.rows[0], "FedAvg")) == 1 and "same setting" in warned[0]


def test_algorithms_name_methods_and_old_runs_are_fedavg():
    runs = [fake("old"), fake("new", algorithm__name="fedavg"),
            fake("s", algorithm__name="scaffold"),
            fake("t", algorithm__name="scaffold", compressor__name="topk"),
            fake("p1", algorithm__name="fedprox", algorithm__mu=0.1),
            fake("p2", algorithm__name="fedprox", algorithm__mu=0.01)]
    t = analysis.group(runs, warn=lambda msg: None)
    assert sorted(t.methods) == sorted(["FedAvg", "SCAFFOLD", "SCAFFOLD+Top-k",
                                        "FedProx (mu=0.1)", "FedProx (mu=0.01)"])
    assert t.rows == ["MNIST / MLP"]  # the algorithm never splits a setting
    assert len(t.runs("MNIST / MLP", "FedAvg")) == 1  # old and new FedAvg: one cell


def test_stat_and_best():
    s = analysis.stat([1.0, 2.0, 3.0, float("nan")])
    assert (s.mean, s.n) == (2.0, 3) and s.std == pytest.approx(1.0)
    assert analysis.stat([4.0]) == analysis.Stat(4.0, 0.0, 1)
    assert analysis.stat([]).n == 0


# ---------------------------------------------------------------------------- figure details


@pytest.fixture
def figures(monkeypatch):
    """The figures the scripts make, kept open instead of written (analysis.save replaced)."""
    kept = {}

    def save(fig, out_base):
        kept[Path(out_base).name] = fig
        return [f"{out_base}.png"]

    monkeypatch.setattr(analysis, "save", save)
    yield kept
    import matplotlib.pyplot as plt

    plt.close("all")


def _bands(ax) -> np.ndarray:
    """The y values of every band (fill_between polygon) drawn in ``ax``."""
    ys = [p.vertices[:, 1] for c in ax.collections for p in c.get_paths()]
    return np.concatenate(ys) if ys else np.zeros(0)


def test_accuracy_bands_stay_in_0_100(figures):
    plt = analysis.pyplot()
    s = analysis.Series(rounds=np.arange(1.0, 4.0), mean=np.array([5.0, 60.0, 97.0]),
                 std=np.array([9.0, 5.0, 8.0]), x_bytes=np.zeros(3), n=2)
    fig, (clipped, raw) = plt.subplots(1, 2)
    analysis.plot_band(clipped, s.rounds, s, "m", "C0", (0.0, 100.0))
    analysis.plot_band(raw, s.rounds, s, "m", "C0")
    assert _bands(raw).max() == 105.0 and _bands(raw).min() == -4.0  # what it would be
    assert _bands(clipped).max() == 100.0 and _bands(clipped).min() == 0.0


def test_curves_and_traffic_figures(runs, figures):
    curves = _script("curves")
    table = analysis.group(analysis.load([str(runs)]))
    row = table.rows[0]
    curves.plot_setting(table, row, "out")
    curves.plot_traffic(table, row, "out")
    fig = figures["curves_Synthetic_MLP"]
    for ax in fig.axes[:2]:  # the accuracy panels
        assert ax.get_ylabel() in ("Test accuracy (%)", "")
        ys = _bands(ax)
        assert ys.size and ys.min() >= 0.0 and ys.max() <= 100.0
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[1].get_xticklabels() if t.get_text()]
    assert labels and all(re.fullmatch(r"[0-9.]+ (B|KB|MB|GB)", t) for t in labels), labels
    traffic = figures["traffic_Synthetic_MLP"]
    assert [ax.get_xlabel().split(" (")[0].split("\n")[0] for ax in traffic.axes] == [
        "Cumulative uplink", "Cumulative downlink", "Cumulative uplink + downlink"]
    s = analysis.series(table.runs(row, "Top-k"), "test_acc", 100.0)
    with h5py.File(runs / "topk_s0.h5") as f0, h5py.File(runs / "topk_s1.h5") as f1:
        down = 0.5 * (np.cumsum(f0["rounds/downlink_payload_bytes"][()])
                      + np.cumsum(f1["rounds/downlink_payload_bytes"][()]))
    np.testing.assert_allclose(s.traffic["downlink"], down)
    np.testing.assert_allclose(s.traffic["total"], s.traffic["uplink"] + down)
    line = next(ln for ln in traffic.axes[1].get_lines() if ln.get_label() == "Top-k")
    np.testing.assert_allclose(line.get_xdata(), down)


def test_one_colour_per_method_in_every_figure(runs, figures):
    """FedAvg's line in the curves, the "no SAM" bars and lines of the sharpness plots and
    a method's colour whatever else a figure shows: always the same."""
    alone = analysis.colors(["Top-k"])["Top-k"]
    assert alone == analysis.colors(["FedAvg", "3SFC", "Top-k"])["Top-k"]
    a = analysis.colors(["FedSAM+Top-k", "X"])
    assert a["FedSAM+Top-k"] == analysis.colors(["FedSAM+Top-k"])["FedSAM+Top-k"]
    assert len(set(analysis.colors(["FedAvg", "FedAvg (ef=true)", "3SFC"]).values())) == 3
    curves, sharp = _script("curves"), _script("sharpness")
    table = analysis.group(analysis.load([str(runs)]))
    row = table.rows[0]
    curves.plot_setting(table, row, "out")
    sharp.plot_bars(table, row, "out")
    fedavg = next(ln for ln in figures["curves_Synthetic_MLP"].axes[0].get_lines()
                  if ln.get_label() == "FedAvg").get_color()
    bars = figures["sharpness_Synthetic_MLP"].axes[0].containers
    no_sam = next(b for b in bars if b.get_label() == "no SAM")
    assert no_sam.patches[0].get_facecolor()[:3] == pytest.approx(
        matplotlib_rgb(fedavg))


def matplotlib_rgb(color) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(color)


def test_sharpness_axis_names_no_compressor_fedavg(runs, figures):
    sharp = _script("sharpness")
    table = analysis.group(analysis.load([str(runs)]))
    sharp.plot_bars(table, table.rows[0], "out")
    ax = figures["sharpness_Synthetic_MLP"].axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["none (dense)", "Top-k"] and ax.get_xlabel() == "Uplink compressor"


@pytest.mark.parametrize("mean, std, text", [
    (3176.0, 0.0, "3.18 ± 0.00 KB"), (812.0, 3.2, "812 ± 3 B"),
    (2_176_400.0, 51_000.0, "2.18 ± 0.05 MB"), (64_100.0, None, "64.1 KB"),
    (641_000.0, 0.0, "641 ± 0 KB")])
def test_byte_cells_use_adaptive_units(mean, std, text):
    assert analysis.fmt_bytes_stat(mean, std) == text


def test_table_of_bytes(runs, capsys):
    table = _script("table")
    assert table.main([str(runs), "--metric", "uplink"]) == 0
    out = capsys.readouterr().out
    with h5py.File(runs / "topk_s0.h5") as f:
        up = float(np.sum(f["rounds/uplink_payload_bytes"][()]))
    assert analysis.fmt_bytes_stat(up, 0.0) in out  # both seeds send the same bytes
    row = next(ln for ln in out.splitlines() if ln.startswith("| Synthetic"))
    means = [c.strip(" *").split(" ")[0] for c in row.split("|")[2:-1]]
    assert all(float(m) >= 1 for m in means), row  # never "0.003 ± 0.000 MB"
    assert table.main([str(runs), "--metric", "traffic", "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    assert re.search(r"\$[0-9.]+ \\pm [0-9.]+\$ (B|KB|MB)", latex), latex
