"""A human summary of one or more runs: what ran (config essentials, sizes, MPI layout),
how far it got, the final metrics, the bytes on the wire and where the time went.

    python analysis/summary.py runs/3sfc_table2/method-3sfc_dataset-mnist_..._seed-0.h5
    python analysis/summary.py RUN.h5 --config     # also print the full resolved config
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import _path  # noqa: F401
import numpy as np

from fedmpi import analysis
from fedmpi.progress import fmt_bytes

PHASES = ("train", "encode", "comm", "decode", "eval", "sharpness")


def seconds(t: float) -> str:
    return f"{t:.3f} s" if t < 10 else f"{t:.1f} s"


def summarize(r: analysis.RunInfo, show_config: bool = False) -> str:
    run, f, rounds = r.run, r.flat, r.run.rounds
    n = len(run)
    total = int(f.get("run.rounds", n))
    acc = np.asarray(rounds["test_acc"], dtype=float)
    ok = np.isfinite(acc)
    sam = f.get("sam.name", "none")
    lines = [
        f"run        {r.name}  ({r.path})",
        f"status     {'complete' if run.complete else 'INCOMPLETE'}: {n} of {total} rounds"
        + (f" (stopped: {run.attrs['stopped']})" if run.attrs.get("stopped") else ""),
        f"fedmpi     {run.attrs.get('fedmpi_version', '?')} (git "
        f"{str(run.attrs.get('git_commit', '?'))[:12]}), {run.attrs.get('mpi_size', '?')} "
        f"MPI rank(s), started {run.attrs.get('start_time', '?')}",
        f"setting    {analysis.setting_base(r)}, {f.get('data.num_clients')} clients "
        f"({f.get('data.partition')}"
        + (f", alpha {f.get('data.alpha')}" if "dirichlet" in str(f.get("data.partition"))
           else "") + f"), participation {f.get('server.participation')}, seed {r.seed}",
        f"method     compressor {f.get('compressor.name')}"
        f"{' + EF' if f.get('compressor.ef') else ''}, downlink "
        f"{f.get('compressor.downlink')}, SAM {sam}"
        + (f" (rho {f.get('sam.rho')})" if sam != "none" else "")
        + f", aggregation {f.get('server.aggregation')}",
        f"model      d = {int(run.attrs.get('num_params', 0)):,} parameters, dense update "
        f"{fmt_bytes(float(run.attrs.get('dense_bytes', 0)))}",
    ]
    if ok.any():
        best = int(np.nanargmax(np.where(ok, acc, -np.inf)))
        last = int(rounds["round"][ok][-1]) + 1
        lines.append(f"accuracy   final {100 * acc[ok][-1]:.2f}% (round {last}), best "
                     f"{100 * acc[best]:.2f}% (round {int(rounds['round'][best]) + 1})")
    lines.append(f"loss       test {analysis.last_finite(rounds['test_loss']):.4f}, "
                 f"train (clients' mean, last round) "
                 f"{analysis.last_finite(rounds['train_loss']):.4f}")
    eff = np.asarray(rounds["efficiency_mean"], dtype=float)
    if np.isfinite(eff).any():
        lines.append(f"efficiency cosine(decoded, true update): mean {np.nanmean(eff):.4f}, "
                     f"last {analysis.last_finite(eff):.4f}")
    for key, label in (("sharpness_lmax", "lambda_max"), ("sharpness_trace", "trace")):
        if np.isfinite(np.asarray(rounds[key], dtype=float)).any():
            lines.append(f"sharpness  {label} {analysis.last_finite(rounds[key]):.4f} (last "
                         "measurement)")
    # what the participants sent and downloaded: properties of the federated job (the
    # transport's counters, which change with the rank count, are not shown)
    up = float(np.sum(rounds["uplink_payload_bytes"]))
    down = float(np.sum(rounds["downlink_payload_bytes"]))
    lines.append(f"bytes      uplink {fmt_bytes(up)} ({fmt_bytes(up / max(1, n))}/round, "
                 f"ratio {analysis.compression_ratio(run):.1f}x), downlink {fmt_bytes(down)} "
                 f"({fmt_bytes(down / max(1, n))}/round, what the participants download)")
    wall = analysis.last_finite(rounds["wall_time"])
    times = {p: float(np.nansum(rounds[f"time_{p}"])) for p in PHASES
             if f"time_{p}" in rounds}
    spent = sum(times.values())
    split = ", ".join(f"{p} {seconds(t)} ({100 * t / spent:.0f}%)" for p, t in times.items()
                      if t > 0) if spent > 0 else "n/a"
    lines.append(f"time       {seconds(wall)} wall, {wall / max(1, n):.3f} s/round; {split}")
    rss = run.attrs.get("peak_rss_mb")
    if rss is not None:
        rss = np.atleast_1d(np.asarray(rss, dtype=float))
        lines.append(f"memory     peak RSS per rank: max {rss.max():.0f} MB (rank 0 "
                     f"{rss[0]:.0f} MB)")
    if show_config:
        lines += ["", "config:", run.attrs["config"].rstrip()]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python analysis/summary.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run files (.h5) or folders of them")
    p.add_argument("--config", action="store_true", help="also print the resolved config")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = analysis.load(args.runs, include_incomplete=True)
    except FileNotFoundError as exc:
        print(f"summary: error: {exc}", file=sys.stderr)
        return 2
    if not runs:
        print("summary: error: no readable runs", file=sys.stderr)
        return 1
    sys.stdout.write("\n".join(summarize(r, args.config) for r in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
