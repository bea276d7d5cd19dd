"""Entry point: ``python -m fedmpi.train [config.toml] [--set section.key=value ...]``.

Run it with any number of MPI processes (``mpiexec -n P python -m fedmpi.train ...``):
rank 0 is the server; ranks 1..P-1 own the clients (with one process, rank 0 owns them
too, over the same code path). Read top to bottom:

1. every rank loads and validates the config (errors name the key; exit status 2);
2. rank 0 loads the dataset, partitions it and sends each client rank its clients' shards;
3. each round: rank 0 samples the participants and broadcasts a header and the downlink
   payload; client ranks train and encode their participating clients; a Gather of
   per-rank records (payload sizes, telemetry) and a Gatherv of the raw payload bytes
   bring everything to rank 0, which decodes, aggregates in client-id order, evaluates and
   appends one HDF5 row;
4. rank 0 marks the run file complete and prints a summary.

An unexpected exception on any rank prints that rank's traceback and aborts the whole
job (MPI_Abort), so no rank waits forever in a collective.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import traceback

import numpy as np
import torch

import fedmpi.perturbation as perturbation
from fedmpi import checkpoint, compress, config, data, downlink, layout, metrics, sam, sharpness
from fedmpi.client import DIVERGED, ClientGroup, Shard
from fedmpi.comm import SERVER, RoundLimit, Transport, WaitTimeout, finalize_and_exit
from fedmpi.compress import ModelSpec
from fedmpi.fitpool import open_pool, pooled
from fedmpi.gate import job_key, open_gate
from fedmpi.models import FlatModel, build_module
from fedmpi.outputs import claim, probe_dir, release_all
from fedmpi.progress import Progress, TensorBoard, summary, terminal_width
from fedmpi.server import Server, sample_participants

TAG_INIT = 401
HEADER = 5  # round, control bits, downlink bytes, participants, estimator bytes; then a
#            0/1 mask of the participating clients
SLOT = 8  # per owned client: id, participated, payload bytes, loss, efficiency, n, steps,
#          divergence code (fedmpi.client.DIVERGED)
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


def on_server(t: Transport, fn):
    """Run ``fn`` on rank 0 only; a user error there stops every rank."""
    result, error = None, None
    if t.is_server:
        try:
            result = fn()
        except USER_ERRORS as exc:
            error = exc
    t.quiet_barrier()  # the others sleep while rank 0 works (blocking MPI calls spin)
    if not t.agree(error is None):
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


def distribute_shards(t: Transport, loaded, parts, owners, device) -> dict[int, Shard]:
    """Rank 0 sends every client rank the samples of its clients; returns this rank's."""
    mine: dict[int, Shard] = {}
    if t.is_server:
        for r, cids in owners.items():
            arrays = []
            for cid in cids:
                arrays += [loaded.train.x[parts[cid]], loaded.train.y[parts[cid]]]
            if r == SERVER:
                got = arrays
            else:
                t.send_arrays(r, arrays)
    elif t.rank in owners:
        got = t.recv_arrays(SERVER)
    if t.rank in owners:
        for i, cid in enumerate(owners[t.rank]):
            x, y = got[2 * i], got[2 * i + 1]
            mine[cid] = Shard(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
    return mine


def run(args: argparse.Namespace, t: Transport) -> int:
    # Ctrl-C / SIGTERM / SIGUSR1 from here on: checkpoint at the next round boundary
    signals = checkpoint.SignalFlag(announce=t.is_server)
    # 1. config, device, threads -----------------------------------------------------
    cfg = config.load(args.config, args.overrides)
    t.wait_mode, t.poll_max = cfg.run.mpi_wait, cfg.run.mpi_poll_max_ms / 1000.0
    ranks = layout.client_ranks(t.size, cfg.run.server_trains)
    if len(ranks) > cfg.data.num_clients:
        raise config.ConfigError("data.num_clients", f"{len(ranks)} client ranks but only "
                                 f"{cfg.data.num_clients} clients; run with at most "
                                 f"{cfg.data.num_clients + 1} processes")
    t.set_client_ranks(ranks)
    device = layout.pick_device(cfg.run.device, t.local_rank)
    threads = layout.thread_count(cfg.run.threads, t.local_size)
    torch.set_num_threads(threads)
    compute = open_gate(cfg.run.compute_slots, threads, t.bcast_object(job_key()),
                        t.node_allgather, t.local_rank)
    info = data.info(cfg.data)
    path = on_server(t, lambda: output_path(cfg, args.overwrite, args.resume))
    saved = (on_server(t, lambda: resume_state(cfg, path, device, args.restart))
             if args.resume else None)
    if t.bcast_object(saved == "complete"):
        if t.is_server:
            print(f"fedmpi: {path} is already complete; nothing to resume", flush=True)
        return 0
    first = int(t.bcast_object(saved["round"] if isinstance(saved, dict) else 0))

    # 2. data: load and partition on rank 0, shards to their owners ---------------------
    def load_and_split():
        loaded = data.load(cfg)
        return loaded, *data.hold_out(data.partition(loaded, cfg), cfg)

    loaded, parts, held = on_server(t, load_and_split) or (None, None, None)
    sizes = t.bcast_object([len(p) for p in parts] if t.is_server else None)
    owners = layout.assign_clients(sizes, ranks)
    shards = distribute_shards(t, loaded, parts, owners, device)
    max_slots = max(len(c) for c in owners.values())

    # every rank builds the same w^0 from run.seed: round 0 needs no model broadcast
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
    group = None
    if t.rank in owners:
        # rank 0 keeps ``model`` as the server's w^t; a client rank has no other use for it,
        # so its group trains in it (w^0 is copied into global_params): one model less
        group = ClientGroup(cfg, shards, new_model() if t.is_server else model, compressor,
                            spec, normalizer, estimator)
        group.set_global(model.params)
    # oversubscribed node: the ranks behind one compute slot fit 3SFC samples together
    pool = open_pool(t, cfg.run.pool_fits and pooled(compressor), compute, group is not None,
                     compressor.batch_clients, sum(len(s) for s in shards.values()),
                     len(shards))
    if first:  # resume: server state on rank 0, client states to their (new) owners
        restore_run(t, saved, owners, model, down_link, estimator, group)

    server = writer = board = meter = None
    if t.is_server:
        holdout = None
        if cfg.data.client_holdout > 0:  # every client's held-out samples, and whose
            every = np.concatenate(held)
            holdout = (loaded.train.subset(every),
                       np.repeat(np.arange(len(held)), [len(h) for h in held]))
        server = Server(cfg, model, compressor, spec, loaded.test, normalizer, holdout)
        counts = data.class_counts(loaded.train.y, parts, info.num_classes)
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
            writer = metrics.RunWriter.resume(path, first, cfg, t.size, cfg.run.hdf5_swmr)
        else:
            writer = metrics.RunWriter(path, cfg, t.size, cfg.data.num_clients, counts,
                                       attrs={"num_params": model.d,
                                              "dense_bytes": compressor.dense_bytes(),
                                              "owners": str(owners)},
                                       swmr=cfg.run.hdf5_swmr)
        print(f"fedmpi: {cfg.run.name}: {cfg.data.dataset} / {cfg.model.name} "
              f"(d = {model.d:,}), {cfg.data.num_clients} clients on {len(ranks)} client "
              f"rank(s), compressor {compressor.name}, {cfg.run.rounds} rounds -> {path}"
              + (f" (resumed at round {first + 1})" if first else ""), flush=True)
        shown = Progress(cfg.run.rounds, first, terminal_width())
        board = (TensorBoard(path, first, config.to_toml(cfg))
                 if cfg.run.tensorboard else None)

    # 3. rounds ------------------------------------------------------------------------
    header = np.zeros(HEADER + cfg.data.num_clients, dtype=np.int64)
    history = []
    stopped = None  # rank 0: why the run stops early (divergence, a signal), else None
    start = time.perf_counter() - (saved["wall_time"] if first and t.is_server else 0.0)
    last_checkpoint = time.perf_counter()
    cpu0 = time.process_time()
    code = 0
    limit = RoundLimit(cfg.run.round_timeout, t.is_server)
    for rnd in range(first, cfg.run.rounds):
        t0 = time.perf_counter()
        t.reset_counters()
        t.begin_round(rnd, limit.next_round())
        if t.is_server:  # nothing here changes server state: a checkpoint may follow
            due = checkpoint_due(cfg.checkpoint, rnd, first,
                                 time.perf_counter() - last_checkpoint)
            control = ((checkpoint.CONTROL_STOP if stopped else 0)
                       | (checkpoint.CONTROL_CHECKPOINT if due or signals.raised else 0)
                       | (checkpoint.CONTROL_EXIT if signals.raised else 0))
            participants = sample_participants(cfg, rnd)
            synth_fit = estimator.server_fit_cosine()  # of the S this round's clients get
            down = down_link.server_payload(server.params, rnd).to_bytes()
            extra = estimator.server_payload(rnd).to_bytes()
            header[:HEADER] = (rnd, control, down.size, len(participants), extra.size)
            header[HEADER:] = 0
            header[HEADER + np.asarray(participants)] = 1
        t.bcast_header(header)
        control = int(header[1])
        if control & checkpoint.CONTROL_STOP:  # the server stopped the run last round
            break
        if control & checkpoint.CONTROL_CHECKPOINT:
            take_checkpoint(t, cfg, rnd, time.perf_counter() - start, model, down_link,
                            estimator, group, meter)
            last_checkpoint = time.perf_counter()
        if control & checkpoint.CONTROL_EXIT:
            code = checkpoint.EXIT_REQUEUE
            if t.is_server:
                stopped = (f"{checkpoint.signal_name(signals.raised)}: checkpointed before "
                           f"round {rnd + 1}; rerun with --resume")
                print(f"fedmpi: {stopped}", file=sys.stderr, flush=True)
            break
        t.expect_records(2 + max_slots * SLOT)
        participants = [int(i) for i in np.flatnonzero(header[HEADER:])]
        if t.is_server:
            down_client_bytes = (down_link.client_bytes(participants, rnd, down.size)
                                 + extra.size * len(participants))
        else:
            down = np.empty(int(header[2]), dtype=np.uint8)
            extra = np.empty(int(header[4]), dtype=np.uint8)
        t.bcast_payload(down)
        if extra.size:
            t.bcast_payload(extra)

        record = np.zeros(2 + max_slots * SLOT, dtype=np.float64)
        send = np.zeros(0, dtype=np.uint8)
        if group is not None:
            prior = group.global_params.clone() if estimator.wants_global_step else None
            down_link.client_apply(down_link.parse(down, rnd), group.global_params, rnd,
                                   group.model)
            if prior is not None:  # w^t - w^{t-1} as the replica received it
                estimator.client_global_step(group.global_params - prior, rnd)
            estimator.client_receive(estimator.parse(extra, rnd), rnd)
        probing = perturbation.due(cfg.eval, rnd, cfg.run.rounds)
        measured = 0.0  # seconds of rank 0's perturbation measurement (time_eval)
        if probing:  # the true global gradient at w^t to every client rank (plumbing)
            tp = time.perf_counter()
            true_grad = (meter.gradient() if t.is_server
                         else torch.empty(model.d, dtype=torch.float32))
            if t.is_server:  # the previous global update as an ascent estimate
                update_cos = meter.update_cosine(server.params, true_grad)
            true_host = true_grad.cpu().numpy()
            t.bcast_plumbing(true_host)
            if group is not None:
                group.probe = perturbation.Probe(torch.from_numpy(true_host).to(device))
            measured = time.perf_counter() - tp
        if group is not None:
            group.time_train = group.time_encode = 0.0
            if pool is not None:
                pool.before_round()  # a pool member sleeps until its leader has trained
            with compute.slot():  # at most the node's cores worth of ranks compute at once
                results = group.run_round(rnd, participants, pool)
            record[:2] = group.time_train, group.time_encode
            for i, r in enumerate(results):
                record[2 + i * SLOT:2 + (i + 1) * SLOT] = (
                    r.client, 1, r.payload.nbytes, r.train_loss, r.efficiency,
                    r.num_samples, r.steps, r.diverged)
            if results:
                send = np.concatenate([r.payload.to_bytes() for r in results])
        table = t.gather_meta(record)
        counts = (table[:, 2:].reshape(t.size, max_slots, SLOT)[:, :, 2].sum(1)
                  if t.is_server else None)
        gathered = t.gatherv_payloads(send, counts)
        if probing:  # the clients' cosines to rank 0 (plumbing)
            tp = time.perf_counter()
            reports = t.gather_object(group.probe.report() if group is not None else ({}, 0.0))
            if group is not None:
                group.probe = None
            measured += time.perf_counter() - tp

        if not t.is_server:
            continue
        # ---- server: decode, aggregate, evaluate, write --------------------------------
        slots = table[:, 2:].reshape(-1, SLOT)
        slots = slots[slots[:, 1] == 1]  # wire order: by rank, then client id
        wire = [int(c) for c in slots[:, 0]]
        sizes = [int(s) for s in slots[:, 2]]
        by_id = slots[np.argsort(slots[:, 0], kind="stable")]  # rank-count independent sums
        t1 = time.perf_counter()
        diverged = {int(s[0]): int(s[7]) for s in slots if s[7]}  # these sent 0 bytes
        sent = [(c, n) for c, n in zip(wire, sizes, strict=True) if c not in diverged]
        updates = server.decode(rnd, [c for c, _ in sent], [n for _, n in sent], gathered)
        diverged.update({cid: 3 for cid, u in updates.items() if not bool(torch.isfinite(u).all())})
        for cid in diverged:
            updates.pop(cid, None)
        at = f"round {rnd + 1}/{cfg.run.rounds}"  # as the round's console line numbers it
        if diverged and (cfg.run.on_divergence == "stop" or not updates):
            cid = min(diverged)
            stopped = (f"{at}: client {cid}: {DIVERGED[diverged[cid]]} is not finite"
                       f" ({len(diverged)} client(s) diverged; run.on_divergence = "
                       f"{cfg.run.on_divergence!r})")
        elif updates:
            step = server.aggregate(updates, {int(s[0]): int(s[5]) for s in slots})
            before = server.params.clone()
            down_link.server_step(server.params, step, rnd, server.model)
            estimator.server_round_end(before, server.params, rnd, server.model)
            if meter is not None:
                meter.previous = before  # w^t of this round: next round's w^{t-1}
            if not bool(torch.isfinite(server.params).all()):
                stopped = f"{at}: the global model is not finite"
            step = before = None
        aggregated = bool(updates)
        updates = gathered = None  # a round's decoded updates go before the next decodes
        t2 = time.perf_counter()
        last = rnd == cfg.run.rounds - 1
        acc = loss = float("nan")
        client_acc = None
        if (rnd + 1) % cfg.eval.every == 0 or last or stopped:
            acc, loss = server.evaluate()
            client_acc = server.client_accuracy()
            stopped = stopped or diverged_test_loss(loss, at)
        t3 = time.perf_counter()
        sharp_row = {}
        if cfg.eval.sharpness_every and ((rnd + 1) % cfg.eval.sharpness_every == 0 or last):
            sharp_row = sharpness.measure(server.model.module, sharp, normalizer, cfg.eval,
                                          cfg.run.seed, rnd)
            sharp_row["time_sharpness"] = time.perf_counter() - t3
        t4 = time.perf_counter()

        c = t.counters
        n = cfg.data.num_clients
        per_client = {k: np.zeros(n, dtype=dt) for k, dt in
                      (("participation", np.int8), ("uplink_bytes", np.int64),
                       ("steps", np.int64))}
        per_client["train_loss"] = np.full(n, np.nan)
        per_client["efficiency"] = np.full(n, np.nan)
        per_client["diverged"] = np.zeros(n, dtype=np.int8)
        per_client["acc"] = client_acc if client_acc is not None else np.full(n, np.nan)
        probe_row = {"synth_fit_cos": synth_fit}
        if probing:
            per_client["perturb_cos"], mean_cos, client_fit, client_secs = (
                perturbation.summarize(reports, n))
            measured += client_secs  # the slowest client rank's cosines
            probe_row.update(perturb_cos=mean_cos, perturb_cos_update=update_cos)
            if np.isfinite(client_fit):  # FedSynSAM, synth_site = client
                probe_row["synth_fit_cos"] = client_fit
        for cid, why in diverged.items():
            per_client["diverged"][cid] = why
        for s in slots:
            cid = int(s[0])
            per_client["participation"][cid] = 1
            per_client["uplink_bytes"][cid] = int(s[2])
            per_client["train_loss"][cid] = s[3]
            per_client["efficiency"][cid] = s[4]
            per_client["steps"][cid] = int(s[6])
        receivers = len(ranks)
        per_broadcast = c.downlink / receivers if receivers else down.size
        time_train = float(table[:, 0].max())
        time_encode = float(table[:, 1].max())
        round_time = time.perf_counter() - t0
        row = {
            "round": rnd, "wall_time": time.perf_counter() - start,
            "test_acc": acc, "test_loss": loss,
            "client_acc_mean": (float(np.nanmean(client_acc)) if client_acc is not None
                                else float("nan")),
            "train_loss": float(np.mean(by_id[:, 3])), "participants": len(wire),
            "diverged_clients": len(diverged),
            "uplink_bytes": c.uplink, "uplink_payload_bytes": int(sum(sizes)),
            "downlink_payload_bytes": down_client_bytes,
            "transport_downlink_bytes": c.downlink, "transport_meta_bytes": c.meta,
            "compression_ratio_up": uplink_ratio(compressor.dense_bytes(), len(sent), c.uplink),
            "compression_ratio_down": (4 * model.d / per_broadcast if per_broadcast
                                       else float("nan")),
            "efficiency_mean": float(np.nanmean(by_id[:, 4])) if aggregated else float("nan"),
            "time_round": round_time, "time_train": time_train, "time_encode": time_encode,
            "time_decode": t2 - t1, "time_eval": t3 - t2 + measured,
            "time_comm": max(0.0, round_time - time_train - time_encode - (t4 - t1)
                             - measured),
            **sharp_row, **probe_row,
        }
        writer.append(row, per_client)
        history.append(row)
        if board is not None:
            board.add(row)
        if not args.quiet:
            print(shown.line(row), flush=True)
        if stopped:
            print(f"fedmpi: stopping: {stopped}", file=sys.stderr, flush=True)

    # 4. finish -------------------------------------------------------------------------
    t.quiet_barrier()  # (blocking MPI calls spin: 40 such ranks slow rank 0's last round)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    per_rank = t.gather_object((usage.ru_maxrss / 1024.0, time.process_time() - cpu0,
                                len(compute.paths), pool.size if pool else 0,
                                pool.fitted if pool else 0, pss_mb()))
    if pool is not None:
        pool.close()
    compute.close()
    if t.is_server:
        attrs = {"peak_rss_mb": np.asarray([r[0] for r in per_rank]),
                 "cpu_seconds": np.asarray([r[1] for r in per_rank]),
                 "compute_slots": np.asarray([r[2] for r in per_rank]),
                 "fit_pool_size": np.asarray([r[3] for r in per_rank]),
                 "fit_pool_fitted": np.asarray([r[4] for r in per_rank]),
                 "pss_mb": np.asarray([r[5] for r in per_rank])}
        if stopped:
            attrs["stopped"] = stopped
            code = code or 3
        writer.close(complete=code == 0, attrs=attrs)
        if code == 0:  # success only for a file that reads back complete
            metrics.verify_complete(path, cfg.run.rounds)
        if board is not None:
            board.close()
        if history:
            print(summary(path, cfg.run.name, stopped), flush=True)
    return int(t.bcast_object(code))


