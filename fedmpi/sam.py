"""Perturbation estimators for sharpness-aware FL: "which direction should a client climb?"

An estimator knows nothing of compression (any estimator x any compressor). Hooks, in
the order a round calls them:

* server, start of round t: :meth:`Estimator.server_payload` -- extra downlink the
  estimator needs on the clients (empty by default; its bytes are counted as downlink);
* client rank: :meth:`Estimator.client_global_step` with w^t - w^{t-1} as the rank's
  replica reconstructed it from the downlink (only where ``wants_global_step``), then
  :meth:`Estimator.client_receive` with the estimator's payload;
* client, before local training: :meth:`Estimator.begin_client`;
* client, every local step k: :meth:`Estimator.perturbation` returns the flat ascent
  vector eps at the current iterate (or None for no ascent); the step's gradient is
  taken at ``w + eps``; then :meth:`Estimator.descent` may alter that gradient in place;
* server, after the step: :meth:`Estimator.server_round_end` with w^t and w^{t+1}.

One instance lives on every rank; with one process the server and client halves share
it, so they keep separate attributes (``_srv_*`` and the rest).

Every ascent is ``eps = rho g / (||g||_2 + 1e-12)`` with the *global* L2 norm over all
parameter tensors (SAM, Foret et al., ICLR 2021), or with ``sam.adaptive`` ASAM's
``eps = rho T^2 g / (||T g||_2 + 1e-12)``, ``T = |w|`` elementwise (Kwon et al., ICML
2021; T as in the FL-Simulator ``ESAM`` optimizer, applied to every tensor). Only the
direction ``g`` differs between estimators (docs/algorithms.md §0.1, §3). ``rho = 0`` gives
``eps = 0`` exactly, i.e. plain local SGD (mofedsam: with ``alpha = 1``).

Estimators and their extra downlink (uplink is never touched):

* ``none``: plain local SGD. 0 B.
* ``fedsam``: FedSAM (Qu et al., "Generalized Federated Learning via Sharpness Aware
  Minimization", ICML 2022; Caldarola et al., ECCV 2022): g = the local minibatch
  gradient at the current iterate (two passes per step). 0 B.
* ``mofedsam``: MoFedSAM (Qu et al., ICML 2022; FL-Simulator ``client/mofedsam.py``,
  ``server/MoFedSAM.py``): FedSAM's ascent, descent ``alpha grad(w + eps) + (1 - alpha)
  Delta_g`` with the global momentum ``Delta_g = -Delta^{t-1} / (K_i eta_i)``, the previous
  round's mean update ``Delta^{t-1} = (w^t - w^{t-1}) / server.lr`` expressed as a per-step
  gradient of this client (K_i local steps at learning rate eta_i). Round 0: Delta_g = 0.
  Downlink field ``delta``: ``4 d`` B per participant from round 1 on (0 B in round 0).
* ``fedlesam``: FedLESAM (Fan et al., "Locally Estimated Global Perturbations are Better
  than Local Perturbations for Federated Sharpness-aware Minimization", ICML 2024):
  g = w^{t'} - w^t, a previous global model minus the current one, normalised with the
  global L2 norm and fixed for the whole round (one pass per step). ``sam.lesam_source``
  says where w^{t'} - w^t comes from:

  - ``server`` (default; the public code, MediaBrain-SJTU/FedLESAM ``server/FedLESAM.py``
    and ``client/fedlesam.py``): after round t-1 the server keeps its global update
    w^t - w^{t-1} (the step it applied, server lr included) and sends it to every client
    sampled in round t, which climbs g = w^{t-1} - w^t: fresh every round, the same for
    every participant. Dense downlink: downlink field ``update``, ``4 d`` B per
    participant from round 1 on (0 B in round 0, when there is no update: ``sam.round0``).
    Compressed downlink (``compressor.downlink = "same"``): the round's downlink payload
    *is* that update through the downlink compressor, D(m^{t-1}) = w^t - w^{t-1}, which
    every participant downloads anyway (fedmpi.downlink); the client takes it from its
    replica (:meth:`Estimator.client_global_step`), 0 B extra.
  - ``client`` (the paper's formula): w^{t'} is the global model the client received in
    its previous active round t', kept in its own state on the owning rank; stale by the
    rounds it sat out, absent in its first round. 0 B.

  (Neither copies the public code's per-tensor indexing of a flat vector, nor its L1-like
  norm.)
* ``fedsynsam``: FedSynSAM (Gu, Jin, Zhang, Dai, "Gradient Compression May Hurt
  Generalization: A Remedy by Synthetic Data Guided Sharpness Aware Minimization", arXiv
  2602.11584, 2026), as reconstructed in docs/algorithms.md §1.3 (the paper's body was not
  available): after round t the server distils the global trajectory segment
  w^t -> w^{t+1} into a synthetic set S = (X, Y) (M samples of the input shape, soft labels
  M x C) with the 3SFC objective at w^t, ``min 1 - |cos(grad_w CE(f_{w^t}(X), Y),
  w^t - w^{t+1})|`` (LBFGS, ``sam.s_steps`` outer steps, :mod:`fedmpi.synth`, warm-started
  from the previous S), and the sign sigma = sign(cos) of the fit; with ``traj_window = L``
  the fit sums that objective over the last L segments (each at its own w^j). A client
  climbs ``g = sigma grad_w CE(f_w(X), Y)`` re-evaluated at every local iterate w
  (``perturb_mode = per_step``) or once at w^t (``fixed``); one real pass per step plus one
  on the M synthetic samples. Downlink fields ``x`` (M D_in fp32), ``y`` (M C fp32),
  ``sigma`` (1 int8): ``4 M (D_in + C) + 1`` B per participant from round 1 on (0 B in
  round 0, when there is no S yet). With ``synth_site = client`` each client fits S itself
  on the segment from the last global model it saw, w^{t'}, to w^t (at w^{t'}, warm-started
  from its own previous S): 0 B extra downlink, the fit's compute on every client.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar

import numpy as np
import torch

from fedmpi import registry, synth
from fedmpi.compress import ModelSpec, Payload
from fedmpi.config import Config

ASCENT_EPS = 1e-12  #: eps = rho g / (||g|| + ASCENT_EPS)
TAG_FEDSYNSAM = 601  #: random stream of a synthetic set's first start (X0, Y0)


def ascent(g: torch.Tensor, w: torch.Tensor, rho: float, adaptive: bool) -> torch.Tensor:
    """SAM's (or ASAM's) ascent vector for direction ``g`` at weights ``w``."""
    if adaptive:
        t = w.abs()
        tg = t * g
        return (t * tg) * (rho / (float(tg.norm()) + ASCENT_EPS))
    return g * (rho / (float(g.norm()) + ASCENT_EPS))


def local_gradient(model: Any, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """The minibatch cross-entropy gradient at the model's current weights (a copy)."""
    model.loss_grad(xb, yb)
    return model.grad.clone()


