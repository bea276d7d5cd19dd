"""Sweeps: a base run config plus a grid of overrides, expanded into named runs.

``python -m fedmpi.sweep jobs/s.toml --list`` prints the runs and their state;
``--local [-n N] [--dry-run]`` runs the unfinished ones one after another through
``mpiexec`` (``fedmpi.launch.command``), showing each run's round lines prefixed with
``[i/n]`` and a line per run with the sweep's elapsed time and ETA; Ctrl-C is passed on to
the running job, which checkpoints and stops, and the sweep stops after it (rerun the
same command to continue). ``slurm/submit.py`` turns the same expansion into a SLURM job
array.

A sweep file is an ordinary run config (the ``[run]``, ``[data]``, ... sections) plus a
``[sweep]`` table::

    [sweep]
    name = "table2"                 # default: the file name without .toml
    seeds = [0, 1, 2]               # run.seed of every point (default: [run] seed)
    ranks = 11                      # default -n (--local) and total ranks (slurm)

    [sweep.cases.method]            # an axis of named override sets
    fedavg = { "compressor.name" = "identity" }
    topk = { "compressor.name" = "topk", "compressor.ef" = true }

    [[sweep.zip]]                   # an axis of lists that vary together
    "data.dataset" = ["mnist", "cifar10"]
    "model.name" = ["mlp", "convnet"]

    [sweep.grid]                    # one axis per key (cartesian product)
    "data.num_clients" = [10, 20, 40]

    [[sweep.when]]                  # derived overrides, applied after the axes
    match = { method = "topk", "data.dataset" = ["mnist", "fmnist"] }
    set = { "compressor.ratio" = 0.004 }

    [sweep.labels]                  # short names in run names (default: last key part)
    "data.num_clients" = "clients"

The points are the cartesian product of the axes, in the order the file lists them
(``cases`` axes, ``zip`` groups and ``grid`` keys), with the seeds innermost. A point's
run name is built from its axis values only, e.g.
``method-topk_dataset-mnist_model-mlp_clients-10_seed-0``: readable, the same on every
expansion of the same file, and checked to be unique. A ``when`` rule matches a case axis
by case name and a config key by its value (a list matches any of its values); its
``set`` overrides do not enter the name. Every point's config is built and validated with
:mod:`fedmpi.config` before anything runs; an error names the run and the key.

Output: ``<out_dir>/<run name>.h5`` with ``out_dir`` the base ``[run] out_dir`` if the
file sets it, else ``runs/<sweep name>``; each run's resolved config is written to
``<out_dir>/configs/<run name>.toml`` (what ``python -m fedmpi.train`` is given). Runs
whose HDF5 file is marked ``complete`` are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedmpi import config, launch
from fedmpi.config import ConfigError

SWEEP_KEYS = ("name", "seeds", "ranks", "cases", "zip", "grid", "when", "labels")
#: keys a sweep axis may not set: the sweep owns them
RESERVED = ("run.name", "run.out_dir", "run.seed", "checkpoint.path")
MAX_NAME = 200  #: longest run name (file systems allow 255 bytes)


@dataclass(frozen=True)
class Axis:
    """One dimension of the product: a label per value and the overrides it sets."""

    kind: str  #: "cases", "zip" or "grid"
    name: str  #: case-axis name, or the keys it sets joined by ","
    #: per value: (name part, case name or None, overrides)
    points: tuple[tuple[str, str | None, dict[str, Any]], ...]


@dataclass(frozen=True)
class Point:
    """One run of a sweep."""

    index: int  #: position in the expansion (the SLURM array index when all are pending)
    name: str  #: run.name, derived from the axis values
    labels: dict[str, Any]  #: axis name -> case name or value (for matching and listings)
    overrides: dict[str, Any]  #: dotted key -> value, axes then ``when`` rules, plus seed
    config: config.Config  #: the validated run config
    path: str  #: the HDF5 run file
    config_path: str  #: where the resolved run config is written


@dataclass
class Sweep:
    name: str
    source: str  #: the sweep file
    out_dir: str
    ranks: int | None  #: [sweep] ranks, if given
    points: list[Point] = field(default_factory=list)

    @property
    def config_dir(self) -> str:
        return os.path.join(self.out_dir, "configs")


# ---------------------------------------------------------------------------- parsing


def _dotted(key: Any, where: str) -> tuple[str, str]:
    if not isinstance(key, str) or key.count(".") != 1 or not all(key.split(".")):
        raise ConfigError(where, f"override keys are 'section.key' strings (got {key!r})")
    if key in RESERVED:
        raise ConfigError(where, f"{key} is set by the sweep itself (run names, "
                          "[run] out_dir, [sweep] seeds, <out_dir>/<run>.ckpt); do not "
                          "override it")
    section, name = key.split(".")
    if section not in config.SECTIONS:
        raise ConfigError(where, f"unknown section {section!r} in {key!r}; known sections: "
                          f"{', '.join(config.SECTIONS)}")
    return section, name


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(where, f"must be a non-empty list (got {value!r})")
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "-".join(_fmt(v) for v in value)
    return str(value)


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text) or "_"


def _labels(table: dict[str, Any], keys: Sequence[str]) -> dict[str, str]:
    """Short label per dotted key: ``[sweep.labels]``, else the key's last part (its section
    for ``*.name``), or the whole key where two keys would share a label."""
    for k, v in table.items():
        _dotted(k, f"sweep.labels.{k}")
        if not isinstance(v, str) or not v:
            raise ConfigError(f"sweep.labels.{k}", "must be a non-empty string")
    first = [table.get(k) or (k.split(".")[0] if k.endswith(".name") else k.split(".")[1])
             for k in keys]
    out = {k: table.get(k) or (s if first.count(s) == 1 else k)
           for k, s in zip(keys, first, strict=True)}
    given = [out[k] for k in keys if k in table]
    for k in table:
        if list(out.values()).count(out[k]) > 1 or given.count(out[k]) > 1:
            raise ConfigError(f"sweep.labels.{k}", f"label {out[k]!r} is used twice")
    return out


def _axes(sweep: dict[str, Any]) -> list[Axis]:
    """The axes in file order, with the keys each sets."""
    raw: list[tuple[str, str, Any]] = []  # (kind, where, spec)
    for key, value in sweep.items():
        if key == "cases":
            if not isinstance(value, dict) or not value:
                raise ConfigError("sweep.cases", "must be a table of axes, "
                                  "e.g. [sweep.cases.method]")
            for axis, cases in value.items():
                raw.append(("cases", f"sweep.cases.{axis}", (axis, cases)))
        elif key == "zip":
            if isinstance(value, dict):
                value = [value]
            if not isinstance(value, list) or not value:
                raise ConfigError("sweep.zip", "must be one or more tables ([[sweep.zip]])")
            for i, group in enumerate(value):
                raw.append(("zip", f"sweep.zip[{i}]", group))
        elif key == "grid":
            if not isinstance(value, dict):
                raise ConfigError("sweep.grid", "must be a table of 'section.key' = [values]")
            for k, values in value.items():
                raw.append(("grid", f"sweep.grid.{k}", {k: values}))

    owner: dict[str, str] = {}  # key -> the axis that sets it
    named: list[str] = []  # the keys whose values enter run names (grid and zip)
    for kind, where, spec in raw:
        if kind == "cases":
            axis, cases = spec
            if not isinstance(cases, dict) or not cases:
                raise ConfigError(where, "must be a table of named cases, each a table of "
                                  "'section.key' = value overrides")
            sets_keys = []
            for case, sets in cases.items():
                if not isinstance(sets, dict):
                    raise ConfigError(f"{where}.{case}", "must be a table of overrides")
                for k in sets:
                    _dotted(k, f"{where}.{case}")
                    sets_keys.append(k)
        else:
            if not isinstance(spec, dict) or not spec:
                raise ConfigError(where, "must be a table of 'section.key' = [values]")
            for k in spec:
                _dotted(k, where)
            sets_keys = list(spec)
            named += sets_keys
        for k in sets_keys:
            if owner.setdefault(k, where) != where:
                raise ConfigError(where, f"{k} is also set by {owner[k]}; one axis per key")

    for k in sweep.get("labels", {}):
        if k not in named:
            raise ConfigError(f"sweep.labels.{k}", "names a key that no grid or zip axis sets")
    labels = _labels(sweep.get("labels", {}), named)
    axes = []
    case_names = set()
    for kind, where, spec in raw:
        if kind == "cases":
            axis, cases = spec
            if axis in case_names or axis.count(".") or axis in ("seed",):
                raise ConfigError(where, f"case axis name {axis!r} must be unique, without "
                                  "dots, and not 'seed'")
            case_names.add(axis)
            points = tuple((f"{_clean(axis)}-{_clean(str(case))}", str(case), dict(sets))
                           for case, sets in cases.items())
            axes.append(Axis("cases", axis, points))
            continue
        lists = {k: _list(v, f"{where}.{k}" if kind == "zip" else where)
                 for k, v in spec.items()}
        lengths = {len(v) for v in lists.values()}
        if len(lengths) != 1:
            raise ConfigError(where, "zipped lists must have the same length (got "
                              + ", ".join(f"{k}: {len(v)}" for k, v in lists.items()) + ")")
        points = []
        for i in range(lengths.pop()):
            sets = {k: v[i] for k, v in lists.items()}
            part = "_".join(f"{_clean(labels[k])}-{_clean(_fmt(v))}" for k, v in sets.items())
            points.append((part, None, sets))
        axes.append(Axis(kind, ",".join(lists), tuple(points)))
    return axes


def _matches(rule: dict[str, Any], labels: dict[str, Any], raw: dict[str, Any],
             where: str) -> bool:
    for key, want in rule.items():
        if key in labels:
            have = labels[key]
        elif key.count(".") == 1 and key.split(".")[0] in config.SECTIONS:
            have = _lookup(raw, key)
        else:
            raise ConfigError(where, f"matches on {key!r}, which is neither a case axis nor "
                              "a 'section.key' of the config")
        wants = want if isinstance(want, list) else [want]
        if have not in wants:
            return False
    return True


def _lookup(raw: dict[str, Any], key: str) -> Any:
    section, name = key.split(".")
    table = raw.get(section, {})
    if name in table:
        return table[name]
    for f in dataclasses.fields(config.SECTIONS[section]):
        if f.name == name:
            return None if f.default is dataclasses.MISSING else f.default
    return None  # a compressor's own key the base config does not set


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    section, name = key.split(".")
    raw.setdefault(section, {})[name] = value


def expand(doc: dict[str, Any], name: str, source: str = "<sweep>") -> Sweep:
    """Expand a parsed sweep document into validated points."""
    if "sweep" not in doc:
        raise ConfigError("sweep", f"{source} has no [sweep] table; a plain run config is "
                          "run with python -m fedmpi.train")
    base = {k: v for k, v in doc.items() if k != "sweep"}
    sweep = doc["sweep"]
    if not isinstance(sweep, dict):
        raise ConfigError("sweep", "must be a table")
    for k in sweep:
        if k not in SWEEP_KEYS:
            raise ConfigError(f"sweep.{k}", f"unknown key; known keys of [sweep]: "
                              f"{', '.join(SWEEP_KEYS)}")
    for k in base:
        if k not in config.SECTIONS:
            raise ConfigError(k, f"unknown section; known sections: sweep, "
                              f"{', '.join(config.SECTIONS)}")
    name = sweep.get("name", name)
    if not isinstance(name, str) or not name or _clean(name) != name:
        raise ConfigError("sweep.name", f"must be a plain file name (got {name!r})")
    run_base = base.get("run", {})
    for k in ("name", "seed"):
        if k in run_base:
            raise ConfigError(f"run.{k}", "is set by the sweep (run names from the axes, "
                              "seeds from [sweep] seeds); remove it from the sweep file")
    if isinstance(base.get("checkpoint"), dict) and base["checkpoint"].get("path"):
        raise ConfigError("checkpoint.path", "every run of a sweep checkpoints to "
                          "<out_dir>/<run name>.ckpt; remove it from the sweep file")
    out_dir = run_base.get("out_dir", os.path.join("runs", name))
    if not isinstance(out_dir, str):
        raise ConfigError("run.out_dir", "must be a string")
    out_dir = os.path.expanduser(out_dir)  # as fedmpi.config does for the runs
    seeds = _list(sweep.get("seeds", [config.RunConfig.seed]), "sweep.seeds")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError("sweep.seeds", f"must be integers >= 0 (got {seeds})")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("sweep.seeds", f"repeats a seed (got {seeds})")
    ranks = sweep.get("ranks")
    if ranks is not None and (not isinstance(ranks, int) or isinstance(ranks, bool)
                              or ranks < 1):
        raise ConfigError("sweep.ranks", f"must be an integer >= 1 (got {ranks!r})")
    rules = sweep.get("when", [])
    if isinstance(rules, dict):
        rules = [rules]
    for i, rule in enumerate(rules):
        where = f"sweep.when[{i}]"
        if not isinstance(rule, dict) or set(rule) != {"match", "set"} or not isinstance(
                rule["match"], dict) or not isinstance(rule["set"], dict):
            raise ConfigError(where, "must be a table with 'match' and 'set' tables")
        for k in rule["set"]:
            _dotted(k, f"{where}.set")

    axes = _axes(sweep)
    drafts: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = []
    seen: set[str] = set()
    combos = itertools.product(*[a.points for a in axes]) if axes else [()]
    for combo in combos:
        for seed in seeds:
            raw = copy.deepcopy(base)
            labels: dict[str, Any] = {}
            overrides: dict[str, Any] = {}
            parts = []
            for axis, (part, case, sets) in zip(axes, combo, strict=True):
                parts.append(part)
                if case is not None:
                    labels[axis.name] = case
                for k, v in sets.items():
                    _set(raw, k, v)
                    overrides[k] = v
                    if axis.kind != "cases":
                        labels[k] = v
            parts.append(f"seed-{seed}")
            run_name = "_".join(parts)
            for i, rule in enumerate(rules):
                if _matches(rule["match"], labels, raw, f"sweep.when[{i}]"):
                    for k, v in rule["set"].items():
                        _set(raw, k, v)
                        overrides[k] = v
            overrides["run.seed"] = seed
            labels["seed"] = seed
            if len(run_name) > MAX_NAME:
                raise ConfigError("sweep.labels", f"run name {run_name!r} is longer than "
                                  f"{MAX_NAME} characters; shorten it with [sweep.labels]")
            if run_name in seen:
                raise ConfigError("sweep", f"two points get the same run name {run_name!r} "
                                  "(values that differ only in characters a file name "
                                  "cannot hold?); rename them with [sweep.labels] or cases")
            seen.add(run_name)
            raw.setdefault("run", {})
            raw["run"].update(name=run_name, seed=seed, out_dir=out_dir)
            drafts.append((run_name, raw, labels, overrides))

    result = Sweep(name=name, source=source, out_dir=out_dir, ranks=ranks)
    for run_name, raw, labels, overrides in drafts:  # every name is known: now validate
        try:
            cfg = config.from_dict(raw)
        except ConfigError as exc:
            message = str(exc)[len(exc.key) + 2:] if exc.key else str(exc)
            raise ConfigError(f"{run_name}: {exc.key}", message) from None
        result.points.append(Point(
            index=len(result.points), name=run_name, labels=labels, overrides=overrides,
            config=cfg, path=os.path.join(out_dir, f"{run_name}.h5"),
            config_path=os.path.join(out_dir, "configs", f"{run_name}.toml")))
    return result


def load(path: str) -> Sweep:
    """Parse, expand and validate the sweep file at ``path``."""
    try:
        with open(path, "rb") as fh:
            doc = config.tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "sweep file not found") from None
    except config.tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"TOML syntax error: {exc}") from None
    stem = os.path.splitext(os.path.basename(path))[0]
    return expand(doc, stem, path)


# ---------------------------------------------------------------------------- state


@dataclass(frozen=True)
class State:
    #: "complete", "partial" (a file that is not complete), "pending" (no file) or
    #: "damaged" (a file that cannot be read: truncated, corrupt; ``error`` says why)
    status: str
    rows: int  #: rounds written so far
    rounds: int  #: rounds configured
    error: str = ""


def state(point: Point) -> State:
    """What is on disk for a point (an unreadable file is "damaged", found in about a
    second: :func:`fedmpi.metrics.open_run`)."""
    from fedmpi.metrics import open_run

    rounds = point.config.run.rounds
    if not os.path.exists(point.path):
        return State("pending", 0, rounds)
    try:
        run = open_run(point.path)
    except (OSError, KeyError) as exc:
        return State("damaged", 0, rounds, str(exc))
    return State("complete" if run.complete else "partial", len(run), rounds)


def write_configs(sweep: Sweep, points: Sequence[Point] | None = None) -> None:
    """Write each point's resolved run config to its ``config_path`` (atomically)."""
    for p in sweep.points if points is None else points:
        os.makedirs(os.path.dirname(p.config_path) or ".", exist_ok=True)
        text = (f"# run {p.name} of sweep {sweep.name} ({sweep.source}), point {p.index}\n"
                + config.to_toml(p.config))
        tmp = f"{p.config_path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, p.config_path)


