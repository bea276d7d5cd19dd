"""Submit a fedmpi sweep to SLURM as one job array: one task per unfinished run.

    python slurm/submit.py jobs/3sfc_table2.toml --partition gpu --time 12:00:00 \\
        --nodes 1 --ranks-per-node 11 --gpus-per-node 4 --max-parallel 8 [--dry-run]

The sweep is expanded and every run's config validated by :mod:`fedmpi.sweep`; runs whose
HDF5 file is complete are left out. Each run's resolved config is written to
``<out_dir>/configs/<run>.toml``, the job script (``slurm/array.sbatch`` rendered) to
``<out_dir>/slurm/<sweep>.sbatch``, and it is submitted with ``sbatch``. Logs go to the
shared folder ``<out_dir>/logs`` (``--log-dir``): ``<job>_<array job>_<task>.out`` from
the task script and ``<run>.log`` from the run itself, appended across requeues.

Every task starts ``python -m mpi4py -m fedmpi.train <config>`` with ``mpiexec`` (the
MPICH/Open MPI launcher beside this Python, which takes the hosts from the allocation) or
``srun --mpi=pmi2`` (``--launcher srun``), on nodes x ranks-per-node ranks; each rank pins
itself to ``cuda:(local_rank % GPUs)``. Before the time limit (``--signal-before``) the
task tells the run to checkpoint and requeues itself; a restarted task passes
``--resume``. ``--dry-run`` prints the script and writes nothing.

The tasks run the fedmpi of the checkout this script belongs to, not whichever fedmpi is
installed or first on the submitting shell's ``PYTHONPATH``: the script puts it first on
``PYTHONPATH`` (and sets ``PYTHONSAFEPATH``, so the job's working folder cannot shadow
it), checks before starting that Python imports fedmpi from there, and logs the git
commit it was submitted at next to the one it runs (the run file records the latter).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

#: the checkout this script lives in: its fedmpi is the one submitted and run
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(CHECKOUT, "fedmpi", "__init__.py")):
    sys.path.insert(0, CHECKOUT)  # before an installed fedmpi or another checkout's

from fedmpi import launch, sweep  # noqa: E402
from fedmpi.config import ConfigError  # noqa: E402

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "array.sbatch")
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


@dataclass(frozen=True)
class Options:
    partition: str | None = None  #: --partition (None: the cluster's default)
    time: str | None = None  #: --time limit per task (None: the partition's default)
    nodes: int = 1  #: nodes per run
    ranks_per_node: int = 1  #: MPI ranks per node
    gpus_per_node: int = 0  #: GPUs per node (0: no --gpus-per-node line)
    cpus_per_task: int = 0  #: CPU cores per rank (0: the cluster's default)
    account: str | None = None
    max_parallel: int = 0  #: most tasks running at once (0: no throttle)
    signal_before: int = 300  #: seconds before the time limit the run is told to stop
    max_requeues: int = 20  #: a task stops requeueing itself after this many restarts
    launcher: str = "mpiexec"  #: mpiexec | srun
    srun_mpi: str = "pmi2"  #: srun --mpi=... (pmi2 for MPICH, pmix for Open MPI)
    python: str = sys.executable  #: the Python (with fedmpi installed) on the nodes
    mpiexec: str | None = None  #: the launcher (None: fedmpi.launch.mpiexec())
    workdir: str | None = None  #: job working folder (None: this one)
    #: the folder holding the fedmpi package the jobs import (None: this checkout)
    fedmpi_root: str | None = None
    #: the git commit of fedmpi_root at submission (None: read it now)
    commit: str | None = None
    log_dir: str | None = None  #: shared log folder (None: <out_dir>/logs)
    extra: tuple[str, ...] = ()  #: more sbatch options, e.g. "--mem=32G"

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node


def time_seconds(limit: str) -> int:
    """SLURM time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S -> seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit.strip())
    if not m:
        raise ConfigError("--time", f"not a SLURM time limit: {limit!r} (e.g. 90, 4:00:00, "
                          "1-12:00:00)")
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-H[:M[:S]]
        return int(days) * 86400 + a * 3600 + b * 60 + c
    if m.group(4) is not None:  # H:M:S
        return a * 3600 + b * 60 + c
    if m.group(3) is not None:  # M:S
        return a * 60 + b
    return a * 60  # M


