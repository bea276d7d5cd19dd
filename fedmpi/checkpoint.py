"""Checkpoint and resume.

A checkpoint is taken at the top of a round (before anything of that round happens),
every ``checkpoint.every`` rounds, once ``checkpoint.every_seconds`` of wall time have
passed since the last one, and when rank 0 receives SIGINT (Ctrl-C; mpiexec passes it on
to every rank), SIGTERM or SIGUSR1 (SLURM's warning before a time limit or preemption);
after a signal the job exits with :data:`EXIT_REQUEUE`. A second Ctrl-C aborts at once.
It holds everything a run carries between rounds:

* the global model and the server's state: the downlink (server residual, its compressor
  state, the pending compressed payload, the missed-round cache sizes) and the
  perturbation estimator's server-side state (e.g. FedSynSAM's synthetic set), and the
  algorithm's server state (``ServerHalf.state_dict``: SCAFFOLD's c);
* every client's state (``ClientState``: error-feedback residuals, DGC momentum, the
  rounds it trained for the learning-rate decay, last global model seen, the algorithm's
  client state such as SCAFFOLD's c_i), gathered from
  the owning ranks, and the client ranks' view of the global model (which differs from
  the server's by the pending payload under a compressed downlink);
* the round, the number of HDF5 rows, the elapsed wall time and the resolved config.

There is no RNG state to save: every random stream is derived from (seed, round,
client). The file is written to ``<path>.tmp``, fsynced and renamed, so a crash while
checkpointing leaves the previous checkpoint intact (a failed write removes the ``.tmp``).
It starts with a sha256 of its content, which ``--resume`` verifies: a damaged checkpoint
is refused (exit 2), never resumed.

``--resume`` reloads it on any number of ranks (clients are reassigned by the layout rule
and receive their own states), truncates the HDF5 file back to the checkpointed round
and appends from there; resumed and uninterrupted runs are identical on the CPU. A
checkpoint or HDF5 file written under a different config is refused; keys that do not
change results (listed in :data:`FREE_KEYS`) may differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
from typing import Any

import torch

from fedmpi import config

CONTROL_STOP = 1  #: leave the round loop (the server stopped the run)
CONTROL_CHECKPOINT = 2  #: every rank takes part in a checkpoint now
CONTROL_EXIT = 4  #: leave after the checkpoint (a signal asked for it)
EXIT_REQUEUE = 75  #: exit status after a signal-triggered checkpoint: "resume me"

#: keys that may differ between a run and its resumption
FREE_KEYS = {"run": {"rounds", "threads", "mpi_wait", "mpi_poll_max_ms", "device",
                     "hdf5_swmr", "compute_slots", "pool_fits", "round_timeout", "tensorboard"},
             "checkpoint": {"every", "every_seconds", "path"}}


class ResumeError(ValueError):
    """A checkpoint or run file that cannot be resumed with this config."""


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written (the message names the path and why)."""


def path_for(cfg: config.Config) -> str:
    return cfg.checkpoint.path or os.path.join(cfg.run.out_dir, f"{cfg.run.name}.ckpt")


def discard(path: str) -> bool:
    """Remove the checkpoint at ``path`` and a leftover ``.tmp``; True if there was one.
    ``--overwrite`` starts a new run: a later ``--resume`` must not find the old state."""
    found = False
    for p in (path, f"{path}.tmp"):
        try:
            os.remove(p)
            found = found or p == path
        except FileNotFoundError:
            pass
    return found


def differences(a: config.Config, b: config.Config) -> list[str]:
    """Config keys (section.key) whose values differ, ignoring :data:`FREE_KEYS`."""
    da, db = config.to_dict(a), config.to_dict(b)
    out = []
    for section in sorted(set(da) | set(db)):
        ta, tb = da.get(section, {}), db.get(section, {})
        for key in sorted(set(ta) | set(tb)):
            if key not in FREE_KEYS.get(section, ()) and ta.get(key) != tb.get(key):
                out.append(f"{section}.{key}: {ta.get(key)!r} != {tb.get(key)!r}")
    return out


def check_same_run(saved_toml: str, cfg: config.Config, what: str) -> None:
    diff = differences(config.loads(saved_toml), cfg)
    if diff:
        raise ResumeError(f"{what} was written with a different config; refusing to resume "
                          f"({'; '.join(diff[:5])}{' ...' if len(diff) > 5 else ''})")


#: a checkpoint file: this line, ``sha256 <hex digest of the rest>\n``, then torch.save's
#: zip archive (torch's reader checks no CRC: flipped tensor bytes would load silently)
MAGIC = b"fedmpi checkpoint 1\n"
HEADER = len(MAGIC) + len(b"sha256 ") + 64 + 1


def _header(digest: str) -> bytes:
    return MAGIC + b"sha256 " + digest.encode() + b"\n"


class _Hashing:
    """A write-only file that hashes what passes through (torch.save streams into it)."""

    def __init__(self, fh):
        self.fh, self.sha = fh, hashlib.sha256()
        self.error: OSError | None = None  #: a failed write (torch reports only its own)

    def write(self, data) -> int:
        self.sha.update(data)
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.fh.flush()


