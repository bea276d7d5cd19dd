"""A paper's tables beside fedmpi's runs (and beside its authors' code, where it was run):
one markdown report with, per cell, the paper's value, the authors' code's value, fedmpi's
mean +- std over seeds, the differences, a verdict, and measured vs published ratios.

    python analysis/reproduce.py runs/3sfc_mnist_mlp --paper 3sfc \\
        --authors runs/authors -o docs/results/3sfc-mnist-mlp.md [--tol 0.02]
    python analysis/reproduce.py runs/3sfc_table2 runs/3sfc_table2_standard --paper 3sfc

Inputs, all read, none typed:

* fedmpi run files (``*.h5`` below the folders given). Each run is placed in a cell from
  its stored config alone: column = dataset-model, clients = ``data.num_clients``, row =
  the method (``identity`` -> fedavg; the authors' baselines ``topk_3sfc`` -> dgc,
  ``signsgd_3sfc`` -> signsgd, ``stc_3sfc`` -> stc; fedmpi's standard ``dgc``,
  ``signsgd``, ``stc`` -> dgc-std, signsgd-std, stc-std; ``3sfc`` -> 3sfc, or 3sfc-noef
  without error feedback; ``@2x`` / ``@4x`` for M = 2, 4 synthetic samples or DGC at those
  bytes; ``@K=1`` / ``@K=10`` for other local epochs than the paper's 5). Table: 2, or 3
  for budgets, 4 for the ablations. Runs whose protocol differs from the paper's are
  listed with the keys that differ, and left out of the cells.
* ``analysis/papers/<paper>_*.csv``: the paper's numbers (table, row, column, clients,
  value, ratio); a cell the file lacks is "not typed", never passing.
* ``--authors DIR``: logs of the authors' code written by
  ``analysis/authors/run_3sfc_code.py`` (its first line holds the code's flags; then one
  ``Round t, Clients Acc: [...], Server Acc: [a]`` line per round). Its ``--method ours``
  has the error-feedback subtraction commented out: it is the 3sfc-noef row.

The metric is the test accuracy after the last round (``--metric best``: the best round).
Verdict per cell: ``ok`` when |fedmpi - reference| <= tol, where the reference is the
authors' code where it was run, else the paper; ``MISS (+d)`` otherwise; ``missing`` when
fedmpi has no run; ``no reference`` when neither value exists. A figure beside the report
sets fedmpi's per-round accuracy (mean and band over seeds) beside the authors' code's.
"""

from __future__ import annotations

import argparse
import ast
import csv
import math
import os
import platform
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import _path  # noqa: F401
import numpy as np

from fedmpi import analysis

PAPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "papers")
MODEL_COLUMN = {"mlp": "mlp", "mnistnet": "mnistnet", "convnet": "convnet",
                "resnet18": "resnet", "regnetx_200mf": "regnet"}
ROW_ORDER = ["fedavg", "dgc", "signsgd", "stc", "3sfc", "3sfc-noef", "dgc-std",
             "signsgd-std", "stc-std"]
#: the paper's protocol, as the authors' code runs it: key -> value every run must have
PROTOCOL = {"run.rounds": 200, "client.lr": 0.01, "client.batch_size": 256,
            "client.lr_decay": 0.99, "client.lr_decay_first": True,
            "data.partition": "dirichlet", "data.alpha": 1.0, "data.train_frac": 0.8,
            "data.client_holdout": 0.2, "server.participation": 1.0,
            "server.aggregation": "mean", "server.lr": 1.0, "sam.name": "none"}
PAPER_K = 5
#: the claims of the 3SFC paper's Section 6.1 the report checks, per baseline family:
#: (text, other method, kind) -- "better": 3SFC's mean above; "comparable": within tol
CLAIMS = [("under the same compression rate, 3SFC yields higher test accuracy than DGC",
           "dgc", "better"),
          ("3SFC is comparable to signSGD", "signsgd", "comparable"),
          ("3SFC is comparable to STC", "stc", "comparable")]
#: the code's --method -> the report's row
AUTHOR_ROWS = {"fedavg": "fedavg", "ours": "3sfc-noef", "topk": "dgc", "sign": "signsgd",
               "stc": "stc"}


@dataclass(frozen=True)
class Cell:
    table: int
    row: str
    column: str
    clients: int


@dataclass
class Entry:
    """What the report knows about one cell."""

    paper: float = math.nan
    paper_ratio: float = math.nan
    authors: list[float] = field(default_factory=list)
    runs: list = field(default_factory=list)  #: fedmpi RunInfo
    metric: str = "final"  #: final | best