def train_args(point: Point, restart: bool = False) -> list[str]:
    """Arguments of ``fedmpi.train`` for a point: ``--resume`` continues a partial run from
    its checkpoint (a run without rounds starts afresh; one with rounds but no checkpoint
    is refused, or started again with ``restart``)."""
    return [point.config_path, "--restart" if restart else "--resume"]


# ---------------------------------------------------------------------------- CLI


def list_runs(sweep: Sweep, out=None) -> None:
    out = out or sys.stdout
    states = [state(p) for p in sweep.points]
    counts = {s: sum(st.status == s for st in states) for s in ("complete", "partial",
                                                                 "pending", "damaged")}
    print(f"sweep {sweep.name} ({sweep.source}): {len(sweep.points)} runs -> {sweep.out_dir}"
          f"  [{counts['complete']} complete, {counts['partial']} partial, "
          f"{counts['pending']} pending"
          + (f", {counts['damaged']} damaged" if counts["damaged"] else "") + "]", file=out)
    width = max((len(p.name) for p in sweep.points), default=0)
    for p, st in zip(sweep.points, states, strict=True):
        mark = {"complete": "done", "partial": f"{st.rows}/{st.rounds}",
                "pending": "-", "damaged": "damaged"}[st.status]
        print(f"{p.index:4d}  {p.name:<{width}}  {mark:>9}  {p.path}", file=out)
    for st in states:
        if st.status == "damaged":
            print(f"damaged: {st.error}", file=out)