class _Skip:
    """A read-only view of ``fh`` from byte ``offset`` on (torch.load seeks absolutely)."""

    def __init__(self, fh, offset: int):
        self.fh, self.offset = fh, offset
        fh.seek(offset)

    def read(self, n: int = -1) -> bytes:
        return self.fh.read(n)

    def readinto(self, buf) -> int:
        return self.fh.readinto(buf)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.fh.seek(pos + self.offset if whence == 0 else pos, whence) - self.offset

    def tell(self) -> int:
        return self.fh.tell() - self.offset

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def save(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` with a checksum of its bytes to ``<path>.tmp``, fsync, rename. A
    write that fails (a full disk) removes the ``.tmp`` and raises CheckpointError."""
    tmp = f"{path}.tmp"
    hashing = None
    try:
        with open(tmp, "wb") as fh:
            fh.write(_header("0" * 64))
            hashing = _Hashing(fh)
            torch.save(state, hashing)
            fh.seek(0)
            fh.write(_header(hashing.sha.hexdigest()))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, (OSError, RuntimeError)):  # torch reports write errors as these
            cause = hashing.error if hashing is not None and hashing.error else exc
            raise CheckpointError(f"checkpoint {path}: writing it failed ({cause}); the "
                                  "previous checkpoint, if any, is intact") from None
        raise


def load(path: str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a damaged one (checksum mismatch, not a checkpoint) raises
    ResumeError naming it. Checkpoints written before checksums load with a note."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEADER)
            if not head.startswith(MAGIC):
                if not head.startswith(b"PK"):
                    raise ValueError("no fedmpi checkpoint header")
                print(f"fedmpi: note: {path} predates checkpoint checksums; not verified",
                      file=sys.stderr, flush=True)
                return torch.load(path, map_location=device, weights_only=False)
            recorded = head[len(MAGIC) + len(b"sha256 "):-1].decode(errors="replace")
            sha = hashlib.sha256()
            for block in iter(lambda: fh.read(1 << 22), b""):
                sha.update(block)
            if sha.hexdigest() != recorded:
                raise ResumeError(f"{path}: the checkpoint is damaged (its content's sha256 "
                                  f"{sha.hexdigest()[:16]}... differs from the recorded "
                                  f"{recorded[:16]}...); refusing to resume from it")
            return torch.load(_Skip(fh, HEADER), map_location=device, weights_only=False)
    except ResumeError:
        raise
    except Exception as exc:  # truncated, not a zip, unpickling errors, ...
        raise ResumeError(f"{path}: not a readable fedmpi checkpoint "
                          f"({type(exc).__name__}: {exc})") from None


def check_resumable(state: dict[str, Any], rounds: int, ckpt: str, path: str) -> None:
    """The checkpoint ``state`` (at ``ckpt``) continues the run file ``path`` with
    ``rounds`` rounds in all; ResumeError (exit 2) naming the files otherwise."""
    from fedmpi import metrics

    at = int(state["round"])
    if at > rounds:
        raise ResumeError(f"run.rounds: {rounds}, but the checkpoint {ckpt} has finished "
                          f"{at} rounds; resume with run.rounds >= {at}")
    if not os.path.exists(path):
        raise ResumeError(f"{ckpt} exists but its run file {path} does not")
    rows = len(metrics.open_run(path))
    if rows < at:
        raise ResumeError(f"{path} has {rows} round(s) but the checkpoint {ckpt} has "
                          f"finished {at}: they are not from one run; move the checkpoint "
                          "away to start afresh")


def object_state(obj: Any) -> dict[str, Any]:
    """The attributes of a stateful object (downlink, estimator), less its config."""
    return {k: v for k, v in vars(obj).items() if k not in ("cfg", "spec")}


def restore(obj: Any, state: dict[str, Any]) -> None:
    vars(obj).update(state)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalFlag:
    """Set by SIGINT (Ctrl-C), SIGTERM and SIGUSR1; replaces their default action (dying,
    or KeyboardInterrupt) on every rank, so that the run checkpoints at the next round
    boundary. A SIGINT after any of them aborts at once (the process dies of it; under
    mpiexec the job ends): the last checkpoint written stays. ``announce`` (rank 0) says
    so on stderr when the first one arrives."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1),
                 announce: bool = False):
        self.raised: int | None = None
        self.announce = announce
        for sig in signals:
            signal.signal(sig, self._handler)

    def _say(self, text: str) -> None:
        if self.announce:
            os.write(2, text.encode())  # safe in a signal handler, unlike print

    def _handler(self, signum, frame) -> None:
        if self.raised is not None and signum == signal.SIGINT:
            self._say("\nfedmpi: SIGINT again: aborting now\n")
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        if self.raised is None:
            self._say(f"\nfedmpi: {signal_name(signum)}: the run checkpoints at the end of "
                      "this round and stops (exit 75; continue with --resume); Ctrl-C "
                      "again aborts at once\n")
            self.raised = signum
