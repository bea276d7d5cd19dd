"""The FedSynSAM claims report: run files in, a markdown report with PNG figures out.

FedSynSAM's abstract (Gu et al., arXiv 2602.11584) makes three claims; this script tests
each on the runs of a study sweep (jobs/fedsynsam_mnist.toml, jobs/fedsynsam_cifar10.toml)
and says what the runs support, whatever that is:

* **C1** gradient compression makes FL converge to sharper minima, more so under non-IID
  data: FedAvg's final top Hessian eigenvalue and Hessian trace (fixed subset, same
  samples in every run) under each compressor against dense, per partition; then whether
  that sharpening is larger under the non-IID partition than under IID.
* **C2** the previous round's global update, the estimate FedLESAM climbs, degrades when
  updates are compressed: the official FedLESAM's perturbation cosine (its ascent against
  the true global gradient, fedmpi.perturbation) under each compressor against dense; the
  same estimate measured in the FedAvg runs as a second row.
* **C3** FedSynSAM's synthetic set estimates the global perturbation more accurately,
  hence flatter minima and better accuracy, at the same communication: FedSynSAM against
  the official FedLESAM under each compressor and partition, on the perturbation cosine,
  the final lambda_max and trace, the final test accuracy; and the bytes both send.

    python analysis/claims.py runs/fedsynsam_mnist -o docs/results/fedsynsam-mnist.md
    python analysis/claims.py runs/fedsynsam_mnist runs/fedsynsam_mnist_ablation \\
        --sweep jobs/fedsynsam_mnist.toml jobs/fedsynsam_mnist_ablation.toml -o REPORT.md

Every comparison pairs runs by seed (same seed: same partition, initial model and client
sampling) and reports the mean difference over seeds with its 95% confidence interval
(Student t, n - 1 degrees of freedom). Verdict: **supported** when the interval lies
entirely on the claimed side of 0, **not supported** when it lies entirely on the other
side, **inconclusive at this n** otherwise (a single seed is always inconclusive). A claim
as a whole is supported when every one of its comparisons is, not supported when any
contradicts it, inconclusive otherwise. No correction for multiple comparisons.

Runs the study expects (``<folder>/configs/*.toml`` as written by ``fedmpi.sweep`` and
``slurm/submit.py``, and the points of ``--sweep`` files) but that are not complete are
listed as missing, and every cell says how many seeds it holds. Figures go to the folder
named after the report (``docs/results/fedsynsam-mnist/*.png``).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import _path  # noqa: F401
import numpy as np

from fedmpi import analysis
from fedmpi.config import SamConfig

# ---------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student t distribution function."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_ppf(p: float, df: float) -> float:
    """Student t quantile (bisection on :func:`t_cdf`)."""
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Effect:
    """The mean of paired differences over seeds and its 95% confidence interval."""

    mean: float
    lo: float
    hi: float
    n: int

    def verdict(self, sign: int) -> str:
        """``sign`` = +1 if the claim says the difference is > 0, -1 if < 0."""
        if self.n < 2 or not math.isfinite(self.lo):
            return "inconclusive at this n"
        lo, hi = sorted((sign * self.lo, sign * self.hi))
        if lo > 0:
            return "supported"
        if hi < 0:
            return "not supported"
        return "inconclusive at this n"

    def text(self, fmt: str = "{:+.3f}") -> str:
        if self.n == 0:
            return "–"
        if self.n < 2:
            return f"{fmt.format(self.mean)} (n=1)"
        return (f"{fmt.format(self.mean)} [{fmt.format(self.lo)}, {fmt.format(self.hi)}]"
                f" (n={self.n})")


def effect(diffs: Sequence[float]) -> Effect:
    d = np.asarray([x for x in diffs if math.isfinite(x)], dtype=float)
    if d.size == 0:
        return Effect(float("nan"), float("nan"), float("nan"), 0)
    if d.size == 1:
        return Effect(float(d[0]), float("nan"), float("nan"), 1)
    half = t_ppf(0.975, d.size - 1) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return Effect(float(d.mean()), float(d.mean()) - half, float(d.mean()) + half, int(d.size))


def welch(a: Sequence[float], b: Sequence[float]) -> Effect:
    """mean(a) - mean(b) with Welch's 95% interval (unpaired samples)."""
    x = np.asarray([v for v in a if math.isfinite(v)], dtype=float)
    y = np.asarray([v for v in b if math.isfinite(v)], dtype=float)
    if x.size < 2 or y.size < 2:
        n = min(x.size, y.size)
        mean = float(x.mean() - y.mean()) if n else float("nan")
        return Effect(mean, float("nan"), float("nan"), n)
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1)) if se > 0 else 1.0
    half = t_ppf(0.975, df) * se
    mean = float(x.mean() - y.mean())
    return Effect(mean, mean - half, mean + half, int(min(x.size, y.size)))