def checkpoint_due(ck: config.CheckpointConfig, rnd: int, first: int, since: float) -> bool:
    """Rank 0: checkpoint at the top of round ``rnd``? Every ``ck.every`` rounds, and once
    ``ck.every_seconds`` of wall time have passed since the last checkpoint (or the start);
    never at the round this process started at (that state is on disk already)."""
    if rnd == first:
        return False
    return bool(ck.every and rnd % ck.every == 0) or bool(
        ck.every_seconds and since >= ck.every_seconds)


def diverged_test_loss(loss: float, at: str) -> str | None:
    """Why the run stops when the global model's test loss is NaN / Inf (whatever
    run.on_divergence says: "skip" leaves out diverged clients, not a diverged model)."""
    if np.isfinite(loss):
        return None
    return f"{at}: the global model's test loss is not finite ({loss})"


def uplink_ratio(dense_bytes: int, senders: int, uplink: int) -> float:
    """Dense fp32 bytes of the clients that sent an update / the bytes they sent; NaN when
    nothing was sent (every participant diverged), not dense / 1 byte."""
    return dense_bytes * senders / uplink if uplink else float("nan")


def pss_mb() -> float:
    """This process's proportional set size now, MiB (Linux; NaN elsewhere): its private
    pages plus each shared page divided by the processes that map it, so that the ranks'
    sum is the job's physical memory (RSS counts a shared page once per rank)."""
    try:
        with open("/proc/self/smaps_rollup") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("Pss:")) / 1024
    except (OSError, StopIteration, ValueError):
        return float("nan")


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


