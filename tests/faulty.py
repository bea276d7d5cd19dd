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
  nan        -- client RANK (a client id here) returns a NaN update in ROUND.
Launch: ``mpiexec -n N python -m mpi4py tests/faulty.py [fedmpi.train args]``.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
from mpi4py import MPI

from fedmpi import checkpoint, client, metrics, train

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

if kind in ("raise", "kill", "hold", "pause") and rank == who:
    original = client.ClientGroup.run_round

    def run_round(self, round_, participants):
        if round_ == when:
            if kind == "raise":
                raise RuntimeError(f"injected failure on rank {rank} in round {round_}")
            if kind in ("hold", "pause"):
                print("holding" if kind == "hold" else "paused", file=sys.stderr,
                      flush=True)
                end = time.monotonic() + 600
                while time.monotonic() < end and not (kind == "pause" and SIGNALLED):
                    time.sleep(0.05)
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self, round_, participants)

    client.ClientGroup.run_round = run_round

if kind == "killwrite" and rank == 0:
    def append(self, row, clients):
        if row["round"] == when:
            for name in metrics.ROUND_METRICS:
                ds = self.f["rounds"][name]
                ds.resize((self.rows + 1,))
            self.f["rounds"]["test_acc"][self.rows] = 0.5
            os.kill(os.getpid(), signal.SIGKILL)
        return metrics.RunWriter._append(self, row, clients)

    metrics.RunWriter._append = metrics.RunWriter.append
    metrics.RunWriter.append = append

if kind == "nan":
    original_train = client.ClientGroup.local_train

    def local_train(self, cid, round_):
        update, loss, steps = original_train(self, cid, round_)
        if cid == who and round_ == when:
            update = update.clone()
            update[0] = torch.nan
        return update, loss, steps

    client.ClientGroup.local_train = local_train

train.main(sys.argv[1:])
