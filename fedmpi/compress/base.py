"""The compressor interface: ``Payload`` (the wire format), ``Compressor``, ``ErrorFeedback``.

A compressor is a pair of pure functions with explicit state (fedjax style):

* ``encode(update, state, ctx) -> (payload, state)`` on the client that owns ``state``;
* ``decode(payload, ctx) -> update`` on the server (and on the client, for error feedback
  and for the compression-efficiency telemetry).

``update`` is the flat fp32 vector ``w_local - w_global`` (descent direction, learning
rate included) on the rank's device. A :class:`Payload` is an ordered set of named flat
numpy arrays; ``Payload.nbytes`` is exactly the number of bytes that go on the wire, and
:meth:`Payload.to_bytes` / :meth:`Compressor.parse` turn it into one contiguous byte buffer
and back with no header and no padding. The server only ever sees bytes: it calls
``parse`` and then ``decode``. A compressor whose layout varies from round to round (STC's
Golomb stream, say) puts the lengths it needs into its own counted fields.

Error feedback is one wrapper (:class:`ErrorFeedback`) around any compressor, never code
inside one: ``u = update + e;  m = C(u);  e <- u - D(m)``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch


@dataclass(frozen=True)
class Payload:
    """Named flat arrays in wire order. ``nbytes`` is exactly what is sent."""

    fields: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        for name, arr in self.fields.items():
            if not isinstance(arr, np.ndarray) or arr.ndim != 1:
                raise TypeError(f"payload field {name!r} must be a flat numpy array")

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.fields.values())

    def __getitem__(self, name: str) -> np.ndarray:
        return self.fields[name]

    def to_bytes(self) -> np.ndarray:
        """One contiguous uint8 buffer: the fields' raw bytes back to back."""
        if not self.fields:
            return np.zeros(0, dtype=np.uint8)
        return np.concatenate(
            [np.ascontiguousarray(a).view(np.uint8).reshape(-1) for a in self.fields.values()])

    @staticmethod
    def from_bytes(buf: np.ndarray, spec: Sequence[tuple[str, Any, int]]) -> Payload:
        """Split ``buf`` (uint8) into fields by ``spec`` = [(name, dtype, count), ...]."""
        buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
        out, offset = {}, 0
        for name, dtype, count in spec:
            dt = np.dtype(dtype)
            size = dt.itemsize * int(count)
            if offset + size > buf.size:
                raise ValueError(f"payload too short for field {name!r}: need "
                                 f"{offset + size} bytes, have {buf.size}")
            out[name] = buf[offset:offset + size].view(dt).copy()
            offset += size
        if offset != buf.size:
            raise ValueError(f"payload has {buf.size - offset} trailing bytes")
        return Payload(out)


@dataclass
class ModelSpec:
    """What a compressor may know about the model it compresses updates of."""

    d: int  #: number of parameters
    shapes: list[tuple[int, ...]]  #: parameter tensor shapes, in flat order
    input_shape: tuple[int, ...] = ()  #: one sample's input shape (3SFC synthesises inputs)
    num_classes: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(s)) if s else 1 for s in self.shapes]


@dataclass
class Context:
    """Per call information: round, client, the model and its global weights w^t."""

    round: int
    client: int  #: client id (-1 for the server's own downlink encoding)
    seed: int
    spec: ModelSpec
    global_params: torch.Tensor | None = None  #: flat w^t (3SFC decodes at w^t)
    #: a fedmpi.models.FlatModel for model-based codecs (3SFC). Its weights are scratch:
    #: load ``global_params`` into it before use; it may be left changed.
    model: Any = None
    #: the client's own update Delta before error feedback adds its residual (set by
    #: :class:`ErrorFeedback`; None without it, where the compressed vector is Delta)
    update: torch.Tensor | None = None
    #: where a compressor that fits (:attr:`Compressor.fits`) runs its batched fit: None =
    #: here; else ``fit(round, solver, targets, x0, y0) -> fedmpi.synth.FitResult`` (a
    #: :meth:`fedmpi.fitpool.FitPool.fit`), called once per encode call with every
    #: client's problems, which must then share ``global_params``, ``model`` and ``fit``
    fit: Callable[..., Any] | None = None

    def numpy_rng(self, tag: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, tag, self.round, self.client + 1])

    def torch_generator(self, tag: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(self.numpy_rng(tag).integers(0, 2**62)))
        return g