def checkout_commit(root: str) -> str:
    """``git rev-parse HEAD`` of ``root``, with ``+dirty`` when tracked files changed;
    ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=30)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fedmpi_root(opts: Options) -> str:
    """The folder whose fedmpi package the jobs run: --fedmpi-root, else this checkout
    (else, for an installed copy of this script, the fedmpi it imported)."""
    if opts.fedmpi_root:
        return os.path.abspath(opts.fedmpi_root)
    if os.path.isfile(os.path.join(CHECKOUT, "fedmpi", "__init__.py")):
        return CHECKOUT
    return os.path.dirname(os.path.dirname(os.path.abspath(sweep.__file__)))


def _path(path: str, workdir: str) -> str:
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(workdir, path))


def _sbatch_safe(value: str, key: str) -> str:
    if not value or re.search(r"\s", value):
        raise ConfigError(key, f"must be non-empty without spaces (got {value!r})")
    return value


def check(sw: sweep.Sweep, points: Sequence[sweep.Point], opts: Options) -> None:
    for key in ("nodes", "ranks_per_node"):
        if getattr(opts, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')}", "must be >= 1")
    for key in ("gpus_per_node", "cpus_per_task", "max_parallel", "max_requeues"):
        if getattr(opts, key) < 0:
            raise ConfigError(f"--{key.replace('_', '-')}", "must be >= 0")
    if opts.launcher not in ("mpiexec", "srun"):
        raise ConfigError("--launcher", f"must be mpiexec or srun (got {opts.launcher!r})")
    if opts.signal_before < 1:
        raise ConfigError("--signal-before", "must be >= 1 second")
    if opts.time is not None and time_seconds(opts.time) <= opts.signal_before:
        raise ConfigError("--signal-before", f"{opts.signal_before} s is not shorter than "
                          f"the time limit --time {opts.time}")
    for p in points:
        if opts.ranks - 1 > p.config.data.num_clients:
            raise ConfigError(f"{p.name}: data.num_clients",
                              f"{opts.ranks} ranks (--nodes x --ranks-per-node) need at "
                              f"least {opts.ranks - 1} clients (got "
                              f"{p.config.data.num_clients})")


def render(sw: sweep.Sweep, points: Sequence[sweep.Point], opts: Options,
           template: str | None = None) -> str:
    """The job script for ``points`` (array index i runs ``points[i]``)."""
    check(sw, points, opts)
    if not points:
        raise ConfigError("sweep", "no runs to submit")
    workdir = os.path.abspath(opts.workdir or os.getcwd())
    out_dir = _path(sw.out_dir, workdir)
    log_dir = _path(opts.log_dir, workdir) if opts.log_dir else os.path.join(out_dir, "logs")
    source = sw.source
    if os.path.isabs(source) and source.startswith(workdir + os.sep):
        source = os.path.relpath(source, workdir)
    resources = []
    if opts.partition:
        resources.append(f"--partition={_sbatch_safe(opts.partition, '--partition')}")
    if opts.account:
        resources.append(f"--account={_sbatch_safe(opts.account, '--account')}")
    if opts.time:
        resources.append(f"--time={_sbatch_safe(opts.time, '--time')}")
    if opts.gpus_per_node:
        resources.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task:
        resources.append(f"--cpus-per-task={opts.cpus_per_task}")
    resources += [_sbatch_safe(e, "--sbatch-option") for e in opts.extra]
    if opts.launcher == "srun":
        launch_line = (f"srun --mpi={_sbatch_safe(opts.srun_mpi, '--srun-mpi')} "
                       "--kill-on-bad-exit=1 -n \"$SLURM_NTASKS\"")
    else:
        launch_line = f"{shlex.quote(opts.mpiexec or launch.mpiexec())} -n \"$SLURM_NTASKS\""
    array = f"0-{len(points) - 1}" + (f"%{opts.max_parallel}" if opts.max_parallel else "")
    values = {
        "SWEEP": sw.name, "SOURCE": source, "COUNT": str(len(points)),
        "JOB_NAME": _sbatch_safe(sw.name, "sweep.name"), "ARRAY": array,
        "NODES": str(opts.nodes), "RANKS_PER_NODE": str(opts.ranks_per_node),
        "RANKS": str(opts.ranks),
        "RESOURCES": "".join(f"#SBATCH {r}\n" for r in resources),
        "WORKDIR": _sbatch_safe(workdir, "--workdir"),
        "LOG_DIR": _sbatch_safe(log_dir, "--log-dir"),
        "SIGNAL_SECONDS": str(opts.signal_before),
        "RUN_LIST": "".join(f"  {p.name}\n" for p in points),
        "PYTHON": shlex.quote(opts.python), "CONFIG_DIR": shlex.quote(_path(sw.config_dir,
                                                                               workdir)),
        "OUT_DIR": shlex.quote(out_dir), "MAX_REQUEUES": str(opts.max_requeues),
        "LAUNCH": launch_line,
        "FEDMPI_ROOT": shlex.quote(root := fedmpi_root(opts)),
        "COMMIT": shlex.quote(opts.commit or checkout_commit(root)),
    }
    if template is None:
        with open(TEMPLATE) as fh:
            template = fh.read()
    missing = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    if missing:
        raise KeyError(f"template placeholders without a value: {missing}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def select(sw: sweep.Sweep, include_complete: bool = False) -> list[sweep.Point]:
    """The points to submit: all, or those whose run file is not complete. A damaged run
    file (truncated, corrupt) is left out with a message: its task would refuse it."""
    points = []
    for p in sw.points:
        st = sweep.state(p)
        if st.status == "damaged":
            print(f"submit: skip {p.name}: {st.error}; move it away to run this point again",
                  file=sys.stderr)
        elif include_complete or st.status != "complete":
            points.append(p)
    return points


def submit(sw: sweep.Sweep, points: Sequence[sweep.Point], opts: Options,
           sbatch: str = "sbatch", env: dict[str, str] | None = None) -> tuple[str, str]:
    """Write configs and the script, run sbatch; returns (job id, script path)."""
    text = render(sw, points, opts)
    workdir = os.path.abspath(opts.workdir or os.getcwd())
    out_dir = _path(sw.out_dir, workdir)
    log_dir = _path(opts.log_dir, workdir) if opts.log_dir else os.path.join(out_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    sweep.write_configs(sw, points)
    script = os.path.join(out_dir, "slurm", f"{sw.name}.sbatch")
    os.makedirs(os.path.dirname(script), exist_ok=True)
    with open(script, "w") as fh:
        fh.write(text)
    proc = subprocess.run([sbatch, "--parsable", script], capture_output=True, text=True,
                          cwd=workdir, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0], script


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python slurm/submit.py", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep TOML file (jobs/*.toml)")
    d = Options()
    p.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    p.add_argument("--account", help="SLURM account to charge")
    p.add_argument("--time", help="time limit per run, e.g. 4:00:00 (default: partition's)")
    p.add_argument("--nodes", type=int, default=d.nodes, help="nodes per run (default 1)")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="MPI ranks per node (default: [sweep] ranks / nodes, else 1)")
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node,
                   help="GPUs per node (ranks use cuda:(local_rank %% GPUs); default 0)")
    p.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task,
                   help="cores per rank; also each rank's torch threads (default: cluster's)")
    p.add_argument("--max-parallel", type=int, default=d.max_parallel,
                   help="most array tasks running at once (%%N; default: no limit)")
    p.add_argument("--signal-before", type=int, default=d.signal_before, metavar="SECONDS",
                   help="checkpoint and requeue this long before the time limit (default "
                   f"{d.signal_before})")
    p.add_argument("--max-requeues", type=int, default=d.max_requeues,
                   help=f"a task requeues itself at most this often (default {d.max_requeues})")
    p.add_argument("--launcher", choices=("mpiexec", "srun"), default=d.launcher,
                   help="start the ranks with mpiexec (default) or srun")
    p.add_argument("--srun-mpi", default=d.srun_mpi, help="srun --mpi= plugin (default pmi2)")
    p.add_argument("--python", default=d.python, help="Python on the nodes (default: this)")
    p.add_argument("--mpiexec", default=None, help="mpiexec on the nodes (default: the one "
                   "beside this Python)")
    p.add_argument("--workdir", default=None, help="job working folder (default: here)")
    p.add_argument("--fedmpi-root", default=None, help="the folder whose fedmpi package "
                   "the jobs run (default: the checkout of this script, "
                   f"{CHECKOUT})")
    p.add_argument("--log-dir", default=None, help="shared log folder (default: "
                   "<out_dir>/logs)")
    p.add_argument("--sbatch-option", dest="extra", action="append", default=[],
                   metavar="OPT", help="one more sbatch option, e.g. --mem=32G (repeatable)")
    p.add_argument("--all", action="store_true", help="include runs that are complete")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job script; write and submit nothing")
    return p.parse_args(argv)


def options(args: argparse.Namespace, sw: sweep.Sweep) -> Options:
    rpn = args.ranks_per_node
    if rpn is None:
        rpn = -(-sw.ranks // max(1, args.nodes)) if sw.ranks else 1
    return Options(partition=args.partition, time=args.time, nodes=args.nodes,
                   ranks_per_node=rpn, gpus_per_node=args.gpus_per_node,
                   cpus_per_task=args.cpus_per_task, account=args.account,
                   max_parallel=args.max_parallel, signal_before=args.signal_before,
                   max_requeues=args.max_requeues, launcher=args.launcher,
                   srun_mpi=args.srun_mpi, python=args.python, mpiexec=args.mpiexec,
                   workdir=args.workdir, fedmpi_root=args.fedmpi_root, log_dir=args.log_dir,
                   extra=tuple(args.extra))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sw = sweep.load(args.sweep)
        opts = options(args, sw)
        points = select(sw, args.all)
        if not points:
            print(f"sweep {sw.name}: all {len(sw.points)} runs are complete; nothing to "
                  "submit")
            return 0
        if args.dry_run:
            sys.stdout.write(render(sw, points, opts))
            return 0
        job, script = submit(sw, points, opts)
    except ConfigError as exc:
        print(f"submit: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"submit: error: {exc}", file=sys.stderr)
        return 1
    print(f"submitted job array {job}: {len(points)} of {len(sw.points)} runs of sweep "
          f"{sw.name} ({script}); logs in "
          f"{opts.log_dir or os.path.join(sw.out_dir, 'logs')}; watch: squeue -j {job}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