# ---------------------------------------------------------------------------- runs

METHODS = ("FedAvg", "FedSAM", "MoFedSAM", "FedLESAM", "FedLESAM (client)", "FedSynSAM")
ASCENT = METHODS[1:]
#: FedSynSAM's knobs the ablation varies, and the study's values (the config defaults)
KNOBS = ("perturb_mode", "traj_window", "m", "synth_site")
DEFAULT_KNOBS = {k: getattr(SamConfig, k) for k in KNOBS}


def method_of(flat: dict) -> str:
    name = flat.get("sam.name", "none")
    if name == "none":
        return "FedAvg"
    if name == "fedlesam":
        return ("FedLESAM" if flat.get("sam.lesam_source", "server") == "server"
                else "FedLESAM (client)")
    label = {"fedsam": "FedSAM", "mofedsam": "MoFedSAM", "fedsynsam": "FedSynSAM"}.get(
        name, name)
    if name == "fedsynsam":
        changed = [f"{k}={analysis._fmt(flat.get(f'sam.{k}'))}" for k in KNOBS
                   if flat.get(f"sam.{k}", DEFAULT_KNOBS[k]) != DEFAULT_KNOBS[k]]
        if changed:
            label += f" ({', '.join(changed)})"
    return label


def compressor_of(flat: dict) -> str:
    name = flat.get("compressor.name", "identity")
    if name == "identity":
        return "dense"
    if name == "topk":
        label = f"top-k {100 * float(flat.get('compressor.ratio', 0.01)):g}%"
        return label + (" + EF" if flat.get("compressor.ef") else "")
    if name == "qsgd":
        return f"QSGD s={flat.get('compressor.levels', 15)}"
    return analysis.COMPRESSORS.get(name, name)


def partition_of(flat: dict) -> str:
    part = flat.get("data.partition", "iid")
    if part == "iid":
        return "IID"
    if part in ("dirichlet", "dirichlet_balanced", "client_dirichlet"):
        return f"Dirichlet α={analysis._fmt(flat.get('data.alpha'))}"
    return part


@dataclass
class Cell:
    """The seeds of one (method, compressor, partition)."""

    runs: dict[int, analysis.RunInfo] = field(default_factory=dict)  #: seed -> run
    expected: set[int] = field(default_factory=set)  #: seeds the study has configs for


@dataclass
class Study:
    cells: dict[tuple[str, str, str], Cell]
    missing: list[str]  #: expected runs without a complete run file
    extra: list[str]  #: run names found twice (kept the first)
    runs: list[analysis.RunInfo]

    def cell(self, method: str, comp: str, part: str) -> Cell:
        return self.cells.get((method, comp, part), Cell())

    def axis(self, i: int, order: Sequence[str] = ()) -> list[str]:
        seen = list(dict.fromkeys(k[i] for k in self.cells))
        known = [x for x in order if x in seen]
        return known + sorted(x for x in seen if x not in known)

    @property
    def compressors(self) -> list[str]:
        return sorted(self.axis(1), key=lambda c: (c != "dense", c))

    @property
    def partitions(self) -> list[str]:
        return sorted(self.axis(2), key=lambda p: (p != "IID", p))

    @property
    def methods(self) -> list[str]:
        return self.axis(0, METHODS)


def expected_configs(folders: Sequence[str], sweeps: Sequence[str]) -> list[tuple[str, dict]]:
    """(run name, flat config) of every run the study expects."""
    out: dict[str, dict] = {}
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "configs", "*.toml"))):
            with open(path) as fh:
                flat = analysis.flatten_config(fh.read())
            out[str(flat.get("run.name"))] = flat
    if sweeps:
        from fedmpi import config, sweep

        for path in sweeps:
            for p in sweep.load(path).points:
                out[p.name] = analysis.flatten_config(config.to_toml(p.config))
    return sorted(out.items())


