"""Run ``fedmpi.train`` with one fault injected (a test helper, never used by fedmpi itself).

``FEDMPI_TEST_FAULT = KIND:RANK:ROUND`` where KIND is
  raise      -- ClientGroup.run_round raises on RANK in ROUND;
  kill       -- RANK SIGKILLs itself at the start of its work in ROUND;
  hold       -- RANK prints "holding" to stderr and sleeps for 10 minutes at the start
                of its work in ROUND (a round that does not end);
  pause      -- RANK prints "paused" to stderr at the start of its work in ROUND and
                goes on once it has received a signal (so the signal arrives in ROUND);
  killwrite  -- rank 0 SIGKILLs itself in the middle of writing the row of ROUND
                (datasets resized, values half written, nothing flushed);
  nan        -- client RANK (a client id here; -1 = every client) returns a NaN update
                in ROUND;
  slowload   -- rank RANK sleeps ROUND seconds before loading the data (a slow start);
  stop       -- RANK SIGSTOPs itself at the start of its work in ROUND (a frozen rank);
  huge       -- client RANK (a client id) returns an update of 1e30s in ROUND: finite, but
                the global model's test loss overflows.
With ``FEDMPI_TEST_MARK = PATH``, the faulty rank writes the time (``time.time()``) to
PATH just before a kill or stop, so a test can time what follows from the fault on.
Launch: ``mpiexec -n N python -m mpi4py tests/faulty.py [fedmpi.train args]``.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
from mpi4py import MPI

from fedmpi import checkpoint, client, data, metrics, train

kind, who, when = os.environ["FEDMPI_TEST_FAULT"].split(":")
who, when = int(who), int(when)
rank = MPI.COMM_WORLD.Get_rank()

if kind == "pause":
    handler = checkpoint.SignalFlag._handler

    def _handler(self, signum, frame):
        handler(self, signum, frame)
        SIGNALLED.append(signum)

    SIGNALLED: list[int] = []
    checkpoint.SignalFlag._handler = _handler

if kind in ("raise", "kill", "stop", "hold", "pause") and rank == who:
    original = client.ClientGroup.run_round

    def run_round(self, round_, participants, *args, **kwargs):
        if round_ == when:
            if kind == "raise":
                raise RuntimeError(f"injected failure on rank {rank} in round {round_}")
            if os.environ.get("FEDMPI_TEST_MARK"):
                with open(os.environ["FEDMPI_TEST_MARK"], "w") as fh:
                    fh.write(repr(time.time()))
            if kind in ("hold", "pause"):
                print("holding" if kind == "hold" else "paused", file=sys.stderr,
                      flush=True)
                end = time.monotonic() + 600
                while time.monotonic() < end and not (kind == "pause" and SIGNALLED):
                    time.sleep(0.05)
            else:
                os.kill(os.getpid(), signal.SIGSTOP if kind == "stop" else signal.SIGKILL)
        return original(self, round_, participants, *args, **kwargs)

    client.ClientGroup.run_round = run_round

if kind == "killwrite" and rank == 0:
    def append(self, row, clients):
        if row["round"] == when:
            for name in metrics.ROUND_METRICS:
                ds = self.f["rounds"][name]
                ds.resize((self.rows + 1,))
            self.f["rounds"]["test_acc"][self.rows] = 0.5
            os.kill(os.getpid(), signal.SIGKILL)
        return metrics.RunWriter.unfaulty_append(self, row, clients)

    metrics.RunWriter.unfaulty_append = metrics.RunWriter.append
    metrics.RunWriter.append = append

if kind in ("nan", "huge"):
    original_train = client.ClientGroup.local_train

    def local_train(self, cid, round_):
        update, loss, steps = original_train(self, cid, round_)
        if who in (cid, -1) and round_ == when:
            update = update.clone()
            if kind == "nan":
                update[0] = torch.nan
            else:
                update[:] = 1e30
        return update, loss, steps

    client.ClientGroup.local_train = local_train

if kind == "slowload" and rank == who:
    original_load = data.load

    def load(cfg):
        time.sleep(when)
        return original_load(cfg)

    data.load = load

train.main(sys.argv[1:])