#: exit status of ``--local`` after Ctrl-C / SIGTERM: the running job checkpointed
EXIT_INTERRUPTED = 75


class Forward:
    """While a run's ``mpiexec`` is alive, SIGINT, SIGTERM and SIGUSR1 to this process are
    passed on to it (mpiexec hands them to every rank: the run checkpoints at the end of
    its round and exits 75; a second Ctrl-C makes mpiexec abort the job). The job runs in
    its own process group, so a terminal's Ctrl-C reaches it once, through here."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.received: list[int] = []
        self.old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def _handler(self, signum, frame) -> None:
        self.received.append(signum)
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signum)

    def restore(self) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def _eta(seconds: float, rounds_done: int, rounds_left: int) -> str:
    from fedmpi.progress import fmt_duration

    if rounds_done <= 0:
        return "?"
    return fmt_duration(seconds / rounds_done * rounds_left)


def run_local(sweep: Sweep, n: int, dry_run: bool = False, out=None, restart: bool = False,
              quiet: bool = False) -> int:
    """Run the unfinished points one after another. Exit status: 0 all done, 1 some
    failed, :data:`EXIT_INTERRUPTED` when a signal stopped the sweep."""
    from fedmpi.progress import fmt_duration, terminal_width

    out = out or sys.stdout
    failed = []
    todo = [(p, state(p)) for p in sweep.points]
    pending = [(p, st) for p, st in todo if st.status != "complete"]
    print(f"sweep {sweep.name}: {len(todo)} runs, {len(todo) - len(pending)} complete, "
          f"{len(pending)} to run on {n} rank(s)", file=out, flush=True)
    for p in sweep.points:
        if n - 1 > p.config.data.num_clients:
            raise ConfigError(f"{p.name}: data.num_clients", f"{n} ranks need at least "
                              f"{n - 1} clients (got {p.config.data.num_clients})")
    if not dry_run:
        write_configs(sweep, [p for p, _ in pending])
    for p, st in todo:
        if st.status == "complete":
            print(f"skip {p.name}: complete", file=out, flush=True)
        elif st.status == "damaged":  # resuming would refuse it too; never overwrite it
            failed.append(p.name)
            print(f"skip {p.name}: {st.error}; move it away to run this point again",
                  file=out, flush=True)
    pending = [(p, st) for p, st in pending if st.status != "damaged"]
    if dry_run:
        for p, _ in pending:
            cmd = launch.command(n, "fedmpi.train", [*train_args(p, restart), "--quiet"])
            print(" ".join(cmd), file=out, flush=True)
        return 1 if failed else 0  # a damaged point is not done: say so
    forward = Forward()
    try:
        t_start = time.perf_counter()
        rounds_done = 0  # rounds run by this invocation's finished jobs
        left = sum(st.rounds - st.rows for _, st in pending)
        for i, (p, st) in enumerate(pending):
            tag = f"[{i + 1}/{len(pending)}]"
            spent = time.perf_counter() - t_start
            print(f"{tag} run  {p.name} ({st.rows}/{st.rounds} rounds on disk; sweep "
                  f"{fmt_duration(spent)}, ETA {_eta(spent, rounds_done, left)})",
                  file=out, flush=True)
            code, took = _run_one(p, n, tag, forward, out, restart, quiet, terminal_width(out))
            after = state(p)
            rounds_done += max(0, after.rows - st.rows)
            left -= st.rounds - st.rows
            if forward.received:
                name = signal.Signals(forward.received[0]).name
                print(f"sweep {sweep.name}: {name}: {p.name} stopped with exit {code} "
                      f"after {took:.1f} s" + (" (checkpointed)" if code == 75 else "")
                      + f", {after.rows}/{after.rounds} rounds on disk; rerun the same "
                      "command to continue", file=out, flush=True)
                return EXIT_INTERRUPTED
            if code != 0:
                failed.append(p.name)
                print(f"{tag} FAIL {p.name}: exit {code} after {took:.1f} s", file=out,
                      flush=True)
            else:
                print(f"{tag} done {p.name} in {took:.1f} s", file=out, flush=True)
    finally:
        forward.restore()
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=out, flush=True)
    return 1 if failed else 0


def _run_one(p: Point, n: int, tag: str, forward: Forward, out, restart: bool,
             quiet: bool, width: int | None) -> tuple[int, float]:
    """Run one point's job, its output lines prefixed with ``tag``; (exit status, s)."""
    cmd = launch.command(n, "fedmpi.train", [*train_args(p, restart)]
                         + (["--quiet"] if quiet else []))
    env = launch.environment()
    if width is not None:  # the job's round lines fit this terminal after the prefix
        env["FEDMPI_COLUMNS"] = str(max(40, width - len(tag) - 1))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    forward.child = proc
    try:
        for line in proc.stdout:
            out.write(f"{tag} {line}")
            out.flush()
        code = proc.wait()
    finally:
        forward.child = None
        if proc.poll() is None:  # only on an error here: do not leave the job behind
            proc.kill()
            proc.wait()
    return code, time.perf_counter() - t0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fedmpi.sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Expand a sweep file (a run config plus a [sweep] table) into named "
        "runs: list them\nwith their state, or run the unfinished ones here one after "
        "another.",
        epilog="Ctrl-C during --local: the running job checkpoints at the end of its round "
        "and stops,\nthe sweep stops after it (exit 75); rerun the same command to "
        "continue. A second\nCtrl-C aborts the job at once. SLURM: python slurm/submit.py "
        "SWEEP --help")
    p.add_argument("sweep", help="sweep TOML file (a run config plus a [sweep] table)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="print the runs and their state")
    mode.add_argument("--local", action="store_true",
                      help="run the unfinished runs one after another on this machine")
    p.add_argument("-n", type=int, default=None,
                   help="MPI processes per run (default: [sweep] ranks, else 1)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --local: print the commands, run nothing, write nothing")
    p.add_argument("--restart", action="store_true",
                   help="with --local: a run with rounds but no checkpoint starts again "
                   "from round 1 (without it, such a run fails with a message)")
    p.add_argument("--quiet", action="store_true",
                   help="with --local: no per-round lines, only a line per run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sweep = load(args.sweep)
        if args.list:
            list_runs(sweep)
            return 0
        n = args.n or sweep.ranks or 1
        if n < 1:
            raise ConfigError("-n", f"must be >= 1 (got {n})")
        return run_local(sweep, n, args.dry_run, restart=args.restart, quiet=args.quiet)
    except ConfigError as exc:
        print(f"fedmpi.sweep: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # --list | head
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
