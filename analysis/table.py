"""The papers' main table from run files: rows dataset + model (+ whatever else varies),
columns methods, cells "accuracy (compression ratio x)" as mean ± std over seeds, the
best mean of each row marked (bold in md and LaTeX, ``best = 1`` in CSV).

    python analysis/table.py runs/3sfc_table2 [--metric final_acc] [--format md|latex|csv]
    python analysis/table.py runs/3sfc_budget --rows compressor.budget_bytes

Metrics: final_acc, best_acc (test accuracy in %), final_loss, final_train_loss,
efficiency, ratio, uplink, downlink, traffic (bytes, in adaptive units), lmax, trace,
wall_time (see fedmpi.analysis.METRICS).
Grouping rules: fedmpi.analysis. Incomplete runs are skipped unless --include-incomplete.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Sequence

import _path  # noqa: F401

from fedmpi import analysis

LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def cell_values(table: analysis.Table, metric: str, ratio: bool):
    """(row, method) -> (Stat, ratio Stat or None, best?) for every filled cell."""
    out = {}
    for row in table.rows:
        best = analysis.best_methods(table, row, metric)
        for m in table.methods:
            runs = table.runs(row, m)
            if runs:
                out[(row, m)] = (analysis.cell_stat(runs, metric),
                                 analysis.cell_stat(runs, "ratio") if ratio else None, m in best)
    return out


def _number(metric: str, s: analysis.Stat, pm: str) -> str:
    return analysis.METRICS[metric].format(s.mean, s.std if s.n > 1 else None, pm)


def render(table: analysis.Table, metric: str, fmt: str, ratio: bool = True) -> str:
    cells = cell_values(table, metric, ratio)
    seeds = sorted({s.n for s, _, _ in cells.values()})
    note = (f"{analysis.METRICS[metric].label}: mean ± std over "
            f"{'/'.join(map(str, seeds))} seed(s)"
            + ("; (N×) = uplink compression ratio" if ratio else "")
            + "; best per row marked")
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["setting", "method", "metric", "mean", "std", "n", "ratio", "best"])
        for (row, m), (s, r, best) in cells.items():
            w.writerow([row, m, metric, repr(s.mean), repr(s.std), s.n,
                        repr(r.mean) if r else "", int(best)])
        return buf.getvalue()

    def text(row: str, m: str) -> str:
        if (row, m) not in cells:
            return "–" if fmt == "md" else "--"
        s, r, best = cells[(row, m)]
        if fmt == "md":
            t = _number(metric, s, "±") + (f" ({r.mean:.1f}×)" if r else "")
            return f"**{t}**" if best else t
        num, unit = _number(metric, s, r"\pm"), ""
        if analysis.METRICS[metric].is_bytes:  # the unit outside math mode
            num, unit = num.rsplit(" ", 1)
            unit = f" {unit}"
        t = (rf"$\mathbf{{{num}}}$" if best else f"${num}$") + unit
        return t + (rf" ({r.mean:.1f}$\times$)" if r else "")

    if fmt == "md":
        lines = ["| setting | " + " | ".join(table.methods) + " |",
                 "|---|" + "---|" * len(table.methods)]
        lines += ["| " + row + " | " + " | ".join(text(row, m) for m in table.methods) + " |"
                  for row in table.rows]
        return "\n".join(lines) + f"\n\n{note}\n"
    lines = [r"% " + note, r"\begin{tabular}{l" + "c" * len(table.methods) + "}", r"\toprule",
             "Setting & " + " & ".join(latex_escape(m) for m in table.methods) + r" \\",
             r"\midrule"]
    lines += [latex_escape(row) + " & " + " & ".join(text(row, m) for m in table.methods)
              + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = analysis.cli("table", __doc__, "rows", out=False)
    p.add_argument("--metric", default="final_acc", choices=sorted(analysis.METRICS))
    p.add_argument("--format", default="md", choices=("md", "latex", "csv"))
    p.add_argument("--no-ratio", action="store_true", help="leave out the compression ratio")
    p.add_argument("-o", "--output", help="write here instead of standard output")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs = analysis.load_cli("table", args)
    if not runs:
        print("table: error: no complete runs found", file=sys.stderr)
        return 1
    text = render(analysis.group(runs, args.rows), args.metric, args.format, not args.no_ratio)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