class Estimator:
    """Base class; also the ``none`` estimator (no perturbation, no extra traffic)."""

    name: ClassVar[str] = "none"

    def __init__(self, cfg: Config, spec: ModelSpec):
        self.cfg = cfg
        self.spec = spec
        self.rho = cfg.sam.rho
        self.adaptive = cfg.sam.adaptive

    # server -----------------------------------------------------------------
    def server_payload(self, round_: int) -> Payload:
        return Payload({})

    def server_round_end(self, before: torch.Tensor, after: torch.Tensor, round_: int,
                         model: Any) -> None:
        return None

    # client rank ------------------------------------------------------------
    def parse(self, buf: np.ndarray, round_: int) -> Payload:
        if buf.size:
            raise ValueError(f"sam.name = {self.name!r} expects no downlink, got {buf.size} B")
        return Payload({})

    #: whether the round loop passes :meth:`client_global_step` the downlink's step
    wants_global_step: ClassVar[bool] = False

    def client_global_step(self, step: torch.Tensor, round_: int) -> None:
        """The global update w^t - w^{t-1} that the round's downlink brought to this rank's
        replica (every rank applies every broadcast); called before :meth:`client_receive`,
        only when ``wants_global_step``."""
        return None

    def client_receive(self, payload: Payload, round_: int) -> None:
        return None

    # measurement (fedmpi.perturbation) ------------------------------------------
    def server_fit_cosine(self) -> float:
        """How well the server-built direction matches what it was fitted to, for the one
        the next round's clients get (FedSynSAM's S); NaN where there is none."""
        return float("nan")

    def client_fit_cosine(self) -> float:
        """The same for a direction the current client fitted itself; NaN if none."""
        return float("nan")

    def begin_client(self, client: int, state: Any, global_params: torch.Tensor,
                     round_: int, lr: float = 0.0, steps: int = 0) -> None:
        """Client ``client`` starts training from ``global_params`` = w^t; ``state`` is its
        :class:`fedmpi.client.ClientState` (``state.extra`` is the estimator's), ``lr``
        and ``steps`` its learning rate and number of local steps this round."""
        return None

    def perturbation(self, model: Any, xb: torch.Tensor, yb: torch.Tensor,
                     step: int) -> torch.Tensor | None:
        return None

    def descent(self, grad: torch.Tensor, step: int) -> None:
        return None

    @property
    def plain(self) -> bool:
        """Whether local steps are plain gradient steps: neither :meth:`perturbation` nor
        :meth:`descent` is overridden (the ``none`` estimator)."""
        cls = type(self)
        return (cls.perturbation is Estimator.perturbation
                and cls.descent is Estimator.descent)

    # helpers ------------------------------------------------------------------
    def ascent(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ascent(g, w, self.rho, self.adaptive)

    def local_ascent(self, model: Any, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return self.ascent(local_gradient(model, xb, yb), model.params)

    def no_history(self, model: Any, xb: torch.Tensor, yb: torch.Tensor
                   ) -> torch.Tensor | None:
        """``sam.round0``: what to climb before there is any history."""
        return self.local_ascent(model, xb, yb) if self.cfg.sam.round0 == "local" else None


class FedSAM(Estimator):
    name = "fedsam"

    def perturbation(self, model, xb, yb, step):
        return self.local_ascent(model, xb, yb)


class MoFedSAM(FedSAM):
    name = "mofedsam"

    def __init__(self, cfg: Config, spec: ModelSpec):
        super().__init__(cfg, spec)
        self.alpha = cfg.sam.alpha
        self._srv_delta: np.ndarray | None = None  # server: (w^t - w^{t-1}) / server.lr
        self._delta: torch.Tensor | None = None  # client rank: the received Delta^{t-1}
        self._dg: torch.Tensor | None = None  # the current client's Delta_g

    def server_round_end(self, before, after, round_, model):
        step = (after - before) / self.cfg.server.lr
        self._srv_delta = step.detach().to(torch.float32).cpu().numpy()

    def server_payload(self, round_):
        if self._srv_delta is None:
            return Payload({})
        return Payload({"delta": self._srv_delta})

    def parse(self, buf, round_):
        if buf.size == 0:
            return Payload({})
        return Payload.from_bytes(buf, [("delta", np.float32, self.spec.d)])

    def client_receive(self, payload, round_):
        self._delta = (torch.from_numpy(payload["delta"]).to(self.spec.device)
                       if payload.nbytes else None)

    def begin_client(self, client, state, global_params, round_, lr=0.0, steps=0):
        self._dg = None
        if self._delta is not None:
            self._dg = self._delta / (-float(steps) * lr)

    def descent(self, grad, step):
        grad.mul_(self.alpha)
        if self._dg is not None:
            grad.add_(self._dg, alpha=1.0 - self.alpha)


class FedLESAM(Estimator):
    name = "fedlesam"

    def __init__(self, cfg: Config, spec: ModelSpec):
        super().__init__(cfg, spec)
        self.source = cfg.sam.lesam_source
        # server source through a compressed downlink: the update is the downlink's payload
        self.via_downlink = self.source == "server" and cfg.compressor.downlink == "same"
        self.wants_global_step = self.via_downlink
        self._srv_update: np.ndarray | None = None  # server: w^{t+1} - w^t (dense downlink)
        self._update: torch.Tensor | None = None  # client rank: w^t - w^{t-1}, as received
        self._eps: torch.Tensor | None = None

    # server source -------------------------------------------------------------
    def server_round_end(self, before, after, round_, model):
        if self.source == "server" and not self.via_downlink:
            self._srv_update = (after - before).detach().to(torch.float32).cpu().numpy()

    def server_payload(self, round_):
        if self._srv_update is None:
            return Payload({})
        return Payload({"update": self._srv_update})

    def parse(self, buf, round_):
        if buf.size == 0:
            return Payload({})
        return Payload.from_bytes(buf, [("update", np.float32, self.spec.d)])

    def client_receive(self, payload, round_):
        if not self.via_downlink:
            self._update = (torch.from_numpy(payload["update"]).to(self.spec.device)
                            if payload.nbytes else None)

    def client_global_step(self, step, round_):
        self._update = step

    # client -------------------------------------------------------------------
    def begin_client(self, client, state, global_params, round_, lr=0.0, steps=0):
        self._eps = None
        if self.source == "server":
            if self._update is not None and float(self._update.norm()) > 0:
                self._eps = self.ascent(-self._update, global_params)  # w^{t-1} - w^t
            return
        prev = state.extra.get("last_global")
        if prev is not None:
            self._eps = self.ascent(prev - global_params, global_params)
        state.extra["last_global"] = global_params.clone()

    def perturbation(self, model, xb, yb, step):
        if self._eps is None:
            return self.no_history(model, xb, yb)
        return self._eps


class _Cache(dict):
    """A per-process cache keyed by object ids: pickles (checkpoints) as empty."""

    def __reduce__(self):
        return (_Cache, ())


class Synthetic:
    """A synthetic set S = (X, Y) and its sign sigma, on the rank's device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, sigma: float,
                 cos: float = float("nan")):
        self.x, self.y, self.sigma = x, y, sigma
        self.cos = cos  #: cos(sigma grad l(w; S), target) of the fit (not sent)

    def fields(self) -> dict[str, np.ndarray]:
        return {"x": self.x.detach().to(torch.float32).cpu().numpy().reshape(-1).copy(),
                "y": self.y.detach().to(torch.float32).cpu().numpy().reshape(-1).copy(),
                "sigma": np.asarray([1 if self.sigma >= 0 else -1], dtype=np.int8)}


class FedSynSAM(Estimator):
    name = "fedsynsam"

    def __init__(self, cfg: Config, spec: ModelSpec):
        super().__init__(cfg, spec)
        if not spec.input_shape or spec.num_classes <= 0:
            raise ValueError("fedsynsam synthesises model inputs and needs the dataset's "
                             "input shape and class count")
        s = cfg.sam
        self.x_shape = (s.m, *spec.input_shape)
        self.y_shape = (s.m, spec.num_classes)
        self.options = synth.FitOptions(steps=s.s_steps, absolute=s.absolute)
        self._directions: dict[int, synth.Gradient] = _Cache()  # by id(model)
        # server: the last L trajectory segments (w^j, w^j - w^{j+1}) and the current S
        self._srv_segments: deque[tuple[torch.Tensor, torch.Tensor]] = deque(
            maxlen=s.traj_window)
        self._srv_set: Synthetic | None = None
        self._received: Synthetic | None = None  # client rank: the broadcast S
        # the client now training: its S, a pending client-site fit, the fixed-mode eps
        self._set: Synthetic | None = None
        self._pending: tuple[Any, torch.Tensor, torch.Tensor, int, int] | None = None
        self._eps: torch.Tensor | None = None
        self._fit_cos = float("nan")  # of the current client's own fit (client site)

    @property
    def payload_bytes(self) -> int:
        """``4 M (D_in + C) + 1``: X and Y as fp32, sigma as one int8."""
        return 4 * (math.prod(self.x_shape) + math.prod(self.y_shape)) + 1

    def direction(self, model: Any) -> synth.Gradient:
        key = id(model)
        if key not in self._directions:
            self._directions[key] = synth.Gradient(
                synth.SynthModel(model), self.x_shape[0], tuple(self.spec.input_shape),
                self.spec.num_classes)
        return self._directions[key]

    def _start(self, warm: Synthetic | None, round_: int, client: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if warm is not None and self.cfg.sam.warm_start:
            return warm.x.clone(), warm.y.clone()
        g = torch.Generator(device="cpu")
        g.manual_seed(int(np.random.default_rng(
            [self.cfg.run.seed, TAG_FEDSYNSAM, round_, client + 1]).integers(0, 2**62)))
        return synth.init_xy(g, self.x_shape, self.y_shape, self.spec.device)

    def fit(self, model: Any, segments: list[tuple[torch.Tensor, torch.Tensor]],
            start: tuple[torch.Tensor, torch.Tensor]) -> Synthetic | None:
        """S matching every segment (w^j, target d^j) in cosine; sigma from the last one.

        One segment is :func:`fedmpi.synth.fit`; several are one problem whose objective
        is the sum of :func:`fedmpi.synth.match_fn` over the segments, minimised by the
        same optimiser (:func:`fedmpi.synth.optimise`). None if every target is zero."""
        segments = [(w, d) for w, d in segments if float(d.norm()) > 0]
        if not segments:
            return None
        direction = self.direction(model)
        x0, y0 = start
        if len(segments) == 1:
            w, d = segments[0]
            res = synth.fit(direction, w, d[None], x0[None], y0[None], self.options)
            x, y = res.x[0], res.y[0]
        else:
            fns = [synth.match_fn(direction, w, d[None], self.options) for w, d in segments]

            def total(z: torch.Tensor, rows: torch.Tensor):
                parts = [fn(z, rows) for fn in fns]
                return sum(j for j, _ in parts), sum(g for _, g in parts)

            pack = synth.Packing(direction.x_shape, direction.y_shape)
            z, _ = synth.optimise(total, pack.pack(x0[None], y0[None]), self.options)
            x, y = (t[0].contiguous() for t in pack.unpack(z))
        w, d = segments[-1]
        g = direction(w, x, y)
        dot = float(torch.dot(g, d))
        den = float(g.norm()) * float(d.norm())
        return Synthetic(x.detach(), y.detach(), -1.0 if dot < 0 else 1.0,
                         abs(dot) / den if den > 0 else float("nan"))

    # server -----------------------------------------------------------------
    def server_round_end(self, before, after, round_, model):
        if self.cfg.sam.synth_site != "server":
            return
        self._srv_segments.append((before.detach().clone(), (before - after).detach()))
        fitted = self.fit(model, list(self._srv_segments),
                          self._start(self._srv_set, round_, -1))
        if fitted is not None:
            self._srv_set = fitted

    def server_payload(self, round_):
        if self._srv_set is None:
            return Payload({})
        return Payload(self._srv_set.fields())

    def server_fit_cosine(self):
        return getattr(self._srv_set, "cos", float("nan"))

    def client_fit_cosine(self):
        return self._fit_cos

    # client rank ------------------------------------------------------------
    def parse(self, buf, round_):
        if buf.size == 0:
            return Payload({})
        return Payload.from_bytes(buf, [("x", np.float32, math.prod(self.x_shape)),
                                        ("y", np.float32, math.prod(self.y_shape)),
                                        ("sigma", np.int8, 1)])

    def client_receive(self, payload, round_):
        self._received = None
        if payload.nbytes:
            dev = self.spec.device
            self._received = Synthetic(
                torch.from_numpy(payload["x"]).to(dev).clone().view(self.x_shape),
                torch.from_numpy(payload["y"]).to(dev).clone().view(self.y_shape),
                float(payload["sigma"][0]))

    def begin_client(self, client, state, global_params, round_, lr=0.0, steps=0):
        self._eps = None
        self._pending = None
        self._fit_cos = float("nan")
        if self.cfg.sam.synth_site == "server":
            self._set = self._received
            return
        prev = state.extra.get("last_global")
        state.extra["last_global"] = global_params.clone()
        self._set = None
        if prev is not None:  # fitted lazily at the first step, where the model is known
            self._pending = (state, prev, prev - global_params, round_, client)

    def perturbation(self, model, xb, yb, step):
        if self._pending is not None:
            state, prev, target, round_, client = self._pending
            self._pending = None
            self._set = self.fit(model, [(prev, target)],
                                 self._start(state.extra.get("synth"), round_, client))
            if self._set is not None:
                state.extra["synth"] = self._set
                self._fit_cos = self._set.cos
        if self._set is None:
            return self.no_history(model, xb, yb)
        if self._eps is not None:  # perturb_mode = fixed: computed at w^t, step 0
            return self._eps
        s = self._set
        g = self.direction(model)(model.params, s.x, s.y)
        eps = self.ascent(g.mul_(s.sigma), model.params)
        if self.cfg.sam.perturb_mode == "fixed":
            self._eps = eps
        return eps


ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (Estimator, FedSAM, MoFedSAM, FedLESAM, FedSynSAM)}
registry.provide(estimators=ESTIMATORS)  # the names fedmpi.config accepts


def build(cfg: Config, spec: ModelSpec) -> Estimator:
    return ESTIMATORS[cfg.sam.name](cfg, spec)
