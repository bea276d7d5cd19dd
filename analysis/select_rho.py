"""Pick each SAM method's rho on a validation split, and record the pick in sweep files.

Reads the tuning runs (e.g. ``runs/fedsynsam_mnist_rho`` of jobs/fedsynsam_mnist_rho.toml),
which must evaluate on a validation split carved from the training data
(``data.train_frac`` < 1: ``test_acc`` is then the accuracy on the held-out share of the
training split, and the official test set is never read); a run that evaluated on the
test set is refused. Per method (``sam.name``, and ``sam.lesam_source`` for FedLESAM), the
rho whose final validation accuracy, averaged over every other setting the runs cover
(compressors, partitions, seeds), is highest wins; a tie goes to the smaller rho. A rho
that lacks runs some other rho of the method has is reported and not eligible.

    python analysis/select_rho.py runs/fedsynsam_mnist_rho                 # print the table
    python analysis/select_rho.py runs/fedsynsam_mnist_rho --update jobs/fedsynsam_mnist.toml \\
        jobs/fedsynsam_mnist_ablation.toml                              # and record the pick

``--update`` replaces the block between ``# rho-selection:start`` and
``# rho-selection:end`` of each file with one ``[[sweep.when]]`` rule per method (matched on
its config keys, so a file without some method's runs is unaffected by its rule) and, as
comments, how the values were found: the tuning folder, the criterion and the table.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import _path  # noqa: F401

from fedmpi import analysis

START, END = "# rho-selection:start", "# rho-selection:end"


@dataclass(frozen=True)
class Method:
    """A SAM method as the sweep files name it, and the config keys that identify it."""

    case: str
    match: dict[str, str]

    def of(self, r: analysis.RunInfo) -> bool:
        return all(r.flat.get(k, DEFAULTS.get(k)) == v for k, v in self.match.items())


DEFAULTS = {"sam.lesam_source": "server"}
METHODS = (
    Method("fedsam", {"sam.name": "fedsam"}),
    Method("mofedsam", {"sam.name": "mofedsam"}),
    Method("fedlesam", {"sam.name": "fedlesam", "sam.lesam_source": "server"}),
    Method("fedlesam-client", {"sam.name": "fedlesam", "sam.lesam_source": "client"}),
    Method("fedsynsam", {"sam.name": "fedsynsam"}),
)
#: keys that tell runs of one (method, rho) apart: the settings averaged over
VARYING_IGNORED = {"sam.rho", "run.name", "run.seed", "run.out_dir"}


@dataclass
class Pick:
    method: Method
    rhos: list[float]
    mean: dict[float, float]  #: rho -> mean final validation accuracy (%)
    count: dict[float, int]
    missing: dict[float, int]  #: rho -> settings other rhos have and it lacks
    rho: float | None


def final_acc(r: analysis.RunInfo) -> float:
    return 100.0 * analysis.last_finite(r.run.rounds["test_acc"])


def setting_key(r: analysis.RunInfo) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in r.flat.items()
                        if k not in VARYING_IGNORED and not k.startswith(("eval.", "checkpoint."))))


def refuse_test_set(runs: Sequence[analysis.RunInfo]) -> None:
    bad = [r.path for r in runs if float(r.flat.get("data.train_frac", 1.0)) >= 1.0
           and r.flat.get("data.dataset") != "synthetic"]
    if bad:
        raise SystemExit("select_rho: error: these runs evaluated on the official test set "
                         "(data.train_frac = 1), rho must be picked on a validation split "
                         "(data.train_frac < 1): " + ", ".join(bad[:5]))


def select(runs: Sequence[analysis.RunInfo]) -> list[Pick]:
    picks = []
    for m in METHODS:
        mine = [r for r in runs if m.of(r)]
        if not mine:
            continue
        by_rho: dict[float, dict[tuple, list[float]]] = {}
        for r in mine:
            by_rho.setdefault(float(r.flat.get("sam.rho", 0.05)), {}).setdefault(
                setting_key(r), []).append(final_acc(r))
        every = set().union(*(set(s) for s in by_rho.values()))
        rhos = sorted(by_rho)
        mean, count, missing = {}, {}, {}
        for rho in rhos:
            values = [v for vs in by_rho[rho].values() for v in vs if math.isfinite(v)]
            count[rho] = len(values)
            missing[rho] = len(every - set(by_rho[rho]))
            mean[rho] = sum(values) / len(values) if values else float("nan")
        eligible = [r for r in rhos if not missing[r] and math.isfinite(mean[r])]
        best = max(eligible, key=lambda r: (mean[r], -r)) if eligible else None
        picks.append(Pick(m, rhos, mean, count, missing, best))
    return picks


def table(picks: Sequence[Pick]) -> list[str]:
    rhos = sorted({r for p in picks for r in p.rhos})
    lines = ["| method | " + " | ".join(f"rho = {r:g}" for r in rhos) + " | picked |",
             "|---|" + "---|" * (len(rhos) + 1)]
    for p in picks:
        cells = []
        for r in rhos:
            if r not in p.mean:
                cells.append("–")
                continue
            cell = f"{p.mean[r]:.2f} (n={p.count[r]})"
            if p.missing[r]:
                cell += f" {p.missing[r]} missing"
            cells.append(f"**{cell}**" if r == p.rho else cell)
        picked = f"{p.rho:g}" if p.rho is not None else "none"
        lines.append(f"| {p.method.case} | " + " | ".join(cells) + f" | {picked} |")
    return lines


def _toml_match(match: dict[str, str]) -> str:
    return "{ " + ", ".join(f'"{k}" = "{v}"' for k, v in match.items()) + " }"


def block(picks: Sequence[Pick], source: str, runs: int) -> str:
    when = datetime.date.today().isoformat()
    lines = [f"{START} (written by analysis/select_rho.py; do not edit by hand)",
             f"# rho per method, selected {when} by python analysis/select_rho.py {source}:",
             "# the grid value with the best final validation accuracy (%, held-out share of",
             "# the training split, data.train_frac < 1; the test set was never read), mean",
             f"# over each method's settings and seeds in {runs} complete tuning runs (ties: the",
             "# smaller rho):"]
    lines += ["#   " + row for row in table(picks)]
    for p in picks:
        if p.rho is None:
            continue
        lines += ["[[sweep.when]]", f"match = {_toml_match(p.method.match)}",
                  f'set = {{ "sam.rho" = {p.rho!r} }}']
    lines.append(END)
    return "\n".join(lines) + "\n"


def update(path: str, text: str) -> None:
    with open(path) as fh:
        old = fh.read()
    pattern = re.compile(rf"^{re.escape(START)}.*?^{re.escape(END)}[^\n]*\n", re.S | re.M)
    if not pattern.search(old):
        raise SystemExit(f"select_rho: error: {path} has no '{START}' ... '{END}' block")
    new = pattern.sub(lambda _m: text, old, count=1)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(new)
    os.replace(tmp, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python analysis/select_rho.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="tuning run files (.h5) or folders of them")
    p.add_argument("--update", nargs="*", default=[], metavar="SWEEP.toml",
                   help="sweep files whose rho-selection block gets the picks")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = analysis.load(args.runs)
    except FileNotFoundError as exc:
        print(f"select_rho: error: {exc}", file=sys.stderr)
        return 2
    refuse_test_set(runs)
    picks = select(runs)
    if not picks:
        print("select_rho: error: no complete runs of a SAM method found", file=sys.stderr)
        return 1
    print("\n".join(table(picks)))
    if any(p.rho is None for p in picks):
        print("select_rho: error: no rho has every setting for: " + ", ".join(
            p.method.case for p in picks if p.rho is None), file=sys.stderr)
        return 1
    text = block(picks, " ".join(args.runs), len(runs))
    for path in args.update:
        update(path, text)
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