def collect(runs: Sequence[analysis.RunInfo], expected: Sequence[tuple[str, dict]]) -> Study:
    cells: dict[tuple[str, str, str], Cell] = {}
    extra = []

    def key(flat: dict) -> tuple[str, str, str]:
        return (method_of(flat), compressor_of(flat), partition_of(flat))

    for r in sorted(runs, key=lambda r: r.path):
        cell = cells.setdefault(key(r.flat), Cell())
        if r.seed in cell.runs:
            extra.append(r.path)
            continue
        cell.runs[r.seed] = r
    done = {r.name for r in runs}
    missing = []
    for name, flat in expected:
        cell = cells.setdefault(key(flat), Cell())
        cell.expected.add(int(flat.get("run.seed", 0)))
        if name not in done:
            missing.append(name)
    return Study(cells, missing, extra, list(runs))


# ---------------------------------------------------------------------------- metrics


def last(r: analysis.RunInfo, key: str) -> float:
    return analysis.last_finite(r.run.rounds[key]) if key in r.run.rounds else float("nan")


def mean_after_round0(r: analysis.RunInfo, key: str) -> float:
    """Mean of a measured per-round column over rounds >= 1 (round 0 has no history)."""
    if key not in r.run.rounds:
        return float("nan")
    x = np.asarray(r.run.rounds[key], dtype=float)[1:]
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def total(r: analysis.RunInfo, key: str) -> float:
    return float(np.sum(r.run.rounds[key]))


@dataclass(frozen=True)
class Quantity:
    label: str
    fn: Callable[[analysis.RunInfo], float]
    fmt: str
    log: bool = False  #: compare as log ratios (positive quantities of varying scale)


Q = {
    "acc": Quantity("final test accuracy (%)",
                    lambda r: 100 * last(r, "test_acc"), "{:.2f}"),
    "lmax": Quantity("final λmax", lambda r: last(r, "sharpness_lmax"), "{:.3g}", True),
    "trace": Quantity("final Hessian trace", lambda r: last(r, "sharpness_trace"), "{:.3g}",
                      True),
    "cos": Quantity("perturbation cosine (mean over rounds ≥ 1)",
                    lambda r: mean_after_round0(r, "perturb_cos"), "{:.3f}"),
    "cos_update": Quantity("cos(previous global update, true gradient)",
                           lambda r: mean_after_round0(r, "perturb_cos_update"), "{:.3f}"),
    "fit": Quantity("FedSynSAM fit cosine (mean over rounds ≥ 1)",
                    lambda r: mean_after_round0(r, "synth_fit_cos"), "{:.3f}"),
    "uplink_mb": Quantity("uplink (MB, all rounds)",
                          lambda r: total(r, "uplink_bytes") / 1e6, "{:.2f}"),
    "downlink_mb": Quantity("downlink to participants (MB, all rounds)",
                            lambda r: total(r, "downlink_payload_bytes") / 1e6, "{:.2f}"),
    "wall": Quantity("wall time (s)", lambda r: last(r, "wall_time"), "{:.0f}"),
}


def values(cell: Cell, q: str) -> dict[int, float]:
    return {s: Q[q].fn(r) for s, r in cell.runs.items()}


def summary(cell: Cell, q: str) -> str:
    v = [x for x in values(cell, q).values() if math.isfinite(x)]
    want = len(cell.expected | set(cell.runs))
    if not v:
        return "missing" if not cell.runs else "–"
    s = analysis.stat(v)
    fmt = Q[q].fmt
    text = fmt.format(s.mean) + (f" ± {fmt.format(s.std)}" if s.n > 1 else "")
    return text + (f" (n={s.n}/{want})" if s.n < want else "")


def paired(a: Cell, b: Cell, q: str) -> list[float]:
    """Per seed: a - b, or log(a / b) for log quantities."""
    va, vb = values(a, q), values(b, q)
    out = []
    for s in sorted(set(va) & set(vb)):
        x, y = va[s], vb[s]
        if Q[q].log:
            out.append(math.log(x / y) if x > 0 and y > 0 else float("nan"))
        else:
            out.append(x - y)
    return out


# ---------------------------------------------------------------------------- claims


@dataclass
class Row:
    cells: list[str]
    verdict: str


