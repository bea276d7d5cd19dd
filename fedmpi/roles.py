"""The two roles of a round and the messages they exchange (:mod:`fedmpi.protocol`).

* :class:`ServerRole` (rank 0): samples the participants, says what the round does (a
  :class:`~fedmpi.protocol.RoundHeader`), makes the broadcasts (downlink, the SAM
  estimator's, the algorithm's), then decodes the gathered uploads, lets the algorithm's
  server half aggregate them, applies the step through the downlink, evaluates and
  writes the round's row.
* :class:`ClientRole` (every rank that owns clients; rank 0 too with one process or
  ``run.server_trains``): brings its replica of w^t up to date from the broadcasts,
  trains and encodes its participating clients (:class:`fedmpi.client.ClientGroup`) and
  reports a :class:`~fedmpi.protocol.RankReport` and the payload bytes.

The functions below move the messages over the transport; every rank calls each of
them in the same order (``server`` / ``client``: this rank's role, or None).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch

import fedmpi.perturbation as perturbation
from fedmpi import checkpoint, config, metrics, sharpness
from fedmpi.client import DIVERGED
from fedmpi.comm import Transport
from fedmpi.protocol import ClientRecord, Layout, RankReport, RoundHeader
from fedmpi.server import sample_participants

EMPTY = np.zeros(0, dtype=np.uint8)


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


class ClientRole:
    """A client rank: its clients (``group``), the client halves of the downlink, the
    estimator and the algorithm, the compute gate and fit pool."""

    def __init__(self, group, down_link, estimator, compute, pool, device):
        self.group, self.down_link, self.estimator = group, down_link, estimator
        self.algorithm = group.algorithm
        self.compute, self.pool, self.device = compute, pool, device

    def receive(self, rnd: int, down: np.ndarray, extra: np.ndarray, alg: np.ndarray) -> None:
        """The round's broadcasts: the replica becomes w^t; the estimator and the
        algorithm get theirs."""
        group, est = self.group, self.estimator
        prior = group.global_params.clone() if est.wants_global_step else None
        self.down_link.client_apply(self.down_link.parse(down, rnd), group.global_params, rnd,
                                    group.model)
        if prior is not None:  # w^t - w^{t-1} as the replica received it
            est.client_global_step(group.global_params - prior, rnd)
        est.client_receive(est.parse(extra, rnd), rnd)
        self.algorithm.receive(self.algorithm.parse(alg), rnd)

    def train(self, rnd: int, participants: list[int]) -> tuple[RankReport, np.ndarray]:
        """Train and encode this rank's participants: the report and the payload bytes."""
        group = self.group
        group.time_train = group.time_encode = 0.0
        if self.pool is not None:
            self.pool.before_round()  # a pool member sleeps until its leader has trained
        with self.compute.slot():  # at most the node's cores worth of ranks compute at once
            results = group.run_round(rnd, participants, self.pool)
        names = self.algorithm.uploads
        report = RankReport(group.time_train, group.time_encode, [ClientRecord(
            r.client, tuple(r.payloads[n].nbytes if n in r.payloads else 0 for n in names),
            r.train_loss, r.efficiency, r.num_samples, r.steps, r.diverged) for r in results])
        send = np.concatenate([r.to_bytes() for r in results]) if results else EMPTY
        return report, send

    def states(self) -> tuple[dict, torch.Tensor]:
        """For a checkpoint: the clients' states and the replica of the global model."""
        return {cid: self.group.states[cid] for cid in self.group.clients}, \
            self.group.global_params.cpu()


