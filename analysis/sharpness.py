"""Sharpness per method and compressor: the Hessian's top eigenvalue (λmax) and its trace
at the last measurement of each run (``eval.sharpness_every``), as grouped bars (x:
uplink compressor, "none (dense)" for uncompressed runs; bars: perturbation estimator;
mean over seeds, error bar ±1 std), one figure per setting, plus a table; and, where a
run measured sharpness more than once, the same two quantities against the round (colour
= estimator as in the bars, line style = compressor).

    python analysis/sharpness.py runs/fedsynsam -o figures/sharpness

Writes ``<out>/sharpness_<setting>.png|pdf`` and ``<out>/sharpness_rounds_<setting>.png|pdf``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

import _path  # noqa: F401
import numpy as np

from fedmpi import analysis

QUANTITIES = (("lmax", "sharpness_lmax", r"Top Hessian eigenvalue $\lambda_{\max}$"),
              ("trace", "sharpness_trace", r"Hessian trace $\mathrm{tr}(H)$"))
NO_SAM = "no SAM"
DENSE = "none (dense)"  #: the compressor axis's name for uncompressed updates
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))


def compressor_label(r: analysis.RunInfo) -> str:
    """A run's compressor on the compressor axis: FedAvg's "compressor" is none."""
    if r.flat.get("compressor.name", "identity") == "identity":
        return r.compressor.replace("FedAvg", DENSE, 1)
    return r.compressor


def measured(r: analysis.RunInfo) -> int:
    return int(np.isfinite(np.asarray(r.run.rounds["sharpness_lmax"], dtype=float)).sum())


def cells(table: analysis.Table, row: str):
    """(compressors, estimators, {(compressor, estimator): runs}) of one setting."""
    out: dict[tuple[str, str], list[analysis.RunInfo]] = {}
    for m in table.methods:
        for r in table.runs(row, m):
            if measured(r):
                out.setdefault((compressor_label(r), r.estimator or NO_SAM), []).append(r)
    comps = list(dict.fromkeys(c for c, _ in out))
    ests = list(dict.fromkeys(e for _, e in sorted(out, key=lambda k: k[1] != NO_SAM)))
    return comps, ests, out


def plot_bars(table: analysis.Table, row: str, out_dir: str) -> list[str]:
    plt = analysis.pyplot()
    comps, ests, groups = cells(table, row)
    col = analysis.colors(ests)
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.2))
    width = 0.8 / len(ests)
    x = np.arange(len(comps))
    for ax, (metric, _key, label) in zip(axes, QUANTITIES, strict=True):
        for i, e in enumerate(ests):
            stats = [analysis.cell_stat(groups.get((c, e), []), metric) for c in comps]
            mean = np.array([s.mean for s in stats])
            std = np.array([s.std if s.n > 1 else 0.0 for s in stats])
            # a compressor without runs of this estimator gets no bar (not a bar at 0)
            ax.bar(x + (i - (len(ests) - 1) / 2) * width, mean, width,
                   yerr=np.where(np.isfinite(mean), std, 0.0), capsize=2, color=col[e],
                   label=e, error_kw={"linewidth": 0.8})
        ax.set_xticks(x, comps, rotation=20 if len(comps) > 3 else 0, ha="right"
                      if len(comps) > 3 else "center")
        ax.set_ylabel(label)
        ax.set_xlabel("Uplink compressor")
        ax.grid(axis="x", visible=False)
    fig.suptitle(f"{row}: sharpness at the last measurement ({analysis.seeds_note(table, row)})"
                 .replace("band", "error bar"), fontsize=10)
    analysis.figure_legend(fig, axes)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return analysis.save(fig, os.path.join(out_dir, f"sharpness_{analysis.slug(row)}"))


def plot_rounds(table: analysis.Table, row: str, out_dir: str) -> list[str]:
    """Colour = estimator (as in the bars), line style = compressor."""
    plt = analysis.pyplot()
    comps, ests, groups = cells(table, row)
    col = analysis.colors(ests)
    style = {c: LINESTYLES[i % len(LINESTYLES)] for i, c in enumerate(comps)}
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.2))
    for ax, (_metric, key, label) in zip(axes, QUANTITIES, strict=True):
        for e in ests:
            for c in comps:
                runs = groups.get((c, e))
                if not runs:
                    continue
                s = analysis.series(runs, key)
                analysis.plot_band(ax, s.rounds, s, f"{e}, {c}", col[e], linestyle=style[c],
                            alpha=0.2 / max(1, len(groups)) ** 0.5)
                ok = np.isfinite(s.mean)
                ax.plot(s.rounds[ok], s.mean[ok], "o", color=col[e], markersize=3)
        ax.set_xlabel("Communication round")
        analysis.integer_ticks(ax)
        ax.set_ylabel(label)
    fig.suptitle(f"{row}: sharpness during training ({analysis.seeds_note(table, row)})",
                 fontsize=10)
    analysis.figure_legend(fig, axes)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return analysis.save(fig, os.path.join(out_dir, f"sharpness_rounds_{analysis.slug(row)}"))


def summary_table(table: analysis.Table) -> str:
    lines = ["| setting | estimator | compressor | λmax | trace | seeds |",
             "|---|---|---|---|---|---|"]
    for row in table.rows:
        comps, ests, groups = cells(table, row)
        for e in ests:
            for c in comps:
                runs = groups.get((c, e))
                if not runs:
                    continue
                parts = []
                for metric, _key, _label in QUANTITIES:
                    s = analysis.cell_stat(runs, metric)
                    parts.append("–" if not math.isfinite(s.mean) else
                                 analysis.METRICS[metric].format(s.mean,
                                                          s.std if s.n > 1 else None))
                lines.append(f"| {row} | {e} | {c} | {parts[0]} | {parts[1]} | {len(runs)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = analysis.cli("sharpness", __doc__, "figures", out=True)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs = analysis.load_cli("sharpness", args)
    runs = [r for r in runs if measured(r)]
    if not runs:
        print("sharpness: error: no complete runs with sharpness measurements (set "
              "eval.sharpness_every)", file=sys.stderr)
        return 1
    table = analysis.group(runs, args.rows)
    sys.stdout.write(summary_table(table))
    for row in table.rows:
        paths = plot_bars(table, row, args.out)
        if any(measured(r) > 1 for m in table.methods for r in table.runs(row, m)):
            paths += plot_rounds(table, row, args.out)
        for path in paths:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
