"""Everything around the round loop of :mod:`fedmpi.train`: the command line, the setup
of a job on every rank (config, output file, resume, data, model, compressor, downlink,
estimator, algorithm, the two roles), checkpoints, and the end of a run.

:func:`setup` reads top to bottom as the job starts:

1. every rank loads and validates the config (errors name the key; exit status 2);
2. rank 0 claims the run file and, with ``--resume``, reads the checkpoint;
3. rank 0 loads the dataset, partitions it and sends each client rank its clients' shards;
4. every rank builds the same w^0 from ``run.seed`` (round 0 needs no model broadcast),
   the compressor, downlink, estimator and the algorithm's halves; a client rank its
   :class:`~fedmpi.roles.ClientRole`, rank 0 its :class:`~fedmpi.roles.ServerRole`.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import fedmpi.perturbation as perturbation
from fedmpi import (
    algorithms,
    checkpoint,
    compress,
    config,
    data,
    downlink,
    layout,
    metrics,
    sam,
    sharpness,
)
from fedmpi.client import ClientGroup, Shard
from fedmpi.comm import SERVER, RoundLimit, Transport, WaitTimeout
from fedmpi.compress import ModelSpec
from fedmpi.fitpool import open_pool, pooled
from fedmpi.gate import job_key, open_gate
from fedmpi.models import FlatModel, build_module
from fedmpi.outputs import claim, probe_dir
from fedmpi.progress import Progress, TensorBoard, summary, terminal_width
from fedmpi.protocol import Layout
from fedmpi.roles import ClientRole, ServerRole
from fedmpi.server import Server

TAG_INIT = 401
USER_ERRORS = (config.ConfigError, data.DataError, checkpoint.ResumeError, FileExistsError,
               PermissionError, metrics.RunFileError)

#: failures that end the job with one message and no traceback (exit 1, every rank ends)
FATAL = (WaitTimeout, checkpoint.CheckpointError, metrics.RunWriteError)


class StopRun(Exception):
    """A user error found on some rank(s) during setup; every rank stops with exit code 2."""


HELP = """\
Run one federated-learning job: rank 0 is the server, the other ranks simulate the
clients. One line per round, a summary at the end, every round in <out_dir>/<name>.h5.
"""
EPILOG = """\
examples:
  python -m fedmpi.train                                  the default job, 1 process
  python -m fedmpi.train jobs/x.toml --set client.lr=0.1  a run file, one key changed
  mpiexec -n 3 python -m mpi4py -m fedmpi.train jobs/x.toml   2 client ranks

run name: run.name if the config sets it, else the config file's name (quickstart for the
default job) plus the --set values that change results, e.g. quickstart_lr-0.1.

Ctrl-C (SIGINT), SIGTERM, SIGUSR1: checkpoint at the end of the round and stop (exit 75;
continue with --resume); a second Ctrl-C aborts at once. A checkpoint is also written
every checkpoint.every_seconds (default 600) and every checkpoint.every rounds.

exit status: 0 done, 2 bad input, 3 diverged (stopped), 75 checkpointed on a signal,
1 any other failure.  Config keys: python -m fedmpi.config --help
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fedmpi.train", description=HELP,
                                epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="TOML run file (default: the embedded "
                   "quickstart job, jobs/quickstart.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run file")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint "
                   "(a run that has rounds but no checkpoint is refused; nothing to do if "
                   "the run is complete)")
    p.add_argument("--restart", action="store_true", help="like --resume, but a run with "
                   "rounds and no checkpoint starts again from round 1")
    p.add_argument("--quiet", action="store_true", help="no per-round lines")
    args = p.parse_args(argv)
    args.resume = args.resume or args.restart
    return args


def on_server(transport: Transport, fn):
    """Run ``fn`` on rank 0 only; a user error there stops every rank."""
    result, error = None, None
    if transport.is_server:
        try:
            result = fn()
        except USER_ERRORS as exc:
            error = exc
    transport.quiet_barrier()  # the others sleep while rank 0 works (blocking MPI calls spin)
    if not transport.agree(error is None):
        raise StopRun(str(error) if error else "")
    return result


def output_path(cfg: config.Config, overwrite: bool, resume: bool = False) -> str:
    """Rank 0, before any slow work: probe the output folders, claim the run file for this
    job (fedmpi.outputs: a second job with this run.name is refused), check it."""
    probe_dir(cfg.run.out_dir, "run.out_dir")
    path = os.path.join(cfg.run.out_dir, f"{cfg.run.name}.h5")
    claim(path)  # first: two jobs started together cannot both pass the check
    if os.path.exists(path) and not (overwrite or resume):
        raise FileExistsError(f"run.name: {path} exists; pass --overwrite to replace it or "
                              "choose another run.name")
    ckpt = checkpoint.path_for(cfg)
    probe_dir(os.path.dirname(os.path.abspath(ckpt)), "checkpoint.path")
    if overwrite and not resume and checkpoint.discard(ckpt):
        print(f"fedmpi: --overwrite: removed the old run's checkpoint {ckpt}", flush=True)
    return path