@dataclass
class Claim:
    name: str
    statement: str
    header: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        got = [r.verdict for r in self.rows]
        if not got:
            return "inconclusive at this n (no runs)"
        if "not supported" in got:
            return "not supported"
        if all(v == "supported" for v in got):
            return "supported"
        return "inconclusive at this n"

    def markdown(self) -> list[str]:
        counts = {v: sum(r.verdict == v for r in self.rows)
                  for v in ("supported", "not supported", "inconclusive at this n")}
        lines = [f"## {self.name}", "", f"*Claim:* {self.statement}", "",
                 f"**Verdict: {self.verdict}** ({counts['supported']} comparisons supported, "
                 f"{counts['not supported']} not supported, "
                 f"{counts['inconclusive at this n']} inconclusive).", "",
                 "| " + " | ".join([*self.header, "verdict"]) + " |",
                 "|" + "---|" * (len(self.header) + 1)]
        lines += ["| " + " | ".join([*r.cells, r.verdict]) + " |" for r in self.rows]
        return lines + [""] + self.notes


def _ratio_text(e: Effect) -> str:
    """A log-ratio effect as a ratio with its interval."""
    if e.n == 0:
        return "–"
    if e.n < 2:
        return f"×{math.exp(e.mean):.2f} (n=1)"
    return f"×{math.exp(e.mean):.2f} [{math.exp(e.lo):.2f}, {math.exp(e.hi):.2f}] (n={e.n})"


def claim_c1(st: Study) -> Claim:
    rows = []
    compressed = [c for c in st.compressors if c != "dense"]
    for q in ("lmax", "trace"):
        for c in compressed:
            per_part = {}
            for p in st.partitions:
                a, b = st.cell("FedAvg", c, p), st.cell("FedAvg", "dense", p)
                e = effect(paired(a, b, q))
                per_part[p] = paired(a, b, q)
                rows.append(Row([Q[q].label, c, p, summary(b, q), summary(a, q),
                                 _ratio_text(e)], e.verdict(+1)))
            iid = [p for p in st.partitions if p == "IID"]
            noniid = [p for p in st.partitions if p != "IID"]
            for p in noniid if iid else []:
                e = welch(per_part[p], per_part[iid[0]])
                rows.append(Row([Q[q].label, c, f"{p} vs IID", "", "",
                                 f"{_ratio_text(e)} (sharpening ratio, non-IID / IID)"],
                                e.verdict(+1)))
    return Claim(
        "C1: compression sharpens the minimum, more so under non-IID data",
        "gradient compression makes FL converge to sharper minima, particularly under "
        "non-IID data. Tested on FedAvg (no SAM) runs: final λmax and Hessian trace under "
        "each compressor against dense, per partition (ratio compressed / dense, paired by "
        "seed); then the sharpening ratio under the non-IID partition against IID (Welch).",
        ["quantity", "compressor", "partition", "dense", "compressed", "ratio [95% CI]"], rows,
        ["λmax: power iteration, its residual ‖Hv − λv‖ is in the run files "
         "(`sharpness_lmax_resid`); trace: Hutchinson with its standard error "
         "(`sharpness_trace_stderr`); both on the same fixed training subset in every run."])


def claim_c2(st: Study) -> Claim:
    rows = []
    for method, q, what in (("FedLESAM", "cos", "FedLESAM (official) ascent"),
                            ("FedAvg", "cos_update", "previous update, FedAvg runs")):
        for c in (c for c in st.compressors if c != "dense"):
            for p in st.partitions:
                a, b = st.cell(method, c, p), st.cell(method, "dense", p)
                e = effect(paired(a, b, q))
                rows.append(Row([what, c, p, summary(b, q), summary(a, q), e.text()],
                                e.verdict(-1)))
    return Claim(
        "C2: the previous-round update degrades as a perturbation estimate under compression",
        "the existing estimate of the global perturbation (FedLESAM: the previous round's "
        "global update) degrades when updates are compressed. Tested on the cosine between "
        "the ascent and the true global gradient at w^t (fedmpi.perturbation; mean over the "
        "measured rounds ≥ 1): compressed − dense, paired by seed; the claim says < 0.",
        ["estimate", "compressor", "partition", "dense", "compressed", "difference [95% CI]"],
        rows)


