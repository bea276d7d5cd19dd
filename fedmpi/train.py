"""Entry point: ``python -m fedmpi.train [config.toml] [--set section.key=value ...]``.

Run it with any number of MPI processes (``mpiexec -n P python -m fedmpi.train ...``):
rank 0 is the server; ranks 1..P-1 own the clients (with one process, rank 0 owns them
too, over the same code path). :func:`fedmpi.job.setup` builds the job (config, data,
model, the server and client roles); then each round, in the messages of
:mod:`fedmpi.protocol`:

1. the server opens the round: a header (participants, control bits, broadcast sizes) to
   every rank, then the broadcasts (downlink, the estimator's, the algorithm's);
2. the client roles bring their replica to w^t, train and encode their participants, and
   send a report (one record per client) and the payload bytes to rank 0;
3. the server decodes, aggregates through the algorithm, steps, evaluates and appends
   one HDF5 row (:mod:`fedmpi.roles`).

At the end rank 0 marks the run file complete and prints a summary. An unexpected
exception on any rank prints that rank's traceback and aborts the whole job (MPI_Abort),
so no rank waits forever in a collective.
"""

from __future__ import annotations

import sys
import time
import traceback

import fedmpi.perturbation as perturbation
from fedmpi import checkpoint, job, roles
from fedmpi.comm import Transport, finalize_and_exit
from fedmpi.job import (  # noqa: F401  (the names tests and tools use)
    FATAL,
    TAG_INIT,
    USER_ERRORS,
    StopRun,
    distribute_shards,
    parse_args,
)
from fedmpi.outputs import release_all
from fedmpi.roles import checkpoint_due, diverged_test_loss  # noqa: F401


def run(args, transport: Transport) -> int:
    # Ctrl-C / SIGTERM / SIGUSR1 from here on: checkpoint at the next round boundary
    signals = checkpoint.SignalFlag(announce=transport.is_server)
    this = job.setup(args, transport, distribute_shards)
    if this is None:  # a resumed run that is complete already
        return 0
    cfg, layout, server, client = this.cfg, this.layout, this.server, this.client
    code = 0
    for rnd in range(this.first, cfg.run.rounds):
        t0 = time.perf_counter()
        transport.reset_counters()
        transport.begin_round(rnd, this.limit.next_round())
        header = roles.exchange_header(transport, layout,
                                       server.open_round(rnd, signals) if server else None)
        if header.stop:  # the server stopped the run last round
            break
        if header.checkpoint:
            job.take_checkpoint(this, rnd)
        if header.exit:
            code = checkpoint.EXIT_REQUEUE
            if server is not None:
                server.signalled(rnd, signals)
            break
        transport.expect_records(layout.record_words)
        down, extra, alg = roles.exchange_broadcasts(transport, header, server)
        if client is not None:
            client.receive(rnd, down, extra, alg)
        probe = (roles.Probing(transport, server, client, this.d, cfg.data.num_clients)
                 if perturbation.due(cfg.eval, rnd, cfg.run.rounds) else None)
        report, send = (client.train(rnd, header.participants) if client is not None
                        else (roles.RankReport(), roles.EMPTY))
        table, gathered = roles.exchange_reports(transport, layout, report, send)
        if probe is not None:
            probe.gather()
        if server is not None:
            server.close_round(rnd, table, gathered, transport.counters, probe, t0)
    return job.finish(this, code)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transport = Transport()
    try:
        code = run(args, transport)
    except (StopRun, *USER_ERRORS) as exc:
        if transport.is_server and str(exc):
            print(f"fedmpi: error: {exc}", file=sys.stderr, flush=True)
        code = 2
    except FATAL as exc:  # a frozen rank, a full disk: one message, no traceback
        sys.stderr.write(f"fedmpi: error: {exc}\n")
        if transport.size > 1:
            transport.abort(1)
        code = 1
    except KeyboardInterrupt:  # Ctrl-C before the round loop could take it over
        if transport.is_server:
            print("fedmpi: interrupted before the first round", file=sys.stderr, flush=True)
        if transport.size > 1:
            transport.abort(130)
        code = 130
    except BaseException:
        sys.stderr.write(f"fedmpi: rank {transport.rank} of {transport.size} failed:\n"
                         + traceback.format_exc())
        sys.stderr.flush()
        if transport.size > 1:
            transport.abort(1)
        code = 1
    release_all()  # the run file's lock (rank 0)
    finalize_and_exit(code)


if __name__ == "__main__":
    main()
