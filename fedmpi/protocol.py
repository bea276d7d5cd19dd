"""The round's messages: what the server and client ranks say to each other, by name.

Every round, over :class:`fedmpi.comm.Transport` (buffer mode, no pickling):

1. rank 0 -> all: a :class:`RoundHeader` (int64): round, control bits
   (:data:`fedmpi.checkpoint.CONTROL_STOP` / ``_CHECKPOINT`` / ``_EXIT``), the byte sizes
   of the round's broadcasts and the participants (a 0/1 mask over the clients);
2. rank 0 -> all: the broadcasts, in order: the downlink payload (:mod:`fedmpi.downlink`),
   the SAM estimator's payload and the algorithm's (each only when it has bytes);
3. all -> rank 0: one :class:`RankReport` (float64, fixed size: :class:`Layout`) per
   rank, its train/encode seconds and a :class:`ClientRecord` per participating client
   it owns (telemetry outside the counted payloads, and each payload's byte size);
4. all -> rank 0: the payload bytes (Gatherv), per rank its clients in id order and per
   client the algorithm's uploads in their declared order.

:class:`Layout` fixes the buffer sizes every rank agrees on before the first round.
FedAvg's layout (one upload, no algorithm broadcast) is 5 + N header words and 8 words
per client slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedmpi import checkpoint

#: the header's words before the participant mask (``algorithm_bytes`` only where the
#: algorithm broadcasts)
HEADER_FIELDS = ("round", "control", "downlink_bytes", "num_participants", "estimator_bytes")


@dataclass(frozen=True)
class Layout:
    """The fixed sizes of a job's round messages."""

    num_clients: int
    max_slots: int  #: the most clients one rank owns
    uploads: tuple[str, ...]  #: the algorithm's upload names, in wire order
    algorithm_broadcasts: bool  #: whether the header carries ``algorithm_bytes``

    @property
    def header_words(self) -> int:
        return len(HEADER_FIELDS) + int(self.algorithm_broadcasts)

    def header_buffer(self) -> np.ndarray:
        return np.zeros(self.header_words + self.num_clients, dtype=np.int64)

    @property
    def slot_words(self) -> int:
        """One client's record: id, participated, a size per upload, loss, efficiency,
        samples, steps, divergence code."""
        return 7 + len(self.uploads)

    @property
    def record_words(self) -> int:
        return 2 + self.max_slots * self.slot_words


@dataclass
class RoundHeader:
    round: int
    control: int
    downlink_bytes: int
    participants: list[int]
    estimator_bytes: int = 0
    algorithm_bytes: int = 0

    def pack(self, buf: np.ndarray, layout: Layout) -> np.ndarray:
        words = [self.round, self.control, self.downlink_bytes, len(self.participants),
                 self.estimator_bytes] + ([self.algorithm_bytes]
                                          if layout.algorithm_broadcasts else [])
        buf[:layout.header_words] = words
        buf[layout.header_words:] = 0
        buf[layout.header_words + np.asarray(self.participants, dtype=np.int64)] = 1
        return buf

    @classmethod
    def unpack(cls, buf: np.ndarray, layout: Layout) -> RoundHeader:
        named = dict(zip(HEADER_FIELDS, (int(v) for v in buf), strict=False))
        return cls(round=named["round"], control=named["control"],
                   downlink_bytes=named["downlink_bytes"],
                   participants=[int(i) for i in np.flatnonzero(buf[layout.header_words:])],
                   estimator_bytes=named["estimator_bytes"],
                   algorithm_bytes=(int(buf[len(HEADER_FIELDS)])
                                    if layout.algorithm_broadcasts else 0))

    @property
    def stop(self) -> bool:
        """The server stopped the run in the previous round."""
        return bool(self.control & checkpoint.CONTROL_STOP)

    @property
    def checkpoint(self) -> bool:
        return bool(self.control & checkpoint.CONTROL_CHECKPOINT)

    @property
    def exit(self) -> bool:
        """Leave after the checkpoint (a signal asked for it)."""
        return bool(self.control & checkpoint.CONTROL_EXIT)


@dataclass
class ClientRecord:
    """One participating client's report to the server (beside its payload bytes)."""

    client: int
    payload_bytes: tuple[int, ...]  #: per upload, in the algorithm's order
    train_loss: float
    efficiency: float
    num_samples: int
    steps: int
    diverged: int = 0  #: a fedmpi.client.DIVERGED code (such a client sent 0 bytes)

    @property
    def nbytes(self) -> int:
        return int(sum(self.payload_bytes))

    def pack(self, out: np.ndarray) -> None:
        out[:] = (self.client, 1, *self.payload_bytes, self.train_loss, self.efficiency,
                  self.num_samples, self.steps, self.diverged)

    @classmethod
    def unpack(cls, row: np.ndarray, uploads: int) -> ClientRecord:
        client, _, *rest = row
        sizes, (loss, efficiency, samples, steps, diverged) = rest[:uploads], rest[uploads:]
        return cls(int(client), tuple(int(s) for s in sizes), float(loss), float(efficiency),
                   int(samples), int(steps), int(diverged))


@dataclass
class RankReport:
    """One rank's round record: its seconds training and encoding, its clients."""

    time_train: float = 0.0
    time_encode: float = 0.0
    clients: list[ClientRecord] = field(default_factory=list)

    def pack(self, layout: Layout) -> np.ndarray:
        out = np.zeros(layout.record_words, dtype=np.float64)
        out[:2] = self.time_train, self.time_encode
        w = layout.slot_words
        for i, rec in enumerate(self.clients):
            rec.pack(out[2 + i * w:2 + (i + 1) * w])
        return out

    @classmethod
    def unpack(cls, row: np.ndarray, layout: Layout) -> RankReport:
        slots = row[2:].reshape(layout.max_slots, layout.slot_words)
        return cls(float(row[0]), float(row[1]),
                   [ClientRecord.unpack(s, len(layout.uploads)) for s in slots if s[1] == 1])

    @staticmethod
    def unpack_table(table: np.ndarray, layout: Layout) -> list[RankReport]:
        """Rank 0: the gathered (ranks x record_words) table, one report per rank."""
        return [RankReport.unpack(row, layout) for row in table]