class ServerRole:
    """Rank 0: the global model and everything the server keeps between rounds."""

    def __init__(self, cfg, server, compressor, down_link, estimator, algorithm, layout,
                 writer, meter, sharp, board, progress, quiet: bool, first: int,
                 start: float, receivers: int):
        self.cfg, self.server, self.compressor = cfg, server, compressor
        self.down_link, self.estimator, self.algorithm = down_link, estimator, algorithm
        self.layout, self.writer, self.meter, self.sharp = layout, writer, meter, sharp
        self.board, self.progress, self.quiet = board, progress, quiet
        self.first, self.start, self.receivers = first, start, receivers
        self.last_checkpoint = time.perf_counter()
        self.stopped: str | None = None  #: why the run stops early, else None
        self.history: list[dict] = []

    # ---- top of the round: nothing here changes server state (a checkpoint may follow)
    def open_round(self, rnd: int, signals: checkpoint.SignalFlag) -> RoundHeader:
        due = checkpoint_due(self.cfg.checkpoint, rnd, self.first,
                             time.perf_counter() - self.last_checkpoint)
        control = ((checkpoint.CONTROL_STOP if self.stopped else 0)
                   | (checkpoint.CONTROL_CHECKPOINT if due or signals.raised else 0)
                   | (checkpoint.CONTROL_EXIT if signals.raised else 0))
        participants = sample_participants(self.cfg, rnd)
        self.synth_fit = self.estimator.server_fit_cosine()  # of the S this round's clients get
        self.down = self.down_link.server_payload(self.server.params, rnd).to_bytes()
        self.extra = self.estimator.server_payload(rnd).to_bytes()
        self.alg = self.algorithm.broadcast(rnd).to_bytes()
        return RoundHeader(rnd, control, self.down.size, participants, self.extra.size,
                           self.alg.size)

    def signalled(self, rnd: int, signals: checkpoint.SignalFlag) -> None:
        self.stopped = (f"{checkpoint.signal_name(signals.raised)}: checkpointed before "
                        f"round {rnd + 1}; rerun with --resume")
        print(f"fedmpi: {self.stopped}", file=sys.stderr, flush=True)

    def broadcasts(self, header: RoundHeader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The round goes ahead: count what the participants download, hand out the bytes."""
        n = len(header.participants)
        self.down_client_bytes = (self.down_link.client_bytes(header.participants,
                                                              header.round, self.down.size)
                                  + (self.extra.size + self.alg.size) * n)
        return self.down, self.extra, self.alg

    # ---- end of the round ----------------------------------------------------------
    def close_round(self, rnd: int, table: np.ndarray, gathered: np.ndarray,
                    counters: Any, probe: Probing | None, t0: float) -> None:
        """Decode, aggregate, step, evaluate, write the row (and say so)."""
        cfg, server = self.cfg, self.server
        reports = RankReport.unpack_table(table, self.layout)
        records = [rec for rep in reports for rec in rep.clients]  # by rank, then id
        t1 = time.perf_counter()
        diverged = {r.client: r.diverged for r in records if r.diverged}  # sent 0 bytes
        sent = [(r.client, r.payload_bytes) for r in records if r.client not in diverged]
        decoded = server.decode_uploads(rnd, self.layout.uploads, sent, gathered)
        for by_client in decoded.values():
            diverged.update({cid: 3 for cid, u in by_client.items()
                             if not bool(torch.isfinite(u).all())})
        for by_client in decoded.values():
            for cid in diverged:
                by_client.pop(cid, None)
        updates = decoded[self.layout.uploads[0]]
        at = f"round {rnd + 1}/{cfg.run.rounds}"  # as the round's console line numbers it
        if diverged and (cfg.run.on_divergence == "stop" or not updates):
            cid = min(diverged)
            self.stopped = (f"{at}: client {cid}: {DIVERGED[diverged[cid]]} is not finite"
                            f" ({len(diverged)} client(s) diverged; run.on_divergence = "
                            f"{cfg.run.on_divergence!r})")
        elif updates:
            step = self.algorithm.aggregate(decoded, {r.client: r.num_samples for r in records},
                                            server.params)
            before = server.params.clone()
            self.down_link.server_step(server.params, step, rnd, server.model)
            self.estimator.server_round_end(before, server.params, rnd, server.model)
            if self.meter is not None:
                self.meter.previous = before  # w^t of this round: next round's w^{t-1}
            if not bool(torch.isfinite(server.params).all()):
                self.stopped = f"{at}: the global model is not finite"
            step = before = None
        aggregated = bool(updates)
        decoded = updates = gathered = None  # a round's decoded updates go before the next
        t2 = time.perf_counter()
        last = rnd == cfg.run.rounds - 1
        acc = loss = float("nan")
        client_acc = None
        if (rnd + 1) % cfg.eval.every == 0 or last or self.stopped:
            acc, loss = server.evaluate()
            client_acc = server.client_accuracy()
            self.stopped = self.stopped or diverged_test_loss(loss, at)
        t3 = time.perf_counter()
        extra: dict[str, Any] = {}
        if cfg.eval.sharpness_every and ((rnd + 1) % cfg.eval.sharpness_every == 0 or last):
            extra = sharpness.measure(server.model.module, self.sharp, server.normalize,
                                      cfg.eval, cfg.run.seed, rnd)
            extra["time_sharpness"] = time.perf_counter() - t3
        t4 = time.perf_counter()
        extra["synth_fit_cos"] = self.synth_fit
        per_client, measured = probe.summarize(extra) if probe is not None else ({}, 0.0)
        times = metrics.RoundTimes(
            round=time.perf_counter() - t0, train=max(r.time_train for r in reports),
            encode=max(r.time_encode for r in reports), decode=t2 - t1,
            eval=t3 - t2 + measured, server=t4 - t1, measured=measured)
        row, clients = metrics.round_row(
            rnd, time.perf_counter() - self.start, records, diverged, cfg.data.num_clients,
            counters, times, acc=acc, loss=loss, client_acc=client_acc, aggregated=aggregated,
            dense_bytes=self.compressor.dense_bytes() * len(self.layout.uploads),
            num_params=server.model.d, receivers=self.receivers, down_size=self.down.size,
            down_client_bytes=self.down_client_bytes, per_client=per_client, extra=extra)
        self.writer.append(row, clients)
        self.history.append(row)
        if self.board is not None:
            self.board.add(row)
        if not self.quiet:
            print(self.progress.line(row), flush=True)
        if self.stopped:
            print(f"fedmpi: stopping: {self.stopped}", file=sys.stderr, flush=True)


# ---- the messages over the transport (every rank, in this order) ---------------------
def exchange_header(transport: Transport, layout: Layout, header: RoundHeader | None
                    ) -> RoundHeader:
    """rank 0's header to every rank."""
    buf = layout.header_buffer()
    if header is not None:
        header.pack(buf, layout)
    transport.bcast_header(buf)
    return RoundHeader.unpack(buf, layout)


def exchange_broadcasts(transport: Transport, header: RoundHeader, server: ServerRole | None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The downlink, estimator and algorithm payloads to every rank (counted)."""
    if server is not None:
        bufs = server.broadcasts(header)
    else:
        bufs = tuple(np.empty(n, dtype=np.uint8) for n in (
            header.downlink_bytes, header.estimator_bytes, header.algorithm_bytes))
    transport.bcast_payload(bufs[0])
    for buf in bufs[1:]:
        if buf.size:
            transport.bcast_payload(buf)
    return bufs


def exchange_reports(transport: Transport, layout: Layout, report: RankReport,
                     send: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Every rank's report, then every rank's payload bytes, to rank 0."""
    table = transport.gather_meta(report.pack(layout))
    counts = ([sum(r.nbytes for r in rep.clients)
               for rep in RankReport.unpack_table(table, layout)]
              if transport.is_server else None)
    return table, transport.gatherv_payloads(send, counts)


class Probing:
    """Perturbation accuracy in a measured round (:mod:`fedmpi.perturbation`): the true
    global gradient to the client ranks and their cosines back (plumbing, never counted)."""

    def __init__(self, transport: Transport, server: ServerRole | None,
                 client: ClientRole | None, d: int, num_clients: int):
        tp = time.perf_counter()
        self.transport, self.client, self.num_clients = transport, client, num_clients
        true_grad = (server.meter.gradient() if server is not None
                     else torch.empty(d, dtype=torch.float32))
        if server is not None:  # the previous global update as an ascent estimate
            self.update_cos = server.meter.update_cosine(server.server.params, true_grad)
        true_host = true_grad.cpu().numpy()
        transport.bcast_plumbing(true_host)
        if client is not None:
            client.group.probe = perturbation.Probe(
                torch.from_numpy(true_host).to(client.device))
        self.seconds = time.perf_counter() - tp

    def gather(self) -> None:
        """The clients' cosines to rank 0."""
        tp = time.perf_counter()
        group = self.client.group if self.client is not None else None
        self.reports = self.transport.gather_object(
            group.probe.report() if group is not None else ({}, 0.0))
        if group is not None:
            group.probe = None
        self.seconds += time.perf_counter() - tp

    def summarize(self, row: dict[str, Any]) -> tuple[dict[str, np.ndarray], float]:
        """Rank 0: the per-client cosines and the seconds measured; the row's scalars."""
        cos, mean_cos, client_fit, client_secs = perturbation.summarize(self.reports,
                                                                        self.num_clients)
        row.update(perturb_cos=mean_cos, perturb_cos_update=self.update_cos)
        if np.isfinite(client_fit):  # FedSynSAM, synth_site = client
            row["synth_fit_cos"] = client_fit
        return {"perturb_cos": cos}, self.seconds + client_secs  # the slowest client rank's