def claim_c3(st: Study) -> Claim:
    rows = []
    for c in st.compressors:
        for p in st.partitions:
            syn, les = st.cell("FedSynSAM", c, p), st.cell("FedLESAM", c, p)
            for q, sign in (("cos", +1), ("lmax", -1), ("trace", -1), ("acc", +1)):
                e = effect(paired(syn, les, q))
                text = _ratio_text(e) if Q[q].log else e.text()
                rows.append(Row([Q[q].label, c, p, summary(les, q), summary(syn, q), text],
                                e.verdict(sign)))
    bytes_rows = ["| compressor | partition | method | uplink MB | downlink MB |",
                  "|---|---|---|---|---|"]
    for c in st.compressors:
        for p in st.partitions:
            for m in ("FedLESAM", "FedSynSAM"):
                cell = st.cell(m, c, p)
                bytes_rows.append(f"| {c} | {p} | {m} | {summary(cell, 'uplink_mb')} | "
                                  f"{summary(cell, 'downlink_mb')} |")
    return Claim(
        "C3: FedSynSAM's perturbation is more accurate, its minimum flatter, its accuracy "
        "higher, at the same communication",
        "a synthetic set built on the global model trajectory gives a more accurate global "
        "perturbation, hence flatter minima and better accuracy, at the same communication. "
        "Tested against the official FedLESAM (the estimate the abstract names), paired by "
        "seed: FedSynSAM − FedLESAM for the perturbation cosine (> 0) and the accuracy "
        "(> 0), FedSynSAM / FedLESAM for λmax and the trace (< 1).",
        ["quantity", "compressor", "partition", "FedLESAM", "FedSynSAM",
         "difference or ratio [95% CI]"], rows,
        ["Communication (uplink is the compressor's; downlink counts the model and each "
         "estimator's extra payload: FedLESAM's previous update, 4d B a participant on a "
         "dense downlink, FedSynSAM's synthetic set, 4M(D_in + C) + 1 B):", "", *bytes_rows])


# ---------------------------------------------------------------------------- figures


def _series(cell: Cell, key: str) -> analysis.Series | None:
    runs = [r for r in cell.runs.values() if key in r.run.rounds
            and np.isfinite(np.asarray(r.run.rounds[key], dtype=float)).any()]
    return analysis.series(runs, key) if runs else None


def _plot_series(ax, s: analysis.Series | None, label: str, color, marker: str = "") -> None:
    if s is None:
        return
    ok = np.isfinite(s.mean)
    analysis.plot_band(ax, s.rounds, s, label, color)
    if marker and ok.sum() <= 12:
        ax.plot(s.rounds[ok], s.mean[ok], marker, color=color, markersize=3)


def figure_c1(st: Study, out: str) -> str:
    plt = analysis.pyplot()
    parts, comps = st.partitions, st.compressors
    col = analysis.colors(comps)
    fig, axes = plt.subplots(len(parts), 2, figsize=(7.0, 2.8 * len(parts)), squeeze=False)
    for i, p in enumerate(parts):
        for j, (key, label) in enumerate((("sharpness_lmax", r"$\lambda_{\max}$"),
                                          ("sharpness_trace", r"Hessian trace"))):
            ax = axes[i][j]
            for c in comps:
                _plot_series(ax, _series(st.cell("FedAvg", c, p), key), c, col[c], "o")
            ax.set_title(f"FedAvg, {p}")
            ax.set_xlabel("Communication round")
            ax.set_ylabel(label)
            analysis.integer_ticks(ax)
    fig.suptitle("C1: sharpness of the global model over rounds (mean ± std over seeds)",
                 fontsize=10)
    analysis.figure_legend(fig, axes)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return analysis.save(fig, out)[0]


def figure_cos(st: Study, out: str, title: str = "C2, C3: each client's ascent at its "
               "first local step against the true global gradient") -> str:
    plt = analysis.pyplot()
    parts, comps = st.partitions, st.compressors
    methods = [m for m in st.methods if m != "FedAvg"]  # FedAvg climbs nothing
    col = analysis.colors(list(ASCENT) + [m for m in methods if m not in ASCENT])
    fig, axes = plt.subplots(len(parts), len(comps), figsize=(2.6 * len(comps) + 0.6,
                                                             2.6 * len(parts)),
                             squeeze=False, sharey=True)
    for i, p in enumerate(parts):
        for j, c in enumerate(comps):
            ax = axes[i][j]
            for m in methods:
                _plot_series(ax, _series(st.cell(m, c, p), "perturb_cos"), m, col[m])
            ax.axhline(0.0, color="0.5", linewidth=0.6)
            ax.set_title(f"{c}, {p}")
            ax.set_xlabel("Communication round")
            if j == 0:
                ax.set_ylabel("cos(ascent, true global gradient)")
            analysis.integer_ticks(ax)
    fig.suptitle(f"{title} (participants' mean; mean ± std over seeds)", fontsize=9)
    analysis.figure_legend(fig, axes, ncol=len(methods))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return analysis.save(fig, out)[0]