class Compressor(ABC):
    """Base class. Subclasses set ``name`` and ``Config`` and implement the three methods."""

    name: ClassVar[str]
    #: ``compressor.ef`` when the config leaves it unset (3SFC: true, as in the paper)
    ef_default: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Config:
        """The compressor's own config keys ([compressor] table, beside name and ef)."""

        def validate(self) -> None:
            pass

    def __init__(self, cfg: Any, spec: ModelSpec):
        self.cfg = cfg
        self.spec = spec

    # state ----------------------------------------------------------------
    def init_state(self, client: int) -> Any:
        """Fresh per-client state (None for a stateless compressor)."""
        return None

    # the pair ---------------------------------------------------------------
    @abstractmethod
    def encode(self, update: torch.Tensor, state: Any, ctx: Context) -> tuple[Payload, Any]:
        ...

    @abstractmethod
    def decode(self, payload: Payload, ctx: Context) -> torch.Tensor:
        ...

    @abstractmethod
    def parse(self, buf: np.ndarray, ctx: Context) -> Payload:
        """Rebuild the payload from its wire bytes alone."""
        ...

    # synthetic-feature fits ---------------------------------------------------
    #: whether encoding fits synthetic features (3SFC, FedSynth): such fits may run
    #: elsewhere (:attr:`Context.fit`, :mod:`fedmpi.fitpool`), given :meth:`solver`
    fits: ClassVar[bool] = False

    def solver(self, model: Any, global_params: torch.Tensor) -> Any:
        """The fit of this compressor's problems at ``global_params`` (w^t) with ``model``
        (a :class:`fedmpi.synth.Solver`): what a fit pool's leader runs for its members,
        who share w^t. Only where :attr:`fits`."""
        raise NotImplementedError(f"{self.name} fits nothing")

    # batched forms -----------------------------------------------------------
    #: how many clients a rank should hand to ``encode_many`` / ``decode_many`` at once;
    #: > 1 only where batching across clients is faster and gives the same result (3SFC)
    batch_clients: int = 1

    def encode_many(self, updates: list[torch.Tensor], states: list[Any],
                    ctxs: list[Context]) -> list[tuple[Payload, Any]]:
        """``encode`` for several clients; override where a batched form is faster."""
        return [self.encode(u, s, c) for u, s, c in zip(updates, states, ctxs, strict=True)]

    def decode_many(self, payloads: list[Payload], ctxs: list[Context]) -> list[torch.Tensor]:
        """``decode`` for several payloads; override where a batched form is faster."""
        return [self.decode(p, c) for p, c in zip(payloads, ctxs, strict=True)]

    # client entry point -----------------------------------------------------
    def compress_many(self, updates: list[torch.Tensor], states: list[Any],
                      ctxs: list[Context]
                      ) -> list[tuple[Payload, Any, torch.Tensor, torch.Tensor]]:
        """encode, plus what the client reports: ``(payload, state, decoded, target)``.

        ``target`` is the vector the compressor tried to transmit (the update, plus the
        residual under error feedback); ``cos(decoded, target)`` is the compression
        efficiency.
        """
        encoded = self.encode_many(updates, states, ctxs)
        decoded = self.decode_many([p for p, _ in encoded], ctxs)
        return [(p, s, d, u) for (p, s), d, u in zip(encoded, decoded, updates, strict=True)]

    def compress(self, update: torch.Tensor, state: Any, ctx: Context
                 ) -> tuple[Payload, Any, torch.Tensor, torch.Tensor]:
        """:meth:`compress_many` for one client."""
        return self.compress_many([update], [state], [ctx])[0]

    def dense_bytes(self) -> int:
        return 4 * self.spec.d


@dataclass
class EFState:
    residual: torch.Tensor
    inner: Any = None


class ErrorFeedback(Compressor):
    """Error feedback around any compressor: ``u = update + e; m = C(u); e = u - D(m)``."""

    def __init__(self, inner: Compressor):
        super().__init__(inner.cfg, inner.spec)
        self.inner = inner
        self.name = f"ef({inner.name})"  # type: ignore[misc]
        self.batch_clients = inner.batch_clients
        self.fits = inner.fits  # type: ignore[misc]

    def solver(self, model, global_params):
        return self.inner.solver(model, global_params)

    def init_state(self, client: int) -> EFState:
        zeros = torch.zeros(self.spec.d, dtype=torch.float32, device=self.spec.device)
        return EFState(residual=zeros, inner=self.inner.init_state(client))

    def compress_many(self, updates, states, ctxs):
        targets = [u + s.residual for u, s in zip(updates, states, strict=True)]
        ctxs = [dataclasses.replace(c, update=u) for c, u in zip(ctxs, updates, strict=True)]
        encoded = self.inner.encode_many(targets, [s.inner for s in states], ctxs)
        decoded = self.inner.decode_many([p for p, _ in encoded], ctxs)
        return [(p, EFState(residual=t - d, inner=s), d, t)
                for (p, s), d, t in zip(encoded, decoded, targets, strict=True)]

    def encode(self, update, state, ctx):
        payload, new, _, _ = self.compress(update, state, ctx)
        return payload, new

    def decode(self, payload, ctx):
        return self.inner.decode(payload, ctx)

    def decode_many(self, payloads, ctxs):
        return self.inner.decode_many(payloads, ctxs)

    def parse(self, buf, ctx):
        return self.inner.parse(buf, ctx)

    def dense_bytes(self) -> int:
        return self.inner.dense_bytes()

