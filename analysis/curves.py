"""Learning curves: test accuracy and train loss against the round and against the
cumulative uplink traffic (log axis), and test accuracy against the cumulative uplink,
downlink (what the participants downloaded) and total traffic, which separates the
double-way methods (STC up/down, E-3SFC); one line per method (mean over seeds, band ±1
std, accuracy bands clipped to [0, 100] %), one colour per method in every figure, one
figure of each kind per setting, as PNG and PDF.

    python analysis/curves.py runs/3sfc_table2 -o figures/curves

Writes ``<out>/curves_<setting>.png|pdf`` and ``<out>/traffic_<setting>.png|pdf``; rounds
without an evaluation (``eval.every > 1``) are skipped in the accuracy panels.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import _path  # noqa: F401

from fedmpi import analysis

PANELS = (  # (row, column): (round metric, scale, y label, x axis)
    ((0, 0), "test_acc", 100.0, "Test accuracy (%)", "round"),
    ((0, 1), "test_acc", 100.0, "Test accuracy (%)", "bytes"),
    ((1, 0), "train_loss", 1.0, "Train loss (clients' mean)", "round"),
    ((1, 1), "train_loss", 1.0, "Train loss (clients' mean)", "bytes"),
)
#: where a band is clipped: accuracy in [0, 100] %, a loss >= 0
LIMITS = {"test_acc": (0.0, 100.0), "train_loss": (0.0, float("inf"))}
TRAFFIC_LABELS = {"uplink": "Cumulative uplink",
                  "downlink": "Cumulative downlink\n(what participants download)",
                  "total": "Cumulative uplink + downlink"}


def plot_setting(table: analysis.Table, row: str, out_dir: str) -> list[str]:
    plt = analysis.pyplot()
    col = analysis.colors(table.methods)
    fig, axes = plt.subplots(2, 2, figsize=(7.0, 5.2), sharey="row")
    for (i, j), key, scale, ylabel, xaxis in PANELS:
        ax = axes[i][j]
        for m in table.methods:
            runs = table.runs(row, m)
            if not runs:
                continue
            s = analysis.series(runs, key, scale)
            analysis.plot_band(ax, s.rounds if xaxis == "round" else s.x_bytes, s, m, col[m],
                        LIMITS.get(key))
        if xaxis == "bytes":
            ax.set_xscale("log")
            analysis.bytes_axis(ax)
            ax.set_xlabel("Cumulative uplink (log scale)")
        else:
            ax.set_xlabel("Communication round")
            analysis.integer_ticks(ax)
        if j == 0:
            ax.set_ylabel(ylabel)
    fig.suptitle(f"{row} ({analysis.seeds_note(table, row)})", fontsize=10)
    analysis.figure_legend(fig, axes)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return analysis.save(fig, os.path.join(out_dir, f"curves_{analysis.slug(row)}"))


def plot_traffic(table: analysis.Table, row: str, out_dir: str) -> list[str]:
    """Test accuracy against the cumulative uplink, downlink and total bytes."""
    plt = analysis.pyplot()
    col = analysis.colors(table.methods)
    fig, axes = plt.subplots(1, 3, figsize=(9.0, 3.2), sharey=True)
    for ax, (axis, label) in zip(axes, TRAFFIC_LABELS.items(), strict=True):
        for m in table.methods:
            runs = table.runs(row, m)
            if runs:
                s = analysis.series(runs, "test_acc", 100.0)
                analysis.plot_band(ax, s.traffic[axis], s, m, col[m], LIMITS["test_acc"])
        ax.set_xscale("log")
        analysis.bytes_axis(ax)
        ax.set_xlabel(f"{label} (log scale)")
    axes[0].set_ylabel("Test accuracy (%)")
    fig.suptitle(f"{row}: accuracy against the bytes moved ({analysis.seeds_note(table, row)})",
                 fontsize=10)
    analysis.figure_legend(fig, axes)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return analysis.save(fig, os.path.join(out_dir, f"traffic_{analysis.slug(row)}"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = analysis.cli("curves", __doc__, "figures", out=True)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs = analysis.load_cli("curves", args)
    if not runs:
        print("curves: error: no complete runs found", file=sys.stderr)
        return 1
    table = analysis.group(runs, args.rows)
    for row in table.rows:
        for path in plot_setting(table, row, args.out) + plot_traffic(table, row, args.out):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