def take_checkpoint(t: Transport, cfg, rnd: int, elapsed: float, model, down_link,
                    estimator, group, meter=None) -> None:
    """Every rank: send client states to rank 0, which writes the checkpoint atomically."""
    mine = ({cid: group.states[cid] for cid in group.clients}, group.global_params.cpu()
            ) if group is not None else ({}, None)
    gathered = t.gather_object(mine)
    if not t.is_server:
        return
    clients: dict = {}
    for states, _ in gathered:
        clients.update(states)
    replica = next(r for _, r in gathered if r is not None)
    checkpoint.save(checkpoint.path_for(cfg), {
        "round": rnd, "config": config.to_toml(cfg), "wall_time": elapsed,
        "params": model.params.cpu(), "replica": replica, "clients": clients,
        "downlink": checkpoint.object_state(down_link),
        "estimator": checkpoint.object_state(estimator),
        "previous_params": (meter.previous.cpu() if meter is not None
                            and meter.previous is not None else None)})


def restore_run(t: Transport, saved, owners, model, down_link, estimator, group) -> None:
    """Rank 0 restores the server state and sends each client rank its clients' states."""
    if t.is_server:
        model.params.copy_(saved["params"])
        checkpoint.restore(down_link, saved["downlink"])
        checkpoint.restore(estimator, saved["estimator"])
        for r, cids in owners.items():
            part = ({c: saved["clients"][c] for c in cids}, saved["replica"])
            if r == SERVER:
                mine = part
            else:
                t.send_object(r, part)
    elif group is not None:
        mine = t.recv_object(SERVER)
    if group is not None:
        states, replica = mine
        group.states.update(states)
        group.set_global(replica.to(group.global_params.device))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t = Transport()
    try:
        code = run(args, t)
    except (StopRun, *USER_ERRORS) as exc:
        if t.is_server and str(exc):
            print(f"fedmpi: error: {exc}", file=sys.stderr, flush=True)
        code = 2
    except FATAL as exc:  # a frozen rank, a full disk: one message, no traceback
        sys.stderr.write(f"fedmpi: error: {exc}\n")
        if t.size > 1:
            t.abort(1)
        code = 1
    except KeyboardInterrupt:  # Ctrl-C before the round loop could take it over
        if t.is_server:
            print("fedmpi: interrupted before the first round", file=sys.stderr, flush=True)
        if t.size > 1:
            t.abort(130)
        code = 130
    except BaseException:
        sys.stderr.write(f"fedmpi: rank {t.rank} of {t.size} failed:\n"
                         + traceback.format_exc())
        sys.stderr.flush()
        if t.size > 1:
            t.abort(1)
        code = 1
    release_all()  # the run file's lock (rank 0)
    finalize_and_exit(code)


if __name__ == "__main__":
    main()
