"""Learning curves: test accuracy and train loss against the round and against the
cumulative uplink traffic (log axis), one line per method (mean over seeds, band ±1 std),
one figure per setting, as PNG and PDF.

    python analysis/curves.py runs/3sfc_table2 -o figures/curves

Writes ``<out>/curves_<setting>.png`` and ``.pdf``; rounds without an evaluation
(``eval.every > 1``) are skipped in the accuracy panels.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import _path  # noqa: F401

from fedmpi import analysis as A

PANELS = (  # (row, column): (round metric, scale, y label, x axis)
    ((0, 0), "test_acc", 100.0, "Test accuracy (%)", "round"),
    ((0, 1), "test_acc", 100.0, "Test accuracy (%)", "bytes"),
    ((1, 0), "train_loss", 1.0, "Train loss (clients' mean)", "round"),
    ((1, 1), "train_loss", 1.0, "Train loss (clients' mean)", "bytes"),
)


def plot_setting(table: A.Table, row: str, out_dir: str) -> list[str]:
    plt = A.pyplot()
    col = A.colors(table.methods)
    fig, axes = plt.subplots(2, 2, figsize=(7.0, 5.2), sharey="row")
    for (i, j), key, scale, ylabel, xaxis in PANELS:
        ax = axes[i][j]
        for m in table.methods:
            runs = table.runs(row, m)
            if not runs:
                continue
            s = A.series(runs, key, scale)
            A.plot_band(ax, s.rounds if xaxis == "round" else s.x_bytes / 1e6, s, m, col[m])
        if xaxis == "bytes":
            ax.set_xscale("log")
            ax.set_xlabel("Cumulative uplink (MB, log scale)")
        else:
            ax.set_xlabel("Communication round")
            A.integer_ticks(ax)
        if j == 0:
            ax.set_ylabel(ylabel)
    fig.suptitle(f"{row} ({A.seeds_note(table, row)})", fontsize=10)
    A.figure_legend(fig, axes)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return A.save(fig, os.path.join(out_dir, f"curves_{A.slug(row)}"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = A.cli("curves", __doc__, "figures", out=True)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs = A.load_cli("curves", args)
    if not runs:
        print("curves: error: no complete runs found", file=sys.stderr)
        return 1
    table = A.group(runs, args.rows)
    for row in table.rows:
        for path in plot_setting(table, row, args.out):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