# ---------------------------------------------------------------- placing runs


def _budget_multiple(flat: dict, floats: int) -> int:
    """M of 3SFC, or how many 3SFC samples' bytes a DGC budget buys (1 when unset)."""
    if flat.get("compressor.name") == "3sfc":
        return int(flat.get("compressor.m", 1))
    budget = int(flat.get("compressor.budget_bytes", 0) or 0)
    for m in (1, 2, 4, 8):
        if budget == 4 * (m * floats + 1):
            return m
    return 1


def place(r: analysis.RunInfo) -> tuple[Cell | None, list[str]]:
    """The cell a run belongs to, and the protocol keys in which it differs."""
    f = r.flat
    differs = [f"{k} = {f.get(k)!r} (paper: {v!r})" for k, v in PROTOCOL.items()
               if f.get(k) != v]
    name = f.get("compressor.name")
    ef = bool(f.get("compressor.ef"))
    row = {"identity": "fedavg", "topk_3sfc": "dgc", "signsgd_3sfc": "signsgd",
           "stc_3sfc": "stc", "dgc": "dgc-std", "signsgd": "signsgd-std",
           "stc": "stc-std", "3sfc": "3sfc" if ef else "3sfc-noef"}.get(name)
    if row is None:
        return None, [f"compressor.name = {name!r} is none of the paper's methods"]
    column = f"{f.get('data.dataset')}-{MODEL_COLUMN.get(f.get('model.name'), '?')}"
    from fedmpi import config, data

    info = data.info(config.build(config.DataConfig, {
        k.split(".", 1)[1]: v for k, v in f.items() if k.startswith("data.")}, "data"))
    m = _budget_multiple(f, int(np.prod(info.input_shape)) + info.num_classes)
    k = int(f.get("client.local_epochs", 0) or 0)
    table = 2
    if m != 1:
        row, table = f"{row}@{m}x", 3
    if k != PAPER_K:
        row, table = f"{row}@K={k}", 4
    if row == "3sfc-noef":
        table = 4
    return Cell(table, row, column, int(f.get("data.num_clients", 0))), differs


# ---------------------------------------------------------------- sources


def read_paper(paper: str) -> dict[Cell, tuple[float, float]]:
    """(value, ratio) per cell from ``analysis/papers/<paper>_*.csv``."""
    out = {}
    files = [f for f in sorted(os.listdir(PAPERS)) if f.startswith(f"{paper}_")
             and f.endswith(".csv")]
    if not files:
        raise SystemExit(f"reproduce: no analysis/papers/{paper}_*.csv")
    for fname in files:
        with open(os.path.join(PAPERS, fname)) as fh:
            rows = csv.DictReader(line for line in fh if not line.startswith("#"))
            for rec in rows:
                cell = Cell(int(rec["table"]), rec["row"], rec["column"], int(rec["clients"]))
                ratio = float(rec["ratio"]) if rec.get("ratio") else math.nan
                out[cell] = (float(rec["value"]), ratio)
    return out


ROUND_LINE = re.compile(r"^Round (\d+), Clients Acc: (\[.*\]), Server Acc: \[([^\]]+)\]")


@dataclass
class AuthorsRun:
    path: str
    flags: dict[str, str]
    server: np.ndarray  #: test accuracy after each round
    clients: np.ndarray  #: the code's "Clients Acc" mean after each round

    @property
    def cell(self) -> Cell | None:
        f = self.flags
        row = AUTHOR_ROWS.get(f.get("method", ""))
        if row is None:
            return None
        model = {"resnet": "resnet", "regnet": "regnet"}.get(f.get("model"), f.get("model"))
        return Cell(4 if row == "3sfc-noef" else 2, row, f"{f.get('dataset')}-{model}",
                    int(f.get("n_client", 0)))

    @property
    def complete(self) -> bool:
        return len(self.server) >= int(self.flags.get("n_epoch", 0))


def read_authors(folder: str | None) -> list[AuthorsRun]:
    """Every log of the authors' code below ``folder`` (see run_3sfc_code.py)."""
    out = []
    if not folder:
        return out
    for root, _dirs, files in os.walk(folder):
        for fname in sorted(files):
            if not fname.endswith(".log"):
                continue
            path = os.path.join(root, fname)
            with open(path, errors="replace") as fh:
                head = fh.readline()
                if not head.startswith("# authors' code"):
                    continue
                words = head.split("flags:", 1)[1].split()
                flags = {w[2:]: v for w, v in zip(words, words[1:], strict=False)
                         if w.startswith("--")}
                server, clients = [], []
                for line in fh:
                    m = ROUND_LINE.match(line)
                    if m:
                        clients.append(float(np.mean(ast.literal_eval(m.group(2)))))
                        server.append(float(m.group(3)))
            out.append(AuthorsRun(path, flags, np.asarray(server), np.asarray(clients)))
    return out


