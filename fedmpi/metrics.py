"""The HDF5 run file: writer (rank 0 only) and reader (analysis scripts, tests).

Layout (docs/design.md):

* root attributes: ``fedmpi_version``, ``git_commit``, ``mpi_size``, ``start_time``,
  ``config`` (the resolved config as TOML text), ``dense_bytes``, ``num_params``, and
  ``complete = True`` written last, after the final row (absent on a crashed run);
* ``/rounds/<metric>``: 1-D, one row per round (:data:`ROUND_METRICS`);
* ``/clients/<metric>``: 2-D, round x client (:data:`CLIENT_METRICS`);
* ``/partition``: clients x classes training-sample counts.

Every dataset is declared up front, then the file switches to SWMR mode (readable by
other processes while the run is going) and every row is flushed as it is written. A
file whose writer died in SWMR mode opens only in SWMR read mode; :func:`open_run` tries
a normal open and falls back to that, so a crashed run stays readable.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

import fedmpi
from fedmpi.config import Config, loads, to_toml

if TYPE_CHECKING:
    import h5py


def _h5py():
    """h5py, imported on first use: only rank 0 writes the run file, and the client ranks
    that import this module through fedmpi.train never load h5py and libhdf5 (~10 MiB of
    resident memory per rank; tests/test_train.py checks)."""
    import h5py

    return h5py

#: per-round scalars: name -> dtype (floats are NaN where a metric is not computed)
ROUND_METRICS: dict[str, str] = {
    "round": "i8", "wall_time": "f8", "test_acc": "f8", "test_loss": "f8", "train_loss": "f8",
    # the global model's mean accuracy over the clients' holdouts (data.client_holdout)
    "client_acc_mean": "f8",
    "participants": "i8", "diverged_clients": "i8",
    "uplink_bytes": "i8", "uplink_payload_bytes": "i8",
    "downlink_payload_bytes": "i8",
    # the simulator's transport, not the federated job: they change with the rank count
    "transport_downlink_bytes": "i8", "transport_meta_bytes": "i8",
    "compression_ratio_up": "f8", "compression_ratio_down": "f8", "efficiency_mean": "f8",
    "time_round": "f8", "time_train": "f8", "time_encode": "f8", "time_comm": "f8",
    "time_decode": "f8", "time_eval": "f8",
    "sharpness_lmax": "f8", "sharpness_trace": "f8", "sharpness_sam": "f8",
    # more sharpness (fedmpi.sharpness.measure): eigenvalues 2..5 by deflation, the trace's
    # standard error, the loss on the sharpness subset, SAM sharpness at the 2nd..4th rho
    "sharpness_eig2": "f8", "sharpness_eig3": "f8", "sharpness_eig4": "f8",
    "sharpness_eig5": "f8", "sharpness_trace_stderr": "f8", "sharpness_loss": "f8",
    "sharpness_sam2": "f8", "sharpness_sam3": "f8", "sharpness_sam4": "f8",
    "time_sharpness": "f8",
    # the sharpness estimates' own errors: lambda_1's residual ||H v - lambda v|| and
    # Hessian-vector products, the Hutchinson probes behind the trace
    "sharpness_lmax_resid": "f8", "sharpness_lmax_iters": "i8", "sharpness_trace_probes": "i8",
    # perturbation accuracy (fedmpi.perturbation): mean cos(ascent, true global gradient)
    # over the clients that climbed, cos(w^{t-1} - w^t, that gradient), FedSynSAM's fit
    "perturb_cos": "f8", "perturb_cos_update": "f8", "synth_fit_cos": "f8",
}

#: per-round, per-client values: name -> dtype
CLIENT_METRICS: dict[str, str] = {
    "participation": "i1", "train_loss": "f8", "uplink_bytes": "i8", "efficiency": "f8",
    "steps": "i8", "diverged": "i1",
    "acc": "f8",  # the global model's accuracy on the client's holdout (data.client_holdout)
    "perturb_cos": "f8",  # cos(ascent at the first local step, true global gradient)
}


@dataclass
class RoundTimes:
    """A round's seconds, as rank 0 measured them (``round`` from the top of the round)."""

    round: float = 0.0
    train: float = 0.0  #: the slowest rank's training
    encode: float = 0.0  #: the slowest rank's encoding
    decode: float = 0.0  #: rank 0: decode and aggregate
    eval: float = 0.0  #: rank 0: test evaluation and perturbation measurement
    server: float = 0.0  #: rank 0: decode to the end of sharpness (left out of comm)
    measured: float = 0.0  #: perturbation measurement (in eval, left out of comm)


