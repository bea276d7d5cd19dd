"""Checkpoint and resume.

A checkpoint is taken at the top of a round (before anything of that round happens),
every ``checkpoint.every`` rounds, once ``checkpoint.every_seconds`` of wall time have
passed since the last one, and when rank 0 receives SIGINT (Ctrl-C; mpiexec passes it on
to every rank), SIGTERM or SIGUSR1 (SLURM's warning before a time limit or preemption);
after a signal the job exits with :data:`EXIT_REQUEUE`. A second Ctrl-C aborts at once.
It holds everything a run carries between rounds:

* the global model and the server's state: the downlink (server residual, its compressor
  state, the pending compressed payload, the missed-round cache sizes) and the
  perturbation estimator's server-side state (e.g. FedSynSAM's synthetic set);
* every client's state (``ClientState``: error-feedback residuals, DGC momentum, the
  rounds it trained for the learning-rate decay, last global model seen), gathered from
  the owning ranks, and the client ranks' view of the global model (which differs from
  the server's by the pending payload under a compressed downlink);
* the round, the number of HDF5 rows, the elapsed wall time and the resolved config.

There is no RNG state to save: every random stream is derived from (seed, round,
client). The file is written to ``<path>.tmp``, fsynced and renamed, so a crash while
checkpointing leaves the previous checkpoint intact.

``--resume`` reloads it on any number of ranks (clients are reassigned by the layout rule
and receive their own states), truncates the HDF5 file back to the checkpointed round
and appends from there; resumed and uninterrupted runs are identical on the CPU. A
checkpoint or HDF5 file written under a different config is refused; keys that do not
change results (listed in :data:`FREE_KEYS`) may differ.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

from fedmpi import config

CONTROL_STOP = 1  #: leave the round loop (the server stopped the run)
CONTROL_CHECKPOINT = 2  #: every rank takes part in a checkpoint now
CONTROL_EXIT = 4  #: leave after the checkpoint (a signal asked for it)
EXIT_REQUEUE = 75  #: exit status after a signal-triggered checkpoint: "resume me"

#: keys that may differ between a run and its resumption
FREE_KEYS = {"run": {"rounds", "threads", "mpi_wait", "mpi_poll_max_ms", "device",
                     "hdf5_swmr", "compute_slots", "pool_fits", "tensorboard"},
             "checkpoint": {"every", "every_seconds", "path"}}


class ResumeError(ValueError):
    """A checkpoint or run file that cannot be resumed with this config."""


def path_for(cfg: config.Config) -> str:
    return cfg.checkpoint.path or os.path.join(cfg.run.out_dir, f"{cfg.run.name}.ckpt")


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


def save(path: str, state: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: str, device: torch.device | str = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except (OSError, EOFError, RuntimeError, ValueError) as exc:
        raise ResumeError(f"{path}: not a readable fedmpi checkpoint ({exc})") from None


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