# ---------------------------------------------------------------- the report


def metric_of(run, metric: str) -> float:
    acc = np.asarray(run.rounds["test_acc"], dtype=float)
    acc = acc[np.isfinite(acc)]
    if not acc.size:
        return math.nan
    return float(acc.max() if metric == "best" else acc[-1])


def fmt(v: float, digits: int = 4) -> str:
    return "—" if not math.isfinite(v) else f"{v:.{digits}f}"


def signed(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:+.4f}"


def collect(args) -> tuple[dict[Cell, Entry], list[str], list, list[AuthorsRun]]:
    runs = analysis.load(args.runs, warn=lambda msg: print(msg, file=sys.stderr))
    entries: dict[Cell, Entry] = {}
    notes = []
    for cell, (value, ratio) in read_paper(args.paper).items():
        entries.setdefault(cell, Entry(metric=args.metric)).paper = value
        entries[cell].paper_ratio = ratio
    placed = []
    for r in runs:
        cell, differs = place(r)
        if cell is None or differs:
            notes.append(f"`{r.path}`: left out: {'; '.join(differs)}")
            continue
        entries.setdefault(cell, Entry(metric=args.metric)).runs.append(r)
        placed.append(r)
    authors = [a for a in read_authors(args.authors) if a.cell is not None]
    for a in authors:
        if not a.complete:
            notes.append(f"`{a.path}`: the authors' code ran {len(a.server)} of "
                         f"{a.flags.get('n_epoch')} rounds; left out of the cells")
            continue
        value = float(a.server.max() if args.metric == "best" else a.server[-1])
        entries.setdefault(a.cell, Entry(metric=args.metric)).authors.append(value)
    return entries, notes, placed, authors


def verdict(e: Entry, tol: float) -> tuple[str, float, float]:
    """(verdict, fedmpi - authors, fedmpi - paper)."""
    s = analysis.stat([metric_of(r.run, e.metric) for r in e.runs]) if e.runs else None
    mean = s.mean if s else math.nan
    d_auth = mean - float(np.mean(e.authors)) if e.authors else math.nan
    d_paper = mean - e.paper
    if not e.runs:
        return "missing", d_auth, d_paper
    ref = d_auth if e.authors else d_paper
    if not math.isfinite(ref):
        return "no reference", d_auth, d_paper
    return ("ok" if abs(ref) <= tol else f"MISS ({ref:+.4f})"), d_auth, d_paper


