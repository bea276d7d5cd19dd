"""Compression efficiency per round: the cosine between each client's decoded update and
its true update (3SFC's "compression efficiency"), averaged over the round's clients, one
line per method (mean over seeds, band ±1 std), one figure per setting (PNG and PDF), and
a table of each method's mean over all rounds.

    python analysis/efficiency.py runs/3sfc_ablation -o figures/efficiency

Uncompressed methods (FedAvg: cosine 1 by construction) are left out of the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import _path  # noqa: F401

from fedmpi import analysis


def compressed(table: analysis.Table) -> list[str]:
    return [m for m in table.methods
            if any(r.flat.get("compressor.name") != "identity"
                   for row in table.rows for r in table.runs(row, m))]


def plot_setting(table: analysis.Table, row: str, out_dir: str) -> list[str]:
    plt = analysis.pyplot()
    methods = compressed(table)
    col = analysis.colors(table.methods)
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for m in methods:
        runs = table.runs(row, m)
        if runs:
            s = analysis.series(runs, "efficiency_mean")
            analysis.plot_band(ax, s.rounds, s, m, col[m], (-1.0, 1.0))
    ax.set_xlabel("Communication round")
    analysis.integer_ticks(ax)
    ax.set_ylabel("Compression efficiency (cosine)")
    ax.set_title(f"{row} ({analysis.seeds_note(table, row)})")
    ax.legend(frameon=False, loc="best")
    fig.tight_layout()
    return analysis.save(fig, os.path.join(out_dir, f"efficiency_{analysis.slug(row)}"))


def summary_table(table: analysis.Table) -> str:
    methods = compressed(table)
    lines = ["| setting | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for row in table.rows:
        cells = []
        for m in methods:
            runs = table.runs(row, m)
            s = analysis.cell_stat(runs, "efficiency") if runs else None
            cells.append("–" if s is None or s.n == 0 else f"{s.mean:.4f}"
                         + (f" ± {s.std:.4f}" if s.n > 1 else ""))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nmean cosine over all rounds: mean ± std over seeds\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = analysis.cli("efficiency", __doc__, "figures", out=True)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs = analysis.load_cli("efficiency", args)
    table = analysis.group(runs, args.rows) if runs else None
    if table is None or not compressed(table):
        print("efficiency: error: no complete runs of a compressed method found",
              file=sys.stderr)
        return 1
    sys.stdout.write(summary_table(table))
    for row in table.rows:
        for path in plot_setting(table, row, args.out):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