def distribute_shards(transport: Transport, loaded, parts, owners, device
                      ) -> dict[int, Shard]:
    """Rank 0 sends every client rank the samples of its clients; returns this rank's."""
    mine: dict[int, Shard] = {}
    if transport.is_server:
        for r, cids in owners.items():
            arrays = []
            for cid in cids:
                arrays += [loaded.train.x[parts[cid]], loaded.train.y[parts[cid]]]
            if r == SERVER:
                got = arrays
            else:
                transport.send_arrays(r, arrays)
    elif transport.rank in owners:
        got = transport.recv_arrays(SERVER)
    if transport.rank in owners:
        for i, cid in enumerate(owners[transport.rank]):
            x, y = got[2 * i], got[2 * i + 1]
            mine[cid] = Shard(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
    return mine


def resume_state(cfg: config.Config, path: str, device,
                 restart: bool = False) -> dict | str | None:
    """Rank 0: the checkpoint to resume from, "complete", or None (start afresh: no run
    file, one without rounds, or ``restart``). A run file with rounds but no checkpoint is
    refused: starting it afresh would drop its rounds without a word."""
    rows = 0
    if os.path.exists(path):
        run = metrics.open_run(path)
        checkpoint.check_same_run(run.attrs["config"], cfg, path)
        if run.complete and len(run) >= cfg.run.rounds:
            return "complete"
        rows = len(run)
    ckpt = checkpoint.path_for(cfg)
    if not os.path.exists(ckpt):
        if rows and not restart:
            raise checkpoint.ResumeError(
                f"--resume: {path} has {rows} round(s) but there is no checkpoint {ckpt} "
                "to continue from; pass --restart to run it again from round 1 (its rounds "
                "are replaced), or choose another run.name")
        if rows:
            print(f"fedmpi: --restart: {path} has {rows} round(s) and no checkpoint; "
                  "starting again from round 1", flush=True)
        return None
    state = checkpoint.load(ckpt, device)
    checkpoint.check_same_run(state["config"], cfg, ckpt)
    checkpoint.check_resumable(state, cfg.run.rounds, ckpt, path)
    return state


@dataclass
class Job:
    """One rank's share of a job, as :func:`setup` built it."""

    cfg: config.Config
    transport: Transport
    path: str
    first: int  #: the round this process starts at (> 0 on resume)
    layout: Layout
    d: int  #: model parameters
    limit: RoundLimit
    server: ServerRole | None  #: rank 0
    client: ClientRole | None  #: a rank that owns clients
    model: FlatModel  #: rank 0: the global model w^t
    compute: Any  #: the compute gate (fedmpi.gate)
    pool: Any  #: this rank's fit pool (fedmpi.fitpool), or None
    cpu0: float


def setup(args: argparse.Namespace, comm: Transport, distribute=distribute_shards
          ) -> Job | None:
    """Build this rank's share of the job; None if a resumed run is already complete.
    ``distribute``: how shards reach their ranks (:func:`distribute_shards`)."""
    # 1. config, device, threads -----------------------------------------------------
    cfg = config.load(args.config, args.overrides)
    comm.wait_mode, comm.poll_max = cfg.run.mpi_wait, cfg.run.mpi_poll_max_ms / 1000.0
    ranks = layout.client_ranks(comm.size, cfg.run.server_trains)
    if len(ranks) > cfg.data.num_clients:
        raise config.ConfigError("data.num_clients", f"{len(ranks)} client ranks but only "
                                 f"{cfg.data.num_clients} clients; run with at most "
                                 f"{cfg.data.num_clients + 1} processes")
    comm.set_client_ranks(ranks)
    device = layout.pick_device(cfg.run.device, comm.local_rank)
    threads = layout.thread_count(cfg.run.threads, comm.local_size)
    torch.set_num_threads(threads)
    compute = open_gate(cfg.run.compute_slots, threads, comm.bcast_object(job_key()),
                        comm.node_allgather, comm.local_rank)
    info = data.info(cfg.data)
    # 2. the run file, the checkpoint --------------------------------------------------
    path = on_server(comm, lambda: output_path(cfg, args.overwrite, args.resume))
    saved = (on_server(comm, lambda: resume_state(cfg, path, device, args.restart))
             if args.resume else None)
    if comm.bcast_object(saved == "complete"):
        if comm.is_server:
            print(f"fedmpi: {path} is already complete; nothing to resume", flush=True)
        return None
    first = int(comm.bcast_object(saved["round"] if isinstance(saved, dict) else 0))

    # 3. data: load and partition on rank 0, shards to their owners ---------------------
    def load_and_split():
        loaded = data.load(cfg)
        return loaded, *data.hold_out(data.partition(loaded, cfg), cfg)

    loaded, parts, held = on_server(comm, load_and_split) or (None, None, None)
    sizes = comm.bcast_object([len(p) for p in parts] if comm.is_server else None)
    owners = layout.assign_clients(sizes, ranks)
    shards = distribute(comm, loaded, parts, owners, device)
    max_slots = max(len(c) for c in owners.values())

    # 4. models and methods: every rank builds the same w^0 from run.seed ---------------
    init_seed = int(np.random.default_rng([cfg.run.seed, TAG_INIT]).integers(2**31))

    def new_model() -> FlatModel:
        return FlatModel(build_module(cfg.model, info.input_shape, info.num_classes,
                                      init_seed), device)

    model = new_model()
    spec = ModelSpec(d=model.d, shapes=model.shapes, input_shape=info.input_shape,
                     num_classes=info.num_classes, device=device)
    compressor = compress.build(cfg.compressor, spec)
    down_link = downlink.build(cfg.compressor.downlink, spec, cfg.run.seed,
                               lambda: compress.build(cfg.compressor, spec))
    estimator = sam.build(cfg, spec)
    normalizer = data.Normalizer(info, device)
    method = algorithms.REGISTRY[cfg.algorithm.name]
    wire = Layout(cfg.data.num_clients, max_slots, method.Client.uploads, method.broadcasts())
    group = None
    if comm.rank in owners:
        # rank 0 keeps ``model`` as the server's w^t; a client rank has no other use for it,
        # so its group trains in it (w^0 is copied into global_params): one model less
        group = ClientGroup(cfg, shards, new_model() if comm.is_server else model, compressor,
                            spec, normalizer, estimator, algorithms.client_half(cfg, spec))
        group.set_global(model.params)
    # oversubscribed node: the ranks behind one compute slot fit 3SFC samples together
    pool = open_pool(comm, cfg.run.pool_fits and pooled(compressor) and len(wire.uploads) == 1,
                     compute, group is not None, compressor.batch_clients,
                     sum(len(s) for s in shards.values()), len(shards))
    alg_server = algorithms.server_half(cfg, spec) if comm.is_server else None
    if first:  # resume: server state on rank 0, client states to their (new) owners
        restore_run(comm, saved, owners, model, down_link, estimator, alg_server, group)
    client = (ClientRole(group, down_link, estimator, compute, pool, device)
              if group is not None else None)
    server = None
    if comm.is_server:
        server = server_role(cfg, args, comm, path, first, saved, loaded, parts, held, model,
                             compressor, spec, normalizer, down_link, estimator, alg_server,
                             wire, owners, len(ranks))
    return Job(cfg, comm, path, first, wire, model.d, RoundLimit(cfg.run.round_timeout,
               comm.is_server), server, client, model, compute, pool, time.process_time())


def server_role(cfg, args, comm, path, first, saved, loaded, parts, held, model, compressor,
                spec, normalizer, down_link, estimator, alg_server, wire, owners,
                receivers: int) -> ServerRole:
    """Rank 0: the server, its run file, measurements and console."""
    info = data.info(cfg.data)
    holdout = None
    if cfg.data.client_holdout > 0:  # every client's held-out samples, and whose
        every = np.concatenate(held)
        holdout = (loaded.train.subset(every),
                   np.repeat(np.arange(len(held)), [len(h) for h in held]))
    server = Server(cfg, model, compressor, spec, loaded.test, normalizer, holdout)
    counts = data.class_counts(loaded.train.y, parts, info.num_classes)
    device = model.device
    sharp = meter = None
    if cfg.eval.sharpness_every:  # a fixed, seeded training subset for sharpness
        sharp = sharpness.fixed_subset(loaded.train.x, loaded.train.y,
                                       cfg.eval.sharpness_samples, cfg.eval.subset_seed,
                                       device)
    if cfg.eval.perturbation_every:  # the true global gradient's fixed subset
        meter = perturbation.Meter(model.module, perturbation.subset(
            loaded.train.x, loaded.train.y, parts, cfg.eval.perturbation_samples,
            cfg.eval.subset_seed, device), normalizer, cfg.eval.batch_size)
        if first and saved.get("previous_params") is not None:
            meter.previous = saved["previous_params"].to(device)
    del loaded  # rank 0 keeps only the test split (and its own shards, if any)
    if first:
        writer = metrics.RunWriter.resume(path, first, cfg, comm.size, cfg.run.hdf5_swmr)
    else:
        writer = metrics.RunWriter(path, cfg, comm.size, cfg.data.num_clients, counts,
                                   attrs={"num_params": model.d,
                                          "dense_bytes": compressor.dense_bytes(),
                                          "owners": str(owners)},
                                   swmr=cfg.run.hdf5_swmr)
    print(f"fedmpi: {cfg.run.name}: {cfg.data.dataset} / {cfg.model.name} "
          f"(d = {model.d:,}), {cfg.data.num_clients} clients on {receivers} client "
          f"rank(s), compressor {compressor.name}"
          + (f", algorithm {cfg.algorithm.name}" if cfg.algorithm.name != "fedavg" else "")
          + f", {cfg.run.rounds} rounds -> {path}"
          + (f" (resumed at round {first + 1})" if first else ""), flush=True)
    shown = Progress(cfg.run.rounds, first, terminal_width())
    board = TensorBoard(path, first, config.to_toml(cfg)) if cfg.run.tensorboard else None
    start = time.perf_counter() - (saved["wall_time"] if first else 0.0)
    return ServerRole(cfg, server, compressor, down_link, estimator, alg_server, wire, writer,
                      meter, sharp, board, shown, args.quiet, first, start, receivers)


def take_checkpoint(job: Job, rnd: int) -> None:
    """Every rank: send client states to rank 0, which writes the checkpoint atomically."""
    comm, server = job.transport, job.server
    gathered = comm.gather_object(job.client.states() if job.client is not None else ({}, None))
    if server is not None:
        clients: dict = {}
        for states, _ in gathered:
            clients.update(states)
        replica = next(r for _, r in gathered if r is not None)
        meter = server.meter
        checkpoint.save(checkpoint.path_for(job.cfg), {
            "round": rnd, "config": config.to_toml(job.cfg),
            "wall_time": time.perf_counter() - server.start,
            "params": server.server.params.cpu(), "replica": replica, "clients": clients,
            "downlink": checkpoint.object_state(server.down_link),
            "estimator": checkpoint.object_state(server.estimator),
            "algorithm": server.algorithm.state_dict(),
            "previous_params": (meter.previous.cpu() if meter is not None
                                and meter.previous is not None else None)})
        server.last_checkpoint = time.perf_counter()


def restore_run(comm: Transport, saved, owners, model, down_link, estimator, alg_server,
                group) -> None:
    """Rank 0 restores the server state and sends each client rank its clients' states."""
    if comm.is_server:
        model.params.copy_(saved["params"])
        checkpoint.restore(down_link, saved["downlink"])
        checkpoint.restore(estimator, saved["estimator"])
        alg_server.load_state_dict(saved.get("algorithm") or {})
        for r, cids in owners.items():
            part = ({c: saved["clients"][c] for c in cids}, saved["replica"])
            if r == SERVER:
                mine = part
            else:
                comm.send_object(r, part)
    elif group is not None:
        mine = comm.recv_object(SERVER)
    if group is not None:
        states, replica = mine
        group.states.update(states)
        group.set_global(replica.to(group.global_params.device))


def pss_mb() -> float:
    """This process's proportional set size now, MiB (Linux; NaN elsewhere): its private
    pages plus each shared page divided by the processes that map it, so that the ranks'
    sum is the job's physical memory (RSS counts a shared page once per rank)."""
    try:
        with open("/proc/self/smaps_rollup") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("Pss:")) / 1024
    except (OSError, StopIteration, ValueError):
        return float("nan")