def figure_fit(st: Study, out: str) -> str:
    plt = analysis.pyplot()
    parts, comps = st.partitions, st.compressors
    col = analysis.colors(comps)
    fig, axes = plt.subplots(1, len(parts), figsize=(3.4 * len(parts), 2.8), squeeze=False)
    for i, p in enumerate(parts):
        ax = axes[0][i]
        for c in comps:
            _plot_series(ax, _series(st.cell("FedSynSAM", c, p), "synth_fit_cos"), c, col[c])
        ax.set_title(f"FedSynSAM, {p}")
        ax.set_xlabel("Communication round")
        ax.set_ylabel("fit cosine of S to its segment")
        analysis.integer_ticks(ax)
    fig.suptitle("C3: how well FedSynSAM's synthetic set matches the trajectory segment "
                 "it was fitted to (mean ± std over seeds)", fontsize=9)
    analysis.figure_legend(fig, axes)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return analysis.save(fig, out)[0]


MARKERS = ("o", "s", "^", "D", "v", "P")


def figure_bytes(st: Study, out: str) -> str:
    plt = analysis.pyplot()
    parts, comps = st.partitions, st.compressors
    methods = st.methods
    col = analysis.colors(list(METHODS) + [m for m in methods if m not in METHODS])
    fig, axes = plt.subplots(1, len(parts), figsize=(3.6 * len(parts), 3.2), squeeze=False,
                             sharey=True)
    for i, p in enumerate(parts):
        ax = axes[0][i]
        for j, m in enumerate(methods):
            nudge = 10 ** (0.03 * (j - (len(methods) - 1) / 2))  # same bytes: side by side
            for k, c in enumerate(comps):
                cell = st.cell(m, c, p)
                up = [v for v in values(cell, "uplink_mb").values() if math.isfinite(v)]
                acc = [v for v in values(cell, "acc").values() if math.isfinite(v)]
                if not up or not acc:
                    continue
                a = analysis.stat(acc)
                ax.errorbar(np.mean(up) * nudge, a.mean, yerr=a.std if a.n > 1 else None,
                            marker=MARKERS[k % len(MARKERS)], color=col[m], linestyle="none",
                            markersize=5, capsize=2, label=m if k == 0 else None)
        ax.set_xscale("log")
        ax.set_title(p)
        ax.set_xlabel("uplink, all rounds (MB, log scale)")
        if i == 0:
            ax.set_ylabel("final test accuracy (%)")
    # one legend below: colours are methods, markers compressors
    handles = [plt.Line2D([], [], color=col[m], marker="o", linestyle="none", label=m)
               for m in methods]
    handles += [plt.Line2D([], [], color="0.3", marker=MARKERS[k % len(MARKERS)],
                           linestyle="none", label=c) for k, c in enumerate(comps)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5),
               frameon=False, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle("C3: final accuracy against uplink bytes (mean ± std over seeds; methods "
                 "nudged sideways)", fontsize=10)
    rows = -(-len(handles) // 5)
    fig.tight_layout(rect=(0, 0.07 * rows, 1, 1))
    return analysis.save(fig, out)[0]


def figure_final_sharpness(st: Study, out: str) -> str:
    plt = analysis.pyplot()
    parts, comps, methods = st.partitions, st.compressors, st.methods
    col = analysis.colors(list(METHODS) + [m for m in methods if m not in METHODS])
    fig, axes = plt.subplots(2, len(parts), figsize=(3.8 * len(parts), 5.4), squeeze=False)
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(comps))
    for i, p in enumerate(parts):
        for row, q in enumerate(("lmax", "trace")):
            ax = axes[row][i]
            for k, m in enumerate(methods):
                stats = [analysis.stat(list(values(st.cell(m, c, p), q).values())) for c in comps]
                ax.bar(x + (k - (len(methods) - 1) / 2) * width,
                       np.nan_to_num([s.mean for s in stats]), width,
                       yerr=[s.std if s.n > 1 else 0.0 for s in stats], capsize=2,
                       color=col[m], label=m, error_kw={"linewidth": 0.8})
            ax.set_xticks(x, comps)
            ax.set_title(p)
            ax.set_ylabel(Q[q].label)
            ax.grid(axis="x", visible=False)
    analysis.figure_legend(fig, axes, ncol=min(len(methods), 3))
    fig.suptitle("Final sharpness per method (mean ± std over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return analysis.save(fig, out)[0]


# ---------------------------------------------------------------------------- report


def setting_lines(st: Study) -> list[str]:
    if not st.runs:
        return ["No complete runs."]
    f = st.runs[0].flat
    rho = {}
    for (m, _c, _p), cell in st.cells.items():
        for r in cell.runs.values():
            if m != "FedAvg":
                rho.setdefault(m, set()).add(r.flat.get("sam.rho"))
    steps = (f"{f.get('client.local_steps')} local steps" if f.get("client.local_steps")
             else f"{f.get('client.local_epochs')} local epochs")
    lines = [
        f"- {analysis.setting_base(st.runs[0])}, {f.get('data.num_clients')} clients, "
        f"{100 * float(f.get('server.participation', 1)):g}% sampled a round, "
        f"{f.get('run.rounds')} rounds, {steps} of batch {f.get('client.batch_size')}, "
        f"lr {f.get('client.lr')}, weight decay {f.get('client.weight_decay')}.",
        "- rho per method (from the run configs): " + ", ".join(
            f"{m} {'/'.join(analysis._fmt(v) for v in sorted(vs))}"
            for m, vs in sorted(rho.items())),
        f"- Sharpness on {f.get('eval.sharpness_samples')} fixed training samples "
        f"(eval.subset_seed = {f.get('eval.subset_seed')}) every "
        f"{f.get('eval.sharpness_every')} rounds; perturbation cosines every "
        f"{f.get('eval.perturbation_every')} rounds against the true gradient on "
        f"{f.get('eval.perturbation_samples')} samples of the clients' union.",
    ]
    return lines


def cells_table(st: Study, quantities: Sequence[str]) -> list[str]:
    lines = ["| method | compressor | partition | " + " | ".join(Q[q].label for q in quantities)
             + " |", "|---|---|---|" + "---|" * len(quantities)]
    for m in st.methods:
        for c in st.compressors:
            for p in st.partitions:
                cell = st.cell(m, c, p)
                if not cell.runs and not cell.expected:
                    continue
                lines.append(f"| {m} | {c} | {p} | "
                             + " | ".join(summary(cell, q) for q in quantities) + " |")
    return lines


def report(st: Study, out_md: str, command: str) -> list[str]:
    fig_dir = os.path.splitext(out_md)[0]
    rel = os.path.basename(fig_dir)
    main = Study({k: v for k, v in st.cells.items() if k[0] in METHODS}, st.missing,
                 st.extra, st.runs)
    figs = {"c1": figure_c1(main, os.path.join(fig_dir, "c1_sharpness_rounds")),
            "cos": figure_cos(main, os.path.join(fig_dir, "c2_c3_perturbation_cosine")),
            "bytes": figure_bytes(main, os.path.join(fig_dir, "c3_accuracy_vs_uplink")),
            "final": figure_final_sharpness(main, os.path.join(fig_dir, "final_sharpness")),
            "fit": figure_fit(main, os.path.join(fig_dir, "c3_fedsynsam_fit_cosine"))}

    def img(key: str, alt: str) -> str:
        return f"![{alt}]({rel}/{os.path.basename(figs[key])})"

    expected = sum(len(c.expected | set(c.runs)) for c in st.cells.values())
    complete = sum(len(c.runs) for c in st.cells.values())
    walls = [Q["wall"].fn(r) for r in st.runs]
    walls = [w for w in walls if math.isfinite(w)]
    commits = sorted({str(r.run.attrs.get("git_commit", "?"))[:12] for r in st.runs})
    lines = [f"# FedSynSAM claims: {analysis.setting_base(st.runs[0]) if st.runs else '(no runs)'}",
             "", f"Generated {datetime.date.today().isoformat()} by `{command}` from "
             f"{complete} complete run files of {expected} expected (fedmpi commits: "
             f"{', '.join(commits)}). Every number below is read from the run files.", "",
             "## Setting", "", *setting_lines(main), "",
             "## Runs", "",
             f"{complete} of {expected} expected runs are complete; their summed wall time is "
             f"{sum(walls) / 3600:.2f} h (mean {np.mean(walls) if walls else float('nan'):.0f}"
             " s a run, start-up not included)."]
    if st.missing:
        lines += ["", f"Missing ({len(st.missing)}; no complete run file):", ""]
        lines += [f"- `{name}`" for name in st.missing]
    if st.extra:
        lines += ["", "Found twice (kept the first): " + ", ".join(f"`{p}`" for p in st.extra)]
    lines += ["", "## How the verdicts are reached", "",
              "Each comparison pairs runs by seed and gives the mean difference (or ratio, "
              "for λmax and the trace) with its 95% confidence interval (Student t over the "
              "seeds). **supported**: the interval lies on the claimed side; **not "
              "supported**: it lies on the other side; **inconclusive at this n**: it "
              "contains no effect (one seed is always inconclusive). A claim is supported if "
              "all its comparisons are, not supported if any is, inconclusive otherwise. No "
              "correction for multiple comparisons; cells show mean ± std over seeds and "
              "(n=k/m) where seeds are missing.", ""]
    for claim, figures in ((claim_c1(main), [img("c1", "C1 sharpness over rounds"),
                                             img("final", "final sharpness per method")]),
                           (claim_c2(main), [img("cos", "perturbation cosine over rounds")]),
                           (claim_c3(main), [img("bytes", "accuracy vs uplink bytes"),
                                             img("fit", "FedSynSAM fit cosine")])):
        lines += claim.markdown() + [""] + [f for fig in figures for f in (fig, "")]
    lines += ["## Every cell", "", *cells_table(main, ("acc", "lmax", "trace", "cos",
                                                      "cos_update", "uplink_mb",
                                                      "downlink_mb", "wall")), ""]
    variants = sorted(m for m, _c, _p in st.cells if m not in METHODS)
    if variants:
        abl = Study({k: v for k, v in st.cells.items()
                     if k[0] in variants or k[0] == "FedSynSAM"}, [], [], st.runs)
        lines += ["## FedSynSAM ablation", "",
                  "One knob at a time from the study's FedSynSAM "
                  f"({', '.join(f'{k}={analysis._fmt(v)}' for k, v in DEFAULT_KNOBS.items())})"
                  ".", "",
                  *cells_table(abl, ("cos", "fit", "acc", "lmax", "trace", "downlink_mb",
                                     "wall")), ""]
        path = figure_cos(abl, os.path.join(fig_dir, "ablation_perturbation_cosine"),
                          "FedSynSAM ablation: the ascent against the true global gradient")
        lines += [f"![ablation]({rel}/{os.path.basename(path)})", ""]
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python analysis/claims.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="study folders (or run files)")
    p.add_argument("-o", "--out", required=True, help="the markdown report to write; "
                   "figures go to the folder of the same name")
    p.add_argument("--sweep", nargs="*", default=[], metavar="SWEEP.toml",
                   help="sweep files whose runs are expected (besides <folder>/configs)")
    p.add_argument("--include-incomplete", action="store_true")
    p.add_argument("--notes", metavar="FILE.md",
                   help="a markdown file of discussion appended to the report as it is (what "
                        "was checked, what the verdicts mean); its numbers must come from "
                        "the tables above it")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = analysis.load(args.runs, args.include_incomplete)
    except FileNotFoundError as exc:
        print(f"claims: error: {exc}", file=sys.stderr)
        return 2
    folders = [p for p in args.runs if os.path.isdir(p)]
    st = collect(runs, expected_configs(folders, args.sweep))
    if not runs:
        print("claims: error: no complete runs found", file=sys.stderr)
        return 1
    datasets = {(r.flat.get("data.dataset"), r.flat.get("model.name")) for r in runs}
    if len(datasets) > 1:
        print(f"claims: error: one study at a time (found {sorted(datasets)})",
              file=sys.stderr)
        return 2
    command = "python analysis/claims.py " + " ".join(
        [*args.runs, *(["--sweep", *args.sweep] if args.sweep else []), "-o", args.out,
         *(["--notes", args.notes] if args.notes else [])])
    text = "\n".join(report(st, args.out, command)) + "\n"
    if args.notes:
        with open(args.notes) as fh:
            text += "\n" + fh.read().strip() + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