def report(args, collected) -> str:
    entries, notes, placed, authors = collected
    lines = [f"# Reproduction: {args.paper} — fedmpi beside the paper and its authors' code",
             "", "Generated by", "", "    " + " ".join(
                 ["python analysis/reproduce.py", *args.runs, "--paper", args.paper]
                 + (["--authors", args.authors] if args.authors else [])
                 + (["-o", args.out] if args.out else [])
                 + ([f"--tol {args.tol}"] if args.tol != 0.02 else [])
                 + (["--metric best"] if args.metric == "best" else [])
                 + (["--notes", args.notes] if args.notes else [])), ""]
    when = "at its best round" if args.metric == "best" else "after the last round"
    lines += [f"Metric: test accuracy {when} (fraction). Tolerance: ±{args.tol}. Verdict: "
              "against the authors' code where it was run, else against the paper.", ""]
    wall = [analysis.last_finite(r.run.rounds["wall_time"]) for r in placed]
    commits = sorted({str(r.run.attrs.get("git_commit", "?"))[:10] for r in placed})
    lines += ["Runs: " + (f"{len(placed)} fedmpi run files, {sum(wall) / 60:.1f} min of "
                          f"run wall time in all ({np.mean(wall) / 60:.1f} min per run), "
                          f"fedmpi commit(s) {', '.join(commits)}"
                          if placed else "no fedmpi run files"),
              f"Machine (where the report was made): {platform.node()}, {platform.machine()}, "
              f"{os.cpu_count()} cores, Python {platform.python_version()}.", ""]
    by_table: dict[int, list[Cell]] = {}
    for cell in entries:
        by_table.setdefault(cell.table, []).append(cell)

    def order(c: Cell):
        base = c.row.split("@")[0]
        return (c.column, c.clients, ROW_ORDER.index(base) if base in ROW_ORDER else 99,
                c.row)

    for table in sorted(by_table):
        lines += [f"## Table {table}", "",
                  "| column | clients | row | paper | authors' code (n) | fedmpi mean ± std (n) |"
                  " fedmpi − authors | fedmpi − paper | verdict | ratio: fedmpi / paper |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for cell in sorted(by_table[table], key=order):
            e = entries[cell]
            s = analysis.stat([metric_of(r.run, args.metric) for r in e.runs])
            v, d_auth, d_paper = verdict(e, args.tol)
            ratios = [analysis.compression_ratio(r.run) for r in e.runs]
            ratio = f"{np.mean(ratios):.1f}x" if ratios else "—"
            paper_ratio = (f"{e.paper_ratio:g}x" if math.isfinite(e.paper_ratio) else "—")
            auth = (f"{np.mean(e.authors):.4f} ({len(e.authors)})" if e.authors
                    else ("see 3sfc-noef" if cell.row == "3sfc" else "not run"))
            paper = fmt(e.paper) if math.isfinite(e.paper) else "not typed"
            mine = f"{s.mean:.4f} ± {s.std:.4f} ({s.n})" if s.n else "missing"
            lines.append(f"| {cell.column} | {cell.clients} | {cell.row} | {paper} | {auth} |"
                         f" {mine} | {signed(d_auth)} | {signed(d_paper)} | {v} |"
                         f" {ratio} / {paper_ratio} |")
        lines.append("")
    lines += claims(entries, args.tol)
    lines += trajectories(entries, authors)
    if notes:
        lines += ["## Left out", ""] + [f"- {n}" for n in notes] + [""]
    if args.notes:
        with open(args.notes) as fh:
            lines += [fh.read().rstrip(), ""]
    return "\n".join(lines)


def claims(entries: dict[Cell, Entry], tol: float) -> list[str]:
    """Section 6.1's claims, per column and client count, under each baseline family."""
    out = ["## The paper's claims (Section 6.1), per baseline family", "",
           "`paper` = the baselines as the authors' code runs them; `standard` = fedmpi's "
           "standard DGC, EF-signSGD and STC at the same bytes. Per seed: fedmpi runs of "
           "the same seed share the partition and initialisation, so 3SFC and the "
           "baseline are compared seed by seed. With two seeds or more: *holds* = the mean "
           "difference and every seed agree; *does not hold* = the mean and every seed "
           "disagree; otherwise *inconclusive at this n*; one seed is always inconclusive. "
           "Comparable = |mean difference| <= tol.", "",
           "| column | clients | claim | family | 3SFC − baseline, mean (per seed) | n | result |",
           "|---|---|---|---|---|---|---|"]
    groups = {(c.column, c.clients) for c in entries if c.table == 2}
    for column, clients in sorted(groups):
        ours = entries.get(Cell(2, "3sfc", column, clients))
        if not ours or not ours.runs:
            continue
        mine = {r.seed: metric_of(r.run, ours.metric) for r in ours.runs}
        for text, other, kind in CLAIMS:
            for family, row in (("paper", other), ("standard", f"{other}-std")):
                e = entries.get(Cell(2, row, column, clients))
                if not e or not e.runs:
                    out.append(f"| {column} | {clients} | {text} | {family} | — | 0 | "
                               "no runs |")
                    continue
                theirs = {r.seed: metric_of(r.run, e.metric) for r in e.runs}
                seeds = sorted(set(mine) & set(theirs))
                diffs = np.asarray([mine[s] - theirs[s] for s in seeds])
                if not diffs.size:
                    continue
                mean = float(diffs.mean())
                per = ", ".join(f"{d:+.4f}" for d in diffs)
                if len(seeds) < 2:  # one seed cannot tell a difference from seed noise
                    result = "inconclusive at n = 1"
                elif kind == "better":
                    if mean > 0 and (diffs > 0).all():
                        result = "holds"
                    elif mean < 0 and (diffs < 0).all():
                        result = "does not hold"
                    else:
                        result = "inconclusive at this n"
                else:
                    close = np.abs(diffs) <= tol
                    result = ("holds" if abs(mean) <= tol and close.all() else
                              "does not hold" if abs(mean) > tol and not close.any()
                              else "inconclusive at this n")
                out.append(f"| {column} | {clients} | {text} | {family} | {mean:+.4f} "
                           f"({per}) | {len(seeds)} | {result} |")
    return out + [""]


CHECK_ROUNDS = (10, 20, 40, 60, 100, 150, 200)


def trajectories(entries: dict[Cell, Entry], authors: list[AuthorsRun]) -> list[str]:
    """Test accuracy at a few rounds: the authors' code beside fedmpi, same cell."""
    out = []
    for a in authors:
        e = entries.get(a.cell)
        if e is None or not e.runs:
            continue
        if not out:
            out = ["## Trajectories: the authors' code beside fedmpi", "",
                   "Test accuracy after round t (fedmpi: mean over its seeds; the code's "
                   "seeds and partitions are its own). Clients = the mean accuracy on the "
                   "clients' own held-out 20% (the code's \"Clients Acc\", which scores "
                   "the model the round started from; fedmpi scores the round's result).",
                   "", "| cell | source | " + " | ".join(f"t={t}" for t in CHECK_ROUNDS)
                   + " | clients, last round |", "|---|---|" + "---|" * (len(CHECK_ROUNDS) + 1)]
        s = analysis.series(e.runs, "test_acc")
        cl = analysis.series(e.runs, "client_acc_mean")
        seed = a.flags.get("seed", "?")
        done = f" ({len(a.server)} rounds)" if not a.complete else ""
        out.append(f"| {a.cell.row} {a.cell.column} {a.cell.clients} | authors' code, seed "
                   f"{seed}{done} | " + " | ".join(fmt(a.server[t - 1]) if t <= len(a.server)
                                                   else "—" for t in CHECK_ROUNDS)
                   + f" | {fmt(a.clients[-1]) if len(a.clients) else '—'} |")
        out.append(f"| | fedmpi, {s.n} seed(s) | " + " | ".join(
            fmt(s.mean[t - 1]) if t <= len(s.mean) else "—" for t in CHECK_ROUNDS)
            + f" | {fmt(cl.mean[-1])} |")
    return out + [""] if out else []


def figure(entries: dict[Cell, Entry], authors: list[AuthorsRun], out_base: str) -> list[str]:
    """Per-round test accuracy: fedmpi (mean, band over seeds) beside the authors' code,
    one panel per cell the code was run on."""
    cells = sorted({a.cell for a in authors if a.cell in entries and entries[a.cell].runs},
                   key=lambda c: (c.column, c.clients, c.row))
    if not cells:
        return []
    plt = analysis.pyplot()
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.2), squeeze=False)
    col = analysis.colors(["fedmpi", "authors' code"])
    for ax, cell in zip(axes[0], cells, strict=True):
        s = analysis.series(entries[cell].runs, "test_acc")
        s.mean, s.std = np.clip(s.mean, 0, 1), s.std
        analysis.plot_band(ax, s.rounds, s, f"fedmpi ({s.n} seeds)", col["fedmpi"])
        for a in authors:
            if a.cell == cell:
                ax.plot(np.arange(1, len(a.server) + 1), a.server, color=col["authors' code"],
                        label=f"authors' code (seed {a.flags.get('seed', '?')})",
                        linewidth=1.0)
        ax.set_title(f"{cell.row}, {cell.column}, {cell.clients} clients")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        lo = min(np.nanmin(s.mean[len(s.mean) // 10:]), *(
            np.min(a.server[len(a.server) // 10:]) for a in authors if a.cell == cell))
        ax.set_ylim(max(0.0, lo - 0.02), min(1.0, float(np.nanmax(s.mean)) + 0.02))
        ax.legend(loc="lower right")
        analysis.integer_ticks(ax)
    return analysis.save(fig, out_base)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python analysis/reproduce.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="fedmpi run files (.h5) or folders of them")
    p.add_argument("--paper", required=True, help="which paper: analysis/papers/<paper>_*.csv")
    p.add_argument("--authors", default=None, help="folder of the authors' code's logs")
    p.add_argument("-o", "--out", default=None, help="markdown file (default: stdout); "
                   "the figure goes beside it as <name>-curves.png")
    p.add_argument("--tol", type=float, default=0.02, help="absolute tolerance (0.02)")
    p.add_argument("--metric", choices=("final", "best"), default="final")
    p.add_argument("--notes", default=None, help="a markdown file of prose (what was "
                   "checked and why), appended as is; numbers belong in the tables above")
    args = p.parse_args(argv)
    try:
        collected = collect(args)
    except FileNotFoundError as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        return 2
    text = report(args, collected)
    if args.out:
        base = os.path.splitext(args.out)[0] + "-curves"
        entries, _, _, authors = collected
        made = figure(entries, authors, base)
        if made:
            text += (f"\n![fedmpi beside the authors' code]({os.path.basename(made[0])})\n")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text)
        print(f"wrote {args.out}" + (f" and {', '.join(made)}" if made else ""))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