def finish(job: Job, code: int) -> int:
    """Every rank: per-rank resource use to rank 0, which closes the run file (complete
    only for a run that finished) and prints the summary; the job's exit status."""
    comm, server, pool = job.transport, job.server, job.pool
    comm.quiet_barrier()  # (blocking MPI calls spin: 40 such ranks slow rank 0's last round)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    per_rank = comm.gather_object((usage.ru_maxrss / 1024.0, time.process_time() - job.cpu0,
                                len(job.compute.paths), pool.size if pool else 0,
                                pool.fitted if pool else 0, pss_mb()))
    if pool is not None:
        pool.close()
    job.compute.close()
    if server is not None:
        names = ("peak_rss_mb", "cpu_seconds", "compute_slots", "fit_pool_size",
                 "fit_pool_fitted", "pss_mb")
        attrs: dict[str, Any] = {name: np.asarray([r[i] for r in per_rank])
                                 for i, name in enumerate(names)}
        if server.stopped:
            attrs["stopped"] = server.stopped
            code = code or 3
        server.writer.close(complete=code == 0, attrs=attrs)
        if code == 0:  # success only for a file that reads back complete
            metrics.verify_complete(job.path, job.cfg.run.rounds)
        if server.board is not None:
            server.board.close()
        if server.history:
            print(summary(job.path, job.cfg.run.name, server.stopped), flush=True)
    return int(comm.bcast_object(code))