def uplink_ratio(dense_bytes: int, senders: int, uplink: int) -> float:
    """Dense fp32 bytes of the clients that sent an update / the bytes they sent; NaN when
    nothing was sent (every participant diverged), not dense / 1 byte."""
    return dense_bytes * senders / uplink if uplink else float("nan")


def round_row(round_: int, wall_time: float, records: list, diverged: dict[int, int],
              num_clients: int, counters: Any, times: RoundTimes, *, acc: float,
              loss: float, client_acc: np.ndarray | None, aggregated: bool,
              dense_bytes: int, num_params: int, receivers: int, down_size: int,
              down_client_bytes: int, per_client: dict[str, np.ndarray] | None = None,
              extra: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One round's ``/rounds`` row and ``/clients`` arrays (:data:`ROUND_METRICS`,
    :data:`CLIENT_METRICS`). ``records``: the participants' fedmpi.protocol.ClientRecord
    in wire order; ``diverged``: client -> DIVERGED code; ``counters``: the transport's
    byte counters; ``dense_bytes``: the dense fp32 bytes of everything one client sends
    (the algorithm's uploads); ``per_client`` / ``extra``: further arrays and scalars
    (perturbation, sharpness)."""
    clients = {k: np.zeros(num_clients, dtype=dt) for k, dt in
               (("participation", np.int8), ("uplink_bytes", np.int64), ("steps", np.int64))}
    clients["train_loss"] = np.full(num_clients, np.nan)
    clients["efficiency"] = np.full(num_clients, np.nan)
    clients["diverged"] = np.zeros(num_clients, dtype=np.int8)
    clients["acc"] = client_acc if client_acc is not None else np.full(num_clients, np.nan)
    clients.update(per_client or {})
    for cid, why in diverged.items():
        clients["diverged"][cid] = why
    for r in records:
        clients["participation"][r.client] = 1
        clients["uplink_bytes"][r.client] = r.nbytes
        clients["train_loss"][r.client] = r.train_loss
        clients["efficiency"][r.client] = r.efficiency
        clients["steps"][r.client] = r.steps
    by_id = sorted(records, key=lambda r: r.client)  # rank-count independent means
    c = counters
    per_broadcast = c.downlink / receivers if receivers else down_size
    senders = sum(1 for r in records if not r.diverged)  # decode-diverged ones did send
    row = {
        "round": round_, "wall_time": wall_time, "test_acc": acc, "test_loss": loss,
        "client_acc_mean": (float(np.nanmean(client_acc)) if client_acc is not None
                            else float("nan")),
        "train_loss": float(np.mean(np.asarray([r.train_loss for r in by_id]))),
        "participants": len(records), "diverged_clients": len(diverged),
        "uplink_bytes": c.uplink, "uplink_payload_bytes": int(sum(r.nbytes for r in records)),
        "downlink_payload_bytes": down_client_bytes,
        "transport_downlink_bytes": c.downlink, "transport_meta_bytes": c.meta,
        "compression_ratio_up": uplink_ratio(dense_bytes, senders, c.uplink),
        "compression_ratio_down": (4 * num_params / per_broadcast if per_broadcast
                                   else float("nan")),
        "efficiency_mean": (float(np.nanmean(np.asarray([r.efficiency for r in by_id])))
                            if aggregated else float("nan")),
        "time_round": times.round, "time_train": times.train, "time_encode": times.encode,
        "time_decode": times.decode, "time_eval": times.eval,
        "time_comm": max(0.0, times.round - times.train - times.encode - times.server
                         - times.measured),
        **(extra or {}),
    }
    return row, clients


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(fedmpi.__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fill(dtype: str, name: str = "") -> Any:
    # "round" reads -1 in a row that was resized but never written (a writer that died or
    # failed mid-row): open_run leaves such trailing rows out (row i holds round i)
    return np.nan if dtype.startswith("f") else (-1 if name == "round" else 0)


class RunWriteError(RuntimeError):
    """Writing the run file failed (a full disk, a lost mount): one message naming the
    file, the round and the OS error; the rows flushed before stay readable. HDF5 cannot
    finish such a file, and tries again when the interpreter shuts down (a SIGSEGV on a
    full disk): end the process with ``os._exit``, as fedmpi.train does."""


#: file handles of writers that failed: kept alive so that h5py never tries (and fails,
#: noisily, on a full disk) to flush and close them while the process ends
_broken: list[Any] = []


def _from_h5py(unraisable) -> bool:
    return "h5py" in repr(getattr(unraisable, "object", "")) or "id ref count" in str(
        getattr(unraisable, "exc_value", ""))


def _quiet_h5py_dealloc(unraisable) -> None:
    """sys.unraisablehook after a failed write: h5py's object destructors retry the
    failed write and report each failure ("Exception ignored in ... __dealloc__", ~190
    lines on a full disk); the one RunWriteError says it all."""
    if not _from_h5py(unraisable):
        sys.__unraisablehook__(unraisable)


def _quiet_h5py_traceback(kind, value, tb) -> None:
    """sys.excepthook likewise: h5py's destructors print their error's traceback through
    it (Cython's PyErr_PrintEx) before the unraisable hook is called."""
    t = tb  # (no traceback module: this also runs while the interpreter shuts down)
    while t is not None:
        if "h5py" in t.tb_frame.f_code.co_filename:
            return
        t = t.tb_next
    sys.__excepthook__(kind, value, tb)


def _go_quiet() -> None:
    sys.unraisablehook, sys.excepthook = _quiet_h5py_dealloc, _quiet_h5py_traceback


class _Watch:
    """While writing: h5py reports a write that fails inside an object's destructor (a
    dataset handle released between two writes flushes its chunk) as an unraisable
    error that is printed and dropped, and HDF5 goes on, into a crash (SIGSEGV) on a full
    disk. This hook keeps such errors; :meth:`check` raises the first one."""

    def __enter__(self) -> _Watch:
        self.errors: list[BaseException] = []
        self.previous = sys.unraisablehook, sys.excepthook
        sys.unraisablehook, sys.excepthook = self._hook, _quiet_h5py_traceback
        return self

    def _hook(self, unraisable) -> None:
        if _from_h5py(unraisable):
            self.errors.append(unraisable.exc_value)
        else:
            self.previous[0](unraisable)

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]

    def __exit__(self, kind, *_) -> None:
        sys.unraisablehook, sys.excepthook = self.previous
        if kind is not None:  # after a failure, stay quiet: the destructors fail again
            _go_quiet()


def _errno_text(exc: BaseException) -> str:
    """``[Errno 28] No space left on device (ENOSPC)`` from an h5py error, else its text."""
    code = getattr(exc, "errno", None)
    m = re.search(r"errno = (\d+)", str(exc))
    if code is None and m:
        code = int(m.group(1))
    if code:
        return f"[Errno {code}] {os.strerror(code)} ({errno.errorcode.get(code, '?')})"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class RunWriter:
    """Appends one row per round to ``path``; ``close()`` marks the run complete."""

    def __init__(self, path: str, cfg: Config, mpi_size: int, num_clients: int,
                 partition: np.ndarray, attrs: dict[str, Any] | None = None,
                 swmr: bool = True):
        self.path = path
        self.num_clients = num_clients
        self.rows = 0
        # SWMR needs the latest file format; without SWMR keep the default format, whose
        # superblock has no "open for write" flag, so a crashed writer leaves it readable
        self.libver = "latest" if swmr else None
        self.f = None
        self._guarded("creating it", lambda watch: self._create(
            cfg, mpi_size, num_clients, partition, attrs, swmr, watch))

    def _guarded(self, doing: str, step) -> None:
        """``step(watch)``; a write error, raised or only reported by an h5py destructor
        (:class:`_Watch`), becomes one RunWriteError saying what was being done."""
        try:
            with _Watch() as watch:
                step(watch)
                watch.check()
        except (OSError, RuntimeError) as exc:
            raise self._failed(doing, exc) from None

    def _failed(self, doing: str, exc: BaseException) -> RunWriteError:
        """The error for a failed write; the file handle is parked, never touched again."""
        if self.f is not None:
            _broken.append(self.f)
            self.f = None
        _go_quiet()
        return RunWriteError(f"{self.path}: {doing} failed: {_errno_text(exc)}; the rounds "
                             "written before are in the file")

    def _create(self, cfg, mpi_size, num_clients, partition, attrs, swmr, watch) -> None:
        path = self.path
        self.f = _h5py().File(path, "w", libver=self.libver)
        a = self.f.attrs
        a["fedmpi_version"] = fedmpi.__version__
        a["git_commit"] = git_commit()
        a["mpi_size"] = mpi_size
        a["start_time"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        a["config"] = to_toml(cfg)
        a["num_clients"] = num_clients
        for k, v in (attrs or {}).items():
            a[k] = v
        g = self.f.create_group("rounds")
        for name, dt in ROUND_METRICS.items():
            g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(256,),
                             fillvalue=_fill(dt, name))
            watch.check()
        g = self.f.create_group("clients")
        chunk = (max(1, min(64, 65536 // max(1, num_clients))), num_clients)
        for name, dt in CLIENT_METRICS.items():
            g.create_dataset(name, shape=(0, num_clients), maxshape=(None, num_clients),
                             dtype=dt, chunks=chunk, fillvalue=_fill(dt))
            watch.check()
        del g
        self.f.create_dataset("partition", data=np.asarray(partition, dtype=np.int64))
        self.f.flush()
        watch.check()
        if swmr:
            self.f.swmr_mode = True

    @classmethod
    def resume(cls, path: str, rows: int, cfg: Config, mpi_size: int,
               swmr: bool = True) -> RunWriter:
        """Reopen ``path`` truncated to its first ``rows`` rows, ready to append.

        The rows are copied into a fresh file that then replaces the old one (atomically),
        which also revives a file whose SWMR writer crashed (those open read-only).
        """
        try:  # (--resume checked the file on every rank's behalf; this is rank 0 alone)
            old = open_run(path)
        except RunFileError as exc:
            raise RunWriteError(str(exc)) from None
        if len(old) < rows:
            raise ValueError(f"{path} has {len(old)} rows, the checkpoint needs {rows}")
        keep = {k: v for k, v in old.attrs.items()
                if k not in ("complete", "stopped", "peak_rss_mb", "pss_mb", "config", "mpi_size",
                             "fedmpi_version", "git_commit")}
        keep["resumed_at_rounds"] = np.append(
            np.asarray(old.attrs.get("resumed_at_rounds", []), dtype=np.int64), rows)
        tmp = f"{path}.tmp"
        try:
            w = cls(tmp, cfg, mpi_size, int(old.attrs["num_clients"]), old.partition,
                    attrs=keep, swmr=swmr)
            for i in range(rows):
                w.append({k: v[i] for k, v in old.rounds.items() if k in ROUND_METRICS},
                         {k: v[i] for k, v in old.clients.items() if k in CLIENT_METRICS})
            w._guarded("closing the copy of the kept rounds", lambda watch: w.f.close())
        except BaseException:  # (a full disk) the old file is untouched; no stray copy
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        os.replace(tmp, path)
        w.path, w.libver = path, ("latest" if swmr else None)
        w.f = _h5py().File(path, "r+", libver=w.libver)
        if swmr:
            w.f.swmr_mode = True
        return w

    def append(self, row: dict[str, Any], clients: dict[str, np.ndarray]) -> None:
        unknown = set(row) - set(ROUND_METRICS) | set(clients) - set(CLIENT_METRICS)
        if unknown:
            raise KeyError(f"metrics not declared in the run file schema: {sorted(unknown)}")
        if self.f is None:
            raise RunWriteError(f"{self.path}: the file failed before; nothing more is written")
        self._guarded(f"writing round {int(row.get('round', self.rows)) + 1}",
                      lambda watch: self._append(row, clients, watch))

    def _append(self, row: dict[str, Any], clients: dict[str, np.ndarray],
                watch: _Watch) -> None:
        n = self.rows + 1
        for name, dt in CLIENT_METRICS.items():
            ds = self.f["clients"][name]
            ds.resize((n, self.num_clients))
            ds[n - 1] = clients.get(name, np.full(self.num_clients, _fill(dt)))
            watch.check()
        # the round number last: a row whose "round" is not its index was never finished
        for name, dt in [*((k, d) for k, d in ROUND_METRICS.items() if k != "round"),
                         ("round", ROUND_METRICS["round"])]:
            ds = self.f["rounds"][name]
            ds.resize((n,))
            ds[n - 1] = row.get(name, _fill(dt))
            watch.check()
        del ds
        self.f.flush()
        watch.check()
        self.rows = n

    def close(self, complete: bool, attrs: dict[str, Any] | None = None) -> None:
        """Close the file, reopen it outside SWMR, add ``attrs`` (per-rank peak RSS, why a
        run stopped, ...), then, with ``complete``, set ``complete`` last."""
        def finish(watch: _Watch) -> None:
            if self.f:
                self.f.close()
                self.f = None
                watch.check()
            self.f = f = _h5py().File(self.path, "r+", libver=self.libver)
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
            if complete:
                f.flush()
                watch.check()
                f.attrs["complete"] = True
            f.close()
            self.f = None

        self._guarded("closing it", finish)


@dataclass
class Run:
    """A run file read into memory."""

    path: str
    attrs: dict[str, Any]
    rounds: dict[str, np.ndarray]
    clients: dict[str, np.ndarray]
    partition: np.ndarray

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def config(self) -> Config:
        return loads(self.attrs["config"])

    def __len__(self) -> int:
        return int(self.rounds["round"].shape[0])


class RunFileError(OSError):
    """A run file that cannot be read: truncated, corrupt, not HDF5 or not a run file."""

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__(f"{path}: not a readable run file ({reason})")


#: a file whose writer is running or died in SWMR mode: only a SWMR read opens it
_WRITER_FLAGS = ("already open for write", "unable to lock file")
#: HDF5 retries a SWMR read whose metadata checksum fails (a live writer may be mid-flush)
#: with a sleep that doubles from 1 ns, and by default 100 times: for ever on a truncated
#: or corrupt file (the sleep is inside HDF5, so not even Ctrl-C ends it). 28 attempts
#: wait ~0.27 s in all, still far longer than a writer's flush.
SWMR_READ_ATTEMPTS = 28


def _libhdf5():
    """The libhdf5 that h5py loaded (ctypes), or None where it cannot be found."""
    import ctypes
    import glob

    h5 = _h5py()
    candidates = []
    try:  # Linux: the exact library mapped into this process
        with open("/proc/self/maps") as fh:
            candidates = sorted({line.split()[-1] for line in fh
                                 if re.search(r"/libhdf5[-.]", line.split()[-1])})
    except OSError:
        pass
    here = os.path.dirname(h5.__file__)
    candidates += glob.glob(os.path.join(here, ".dylibs", "libhdf5.*dylib"))
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same handle, the same library
            fn = lib.H5Pset_metadata_read_attempts
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int64, ctypes.c_uint], ctypes.c_int
        return lib
    return None


def _swmr_open(path: str) -> h5py.File:
    """Open ``path`` in SWMR read mode with HDF5's metadata retries bounded."""
    h5 = _h5py()
    fapl = h5.h5p.create(h5.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5.h5f.LIBVER_LATEST, h5.h5f.LIBVER_LATEST)
    lib = _libhdf5()
    if lib is None or lib.H5Pset_metadata_read_attempts(fapl.id, SWMR_READ_ATTEMPTS) < 0:
        _probe_in_child(path)  # no bound in this process: let a child find out first
    fid = h5.h5f.open(os.fsencode(path), h5.h5f.ACC_RDONLY | h5.h5f.ACC_SWMR_READ, fapl=fapl)
    return h5.File(fid)


def _probe_in_child(path: str, timeout: float = 60.0) -> None:
    """Where the retries cannot be bounded here, read ``path`` in a child process first:
    a damaged file then fails in ``timeout`` seconds instead of hanging this one."""
    code = ("import sys; from fedmpi.metrics import _read; import h5py; "
            "_read(h5py.File(sys.argv[1], 'r', libver='latest', swmr=True))")
    try:
        out = subprocess.run([sys.executable, "-c", code, path], capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunFileError(path, f"a SWMR read did not finish in {timeout:.0f} s") from None
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        raise RunFileError(path, lines[-1] if lines else f"exit {out.returncode}")
#: run files written before the transport counters were renamed: old name -> new name
LEGACY_NAMES = {"downlink_bytes": "transport_downlink_bytes", "meta_bytes": "transport_meta_bytes"}


def _open(path: str) -> h5py.File:
    h5 = _h5py()
    try:
        return h5.File(path, "r")
    except OSError as exc:
        # written in SWMR mode and still open, or its writer crashed: SWMR read works;
        # anything else (truncated, corrupt, not HDF5) is an error now, not a retry
        if not any(flag in str(exc) for flag in _WRITER_FLAGS):
            raise RunFileError(path, str(exc)) from None
    try:
        return _swmr_open(path)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        if isinstance(exc, RunFileError):
            raise
        raise RunFileError(path, str(exc)) from None


def _read(f: h5py.File) -> tuple[dict, dict, dict, np.ndarray]:
    def read(group: str) -> dict[str, np.ndarray]:
        out = {}
        for name, ds in f[group].items():
            if f.swmr_mode:
                ds.refresh()
            out[name] = ds[()]
        return out

    rounds, clients = read("rounds"), read("clients")
    for old, new in LEGACY_NAMES.items():
        if old in rounds and new not in rounds:
            rounds[new] = rounds.pop(old)
    n = min(len(v) for v in rounds.values())  # a live writer may be mid-row ...
    while n and rounds["round"][n - 1] != n - 1:  # ... or a failed one left a row unfinished
        n -= 1
    rounds = {k: v[:n] for k, v in rounds.items()}
    clients = {k: v[:n] for k, v in clients.items()}
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return attrs, rounds, clients, f["partition"][()]


def verify_complete(path: str, rows: int) -> None:
    """After a run: the file must read back complete with ``rows`` rows, or the run is not
    reported as a success (RunWriteError)."""
    try:
        run = open_run(path)
    except RunFileError as exc:
        raise RunWriteError(f"{path}: the run finished but its file does not read back "
                            f"({exc})") from None
    if not run.complete or len(run) != rows:
        raise RunWriteError(f"{path}: the run finished but its file reads back with "
                            f"{len(run)} of {rows} rounds, complete = {run.complete}")


def open_run(path: str) -> Run:
    """Read a run file, finished, running or crashed; a file that cannot be read (missing,
    truncated, corrupt, not a run file) raises :class:`RunFileError` naming it, within
    about a second (a SWMR read's retries are bounded: :data:`SWMR_READ_ATTEMPTS`)."""
    if not os.path.isfile(path):
        raise RunFileError(path, "no such file" if not os.path.exists(path) else
                           "not a regular file")
    with _open(path) as f:
        try:
            attrs, rounds, clients, partition = _read(f)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise RunFileError(path, f"{type(exc).__name__}: {exc}") from None
    return Run(path, attrs, rounds, clients, partition)
