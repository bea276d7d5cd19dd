"""Run configuration: frozen dataclasses per component, a TOML loader and ``--set`` overrides.

Config is data. Every key a run accepts is a field below (or a field of the chosen
compressor's or algorithm's own ``Config`` dataclass, see :mod:`fedmpi.compress` and
:mod:`fedmpi.algorithms`); unknown keys, wrong types and impossible values raise
:class:`ConfigError` naming the key before any rank trains. The dataclass defaults *are*
the embedded quickstart job (``jobs/quickstart.toml`` holds the same values; a test keeps
the two equal).

The resolved config is serialised back to TOML (:func:`to_toml`) and stored in the run's
HDF5 file, so a run can be reproduced from its output alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from fedmpi import registry
from fedmpi.errors import ConfigError  # also public here: fedmpi.config.ConfigError

# ---------------------------------------------------------------------------- sections

#: longest run.name in bytes: its files (<name>.h5.lock, <name>.ckpt.tmp) must fit 255
MAX_NAME_BYTES = 240
#: path keys: a leading ~ is expanded (os.path.expanduser) when a config is built
PATH_KEYS = (("run", "out_dir"), ("data", "root"), ("checkpoint", "path"))


@dataclass(frozen=True)
class RunConfig:
    #: output file is <out_dir>/<name>.h5; python -m fedmpi.train names a run after its
    #: config file (this name if the file sets it, else the file's name) plus the --set
    #: values that change results, e.g. quickstart_lr-0.1 (fedmpi.config.run_name)
    name: str = "quickstart"
    rounds: int = 30  #: communication rounds
    seed: int = 0  #: root of every random stream (partition, init, sampling, batches)
    out_dir: str = "runs"  #: folder of the HDF5 run file
    threads: int = 0  #: torch intra-op threads per rank; 0 = cores of the node / ranks on it
    mpi_wait: Literal["sleep", "block"] = "sleep"  #: how a rank waits in a collective
    mpi_poll_max_ms: float = 0.5  #: longest sleep between two polls of a pending collective
    #: ranks of a node that compute at once (fedmpi.gate): 0 = auto (the cores / threads
    #: per rank, only when more ranks than that share the cores), N = N slots, -1 = no gate
    compute_slots: int = 0
    #: with the compute gate on, the client ranks behind one slot send their 3SFC /
    #: FedSynth fits to one of them, which fits them in one batch (fedmpi.fitpool)
    pool_fits: bool = True
    hdf5_swmr: bool = True  #: single-writer/multiple-reader mode (read while running)
    device: Literal["auto", "cpu", "cuda"] = "auto"  #: auto = cuda:(local_rank % n_gpus) if any
    #: a NaN/Inf loss, client update, decoded update or global model: stop the run (exit 3),
    #: or skip the diverged clients that round (the run stops if every client diverged)
    on_divergence: Literal["stop", "skip"] = "stop"
    #: rank 0 also owns a client group (it trains between the broadcast and the gather), so
    #: that P processes keep P cores busy; with one process rank 0 always trains
    server_trains: bool = False
    #: seconds a rank may wait for the others in one round before the job is aborted with
    #: a message naming the ranks that did not report (a frozen or hung rank); 0 = auto:
    #: 10 x the slowest round so far, at least 600 s; -1 = never. Client ranks wait twice
    #: as long (rank 0 reports). Not with mpi_wait = "block" (blocking calls cannot time out)
    round_timeout: float = 0.0
    #: rank 0 also writes TensorBoard event files to <out_dir>/<name>.tb (needs the
    #: tensorboard package: pip install -e ".[tensorboard]")
    tensorboard: bool = False

    def validate(self) -> None:
        _require(bool(self.name) and "/" not in self.name
                 and not any(ord(c) < 32 or ord(c) == 127 for c in self.name), "run.name",
                 f"must be a file name, without '/' or control characters (got {self.name!r})")
        _require(len(self.name.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES, "run.name",
                 f"must be at most {MAX_NAME_BYTES} bytes (<name>.ckpt.tmp must fit a file "
                 f"name's 255)")
        _positive(self, "run", "rounds")
        _require(self.seed >= 0, "run.seed", f"must be >= 0 (got {self.seed})")
        _require(self.threads >= 0, "run.threads", f"must be >= 0 (got {self.threads})")
        _positive(self, "run", "mpi_poll_max_ms")
        _require(self.round_timeout >= 0 or self.round_timeout == -1, "run.round_timeout",
                 f"must be seconds > 0, 0 (auto) or -1 (never) (got {self.round_timeout})")
        _require(self.compute_slots >= -1, "run.compute_slots",
                 f"must be -1 (no gate), 0 (auto) or a slot count (got {self.compute_slots})")


@dataclass(frozen=True)
class DataConfig:
    #: synthetic | mnist | fmnist | emnist | cifar10 | cifar100 (see fedmpi.data.DATASETS)
    dataset: str = "synthetic"
    root: str = "data"  #: dataset folder; the FEDMPI_DATA_ROOT environment variable wins
    download: bool = False  #: let torchvision download missing files (never silently)
    check_md5: bool = True  #: CIFAR: verify torchvision's md5 sums (false: re-packed files)
    #: EMNIST split; the class count follows it (62, 47, 47, 26, 10, 10)
    emnist_split: Literal["byclass", "bymerge", "balanced", "letters", "digits",
                          "mnist"] = "byclass"
    #: 1 = official test set; < 1 = 3SFC protocol: shuffle the train split, train on this
    #: share of it and test on the rest (the official test set is not used)
    train_frac: float = 1.0
    max_train: int = 0  #: keep a random subset of this many training samples (0 = all)
    max_test: int = 0  #: keep a random subset of this many test samples (0 = all)
    augment: bool = False  #: CIFAR: random crop (4-pixel zero padding) + horizontal flip
    #: share of every client's shard held out from its training (seeded per client, the
    #: same on any number of ranks); the global model's accuracy on each client's holdout
    #: is recorded every eval round (/clients/acc). 0.2 = the 3SFC code's Client(train_frac
    #: = 0.8): clients train on a random 80% of their shard
    client_holdout: float = 0.0
    #: natural (synthetic only) | iid | dirichlet | dirichlet_balanced | client_dirichlet |
    #: shards (see fedmpi.data)
    partition: str = "natural"
    alpha: float = 1.0  #: Dirichlet concentration (smaller = more skewed)
    min_size: int = 10  #: dirichlet_balanced: redraw until every client has this many
    classes_per_client: int = 2  #: shards: classes each client holds (pathological-c)
    num_clients: int = 10  #: clients N (synthetic/natural: the generated clients)
    # Synthetic(alpha, beta) of FedProx / LEAF (Li et al., MLSys 2020)
    syn_alpha: float = 1.0  #: std of the per-client model means u_k ~ N(0, alpha)
    syn_beta: float = 1.0  #: std of the per-client feature means B_k ~ N(0, beta)
    syn_iid: bool = False  #: one shared model and feature mean (the IID variant)
    syn_dim: int = 60  #: feature dimension
    syn_classes: int = 10  #: classes of the synthetic task
    syn_min_samples: int = 50  #: samples per client = lognormal(4, 2) + this ...
    syn_max_samples: int = 1000  #: ... capped here (0 = no cap)
    syn_test_frac: float = 0.2  #: per-client share held out for the global test set

    def validate(self) -> None:
        _positive(self, "data", "alpha")
        _positive(self, "data", "num_clients")
        _require(self.syn_alpha >= 0, "data.syn_alpha", "must be >= 0")
        _require(self.syn_beta >= 0, "data.syn_beta", "must be >= 0")
        _positive(self, "data", "syn_dim")
        _require(self.syn_classes >= 2, "data.syn_classes", "must be >= 2")
        _positive(self, "data", "syn_min_samples")
        _require(self.syn_max_samples == 0 or self.syn_max_samples >= self.syn_min_samples,
                 "data.syn_max_samples", "must be 0 or >= data.syn_min_samples")
        _require(0.0 < self.syn_test_frac < 1.0, "data.syn_test_frac", "must be in (0, 1)")
        if self.partition == "natural" and self.dataset != "synthetic":
            valid = sorted(p for p in registry.lookup("partitions") if p != "natural")
            raise ConfigError("data.partition", "'natural' is only defined for dataset "
                              f"'synthetic'; for {self.dataset!r} use one of: "
                              f"{', '.join(valid)}")
        _require(0.0 < self.train_frac <= 1.0, "data.train_frac",
                 f"must be in (0, 1] (got {self.train_frac})")
        _require(0.0 <= self.client_holdout < 1.0, "data.client_holdout",
                 f"must be in [0, 1) (got {self.client_holdout})")
        _require(self.max_train >= 0, "data.max_train", "must be >= 0 (0 = all)")
        _require(self.max_test >= 0, "data.max_test", "must be >= 0 (0 = all)")
        for key in ("train_frac", "max_train", "max_test"):
            _require(self.dataset != "synthetic" or getattr(self, key) == getattr(
                DataConfig, key), f"data.{key}", "does not apply to dataset 'synthetic' "
                "(its split is data.syn_test_frac)")
        _positive(self, "data", "min_size")
        _positive(self, "data", "classes_per_client")


@dataclass(frozen=True)
class ModelConfig:
    #: mlp | logreg | mnistnet | convnet | resnet18 | regnetx_200mf | vgg11star | lenet5
    #: (see fedmpi.models.MODELS); input shape and class count come from the dataset
    name: str = "mlp"
    hidden: int = 200  #: width of the MLP's two hidden layers (the papers: 200)

    def validate(self) -> None:
        _positive(self, "model", "hidden")


@dataclass(frozen=True)
class ClientConfig:
    lr: float = 0.05  #: local SGD learning rate
    batch_size: int = 32  #: local minibatch size (capped at the client's sample count)
    local_steps: int = 10  #: K SGD steps per round for every client (0 = use local_epochs)
    local_epochs: int = 0  #: full passes over each client's own data (0 = use local_steps)
    lr_decay: float = 1.0  #: a client's lr is multiplied by this each time it trains
    #: apply lr_decay before a client's first local training too (the 3SFC code decays
    #: its optimizer's lr before every training: lr * decay^(n + 1)); false: lr * decay^n
    lr_decay_first: bool = False
    momentum: float = 0.0  #: local SGD momentum (a fresh buffer every round)
    weight_decay: float = 0.0  #: L2 weight decay added to the local gradient
    grad_clip: float = 0.0  #: clip the global gradient norm to this (0 = off)
    #: sequential = one client after another; batched = a rank's clients train together
    #: through torch.func (vmap over clients; plain SGD, sam.name = "none"); auto =
    #: sequential training, batched where the compressor fits clients together (3SFC)
    execution: Literal["auto", "sequential", "batched"] = "auto"
    #: how a minibatch gradient is taken: autograd; dense = by hand for a chain of dense
    #: layers (mlp, logreg; fedmpi.models.DenseBackprop); auto = dense where it applies
    backprop: Literal["auto", "autograd", "dense"] = "auto"

    def validate(self) -> None:
        _positive(self, "client", "lr")
        _positive(self, "client", "batch_size")
        _require(self.local_steps >= 0, "client.local_steps", "must be >= 0")
        _require(self.local_epochs >= 0, "client.local_epochs", "must be >= 0")
        _require((self.local_steps > 0) != (self.local_epochs > 0), "client.local_steps",
                 "exactly one of client.local_steps and client.local_epochs must be > 0 "
                 f"(got {self.local_steps} and {self.local_epochs})")
        _require(0.0 < self.lr_decay <= 1.0, "client.lr_decay", "must be in (0, 1]")
        _require(0.0 <= self.momentum < 1.0, "client.momentum", "must be in [0, 1)")
        _require(self.weight_decay >= 0, "client.weight_decay", "must be >= 0")
        _require(self.grad_clip >= 0, "client.grad_clip", "must be >= 0")


@dataclass(frozen=True)
class CompressorConfig:
    name: str = "identity"  #: see fedmpi.compress.REGISTRY
    #: wrap the compressor in error feedback (u = update + e; e = u - C(u)); unset = the
    #: compressor's default (true for 3sfc and the *_3sfc baselines, false otherwise)
    ef: bool = False
    #: dense = broadcast w^t as fp32; same = compress the server step with this method and
    #: a server-side residual, broadcast only that (STC up/down, E-3SFC double-way)
    downlink: Literal["dense", "same"] = "dense"
    params: Any = None  #: the compressor's own Config dataclass (its extra keys)

    def validate(self) -> None:
        # a compressor with its own residual (DGC's v) must not be wrapped in a second one
        if getattr(registry.lookup("compressors").get(self.name), "own_residual", False):
            _require(not self.ef, "compressor.ef", f"{self.name} accumulates its own "
                     "residual; error feedback would count the unsent part twice")
            _require(self.downlink == "dense", "compressor.downlink", f"{self.name} is "
                     "uplink-only (its residual is per client); use 'dense'")


@dataclass(frozen=True)
class AlgorithmConfig:
    #: the federated method: fedavg | fedprox | scaffold (see fedmpi.algorithms.REGISTRY);
    #: its own keys sit beside name in [algorithm]
    name: str = "fedavg"
    params: Any = None  #: the algorithm's own Config dataclass (its extra keys)

    def validate(self) -> None:
        pass  # the name and the algorithm's own keys: _validate_names


@dataclass(frozen=True)
class SamConfig:
    #: perturbation estimator: none | fedsam | mofedsam | fedlesam | fedsynsam
    #: (see fedmpi.sam.ESTIMATORS)
    name: str = "none"
    rho: float = 0.05  #: SAM radius (0 = plain local SGD for every estimator)
    adaptive: bool = False  #: ASAM (Kwon et al. 2021): eps = rho T^2 g / ||T g||, T = |w|
    #: before an estimator has history (fedlesam: round 0, or a client's first round with
    #: lesam_source = client; fedsynsam: no synthetic set yet): "sgd" = no ascent (the
    #: FedLESAM code), "local" = FedSAM's ascent
    round0: Literal["sgd", "local"] = "sgd"
    #: fedlesam: where its direction w^{t'} - w^t comes from: server = the server broadcasts
    #: the previous round's global update to every sampled client, t' = t - 1 (the official
    #: code; 4 d B per participant, or the compressed downlink's own payload with
    #: compressor.downlink = same); client = the global model the client received in its
    #: previous active round (the paper's formula; 0 B, stale under partial participation)
    lesam_source: Literal["server", "client"] = "server"
    alpha: float = 0.1  #: mofedsam: descent = alpha grad(w + eps) + (1 - alpha) Delta_g
    #: fedsynsam: re-evaluate grad l(w; S) at every local iterate, or once per round at w^t
    perturb_mode: Literal["per_step", "fixed"] = "per_step"
    traj_window: int = 1  #: fedsynsam: trajectory segments L matched at once (server site)
    #: fedsynsam: who builds S: the server (broadcast, counted as downlink) or each client
    #: from the last global model it saw and the current one (no extra downlink)
    synth_site: Literal["server", "client"] = "server"
    m: int = 10  #: fedsynsam: synthetic samples M in S
    s_steps: int = 10  #: fedsynsam: LBFGS outer steps S of the fit (fedmpi.synth)
    warm_start: bool = True  #: fedsynsam: start each fit from the previous S (else random)
    #: fedsynsam: fit 1 - |cos| (3SFC; the sign sigma travels with S) or the signed 1 - cos
    absolute: bool = True

    def validate(self) -> None:
        _require(self.rho >= 0 and math.isfinite(self.rho), "sam.rho", "must be >= 0")
        _require(0.0 <= self.alpha <= 1.0, "sam.alpha", f"must be in [0, 1] (got {self.alpha})")
        _positive(self, "sam", "traj_window")
        _require(self.traj_window == 1 or self.synth_site == "server", "sam.traj_window",
                 "must be 1 with sam.synth_site = 'client' (a client holds one segment)")
        _positive(self, "sam", "m")
        _positive(self, "sam", "s_steps")


@dataclass(frozen=True)
class ServerConfig:
    lr: float = 1.0  #: global learning rate: w <- w + lr * aggregate
    #: uniform or sample-count weighted mean; majority = sign(sum_i sign(update_i)) (signSGD)
    aggregation: Literal["mean", "weighted", "majority"] = "mean"
    participation: float = 1.0  #: fraction of clients sampled each round (>= 1 client)

    def validate(self) -> None:
        _positive(self, "server", "lr")
        _require(0.0 < self.participation <= 1.0, "server.participation", "must be in (0, 1]")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1  #: evaluate the global model every N rounds (and always at the last)
    sharpness_every: int = 0  #: sharpness metrics every N rounds and at the last (0 = never)
    batch_size: int = 2048  #: evaluation batch size (also the sharpness batches)
    #: training samples of the fixed, seeded subset sharpness is measured on
    sharpness_samples: int = 2048
    #: perturbation accuracy (fedmpi.perturbation) every N rounds and at the last (0 =
    #: never): each participant's cos(ascent at its first step, true global gradient)
    perturbation_every: int = 0
    #: samples of the fixed, seeded subset of the clients' training union the true global
    #: gradient is computed on (full batch)
    perturbation_samples: int = 2048
    #: seed of the fixed training subsets (sharpness, perturbation): not run.seed, so runs
    #: with the same training split measure on the same samples whatever their seed
    subset_seed: int = 0
    sharpness_iters: int = 100  #: power iteration: most Hessian-vector products per eigenvalue
    sharpness_tol: float = 1e-3  #: power iteration stops when |d lambda| / |lambda| <= this
    sharpness_topk: int = 1  #: top Hessian eigenvalues by deflation (1..5)
    sharpness_trace_samples: int = 100  #: Hutchinson: most Rademacher probes
    #: Hutchinson stops when (pyhessian) the mean moves less than this (relative), or
    #: (stderr) its standard error is below this x |mean| (after >= 10 probes)
    sharpness_trace_tol: float = 1e-3
    #: Hutchinson's stopping rule: pyhessian (PyHessian's) or stderr (on its own error)
    sharpness_trace_rule: Literal["pyhessian", "stderr"] = "pyhessian"
    #: SAM sharpness L(w + rho g/||g||) - L(w) for each rho (1..4 values)
    sharpness_rho: tuple[float, ...] = (0.01, 0.05, 0.1)

    def validate(self) -> None:
        _positive(self, "eval", "every")
        _require(self.sharpness_every >= 0, "eval.sharpness_every", "must be >= 0")
        _positive(self, "eval", "batch_size")
        _positive(self, "eval", "sharpness_samples")
        _require(self.subset_seed >= 0, "eval.subset_seed", "must be >= 0")
        _require(self.perturbation_every >= 0, "eval.perturbation_every", "must be >= 0")
        _positive(self, "eval", "perturbation_samples")
        _positive(self, "eval", "sharpness_iters")
        _positive(self, "eval", "sharpness_tol")
        _require(1 <= self.sharpness_topk <= 5, "eval.sharpness_topk",
                 f"must be in 1..5 (got {self.sharpness_topk})")
        _positive(self, "eval", "sharpness_trace_samples")
        _positive(self, "eval", "sharpness_trace_tol")
        _require(1 <= len(self.sharpness_rho) <= 4, "eval.sharpness_rho",
                 f"must list 1 to 4 radii (got {len(self.sharpness_rho)})")
        _require(all(r > 0 and math.isfinite(r) for r in self.sharpness_rho),
                 "eval.sharpness_rho", f"every radius must be > 0 (got {self.sharpness_rho})")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  #: checkpoint every N rounds (0 = by wall time and on signals only)
    #: checkpoint once this many seconds have passed since the last one (0 = off); a
    #: crash loses at most this much work. Ctrl-C, SIGTERM and SIGUSR1 always checkpoint
    every_seconds: float = 600.0
    path: str = ""  #: checkpoint file; "" = <run.out_dir>/<run.name>.ckpt

    def validate(self) -> None:
        _require(self.every >= 0, "checkpoint.every", f"must be >= 0 (got {self.every})")
        _require(self.every_seconds >= 0 and math.isfinite(self.every_seconds),
                 "checkpoint.every_seconds", f"must be >= 0 (got {self.every_seconds})")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        _validate_names(self)  # unknown names first: they explain later errors
        for f in fields(self):
            getattr(self, f.name).validate()


SECTIONS: dict[str, type] = {
    "run": RunConfig, "data": DataConfig, "model": ModelConfig, "client": ClientConfig,
    "algorithm": AlgorithmConfig, "compressor": CompressorConfig, "sam": SamConfig,
    "server": ServerConfig, "eval": EvalConfig, "checkpoint": CheckpointConfig,
}


# ---------------------------------------------------------------------------- checks


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _positive(obj: Any, section: str, name: str) -> None:
    value = getattr(obj, name)
    _require(value > 0 and math.isfinite(value), f"{section}.{name}",
             f"must be > 0 (got {value})")


def _validate_names(cfg: Config) -> None:
    datasets, partitions = registry.lookup("datasets"), registry.lookup("partitions")
    models, compressors = registry.lookup("models"), registry.lookup("compressors")
    estimators = registry.lookup("estimators")
    _require(cfg.data.dataset in datasets, "data.dataset",
             f"unknown dataset {cfg.data.dataset!r}; known: {', '.join(sorted(datasets))}")
    _require(cfg.data.partition in partitions, "data.partition",
             f"unknown partition {cfg.data.partition!r}; "
             f"known: {', '.join(sorted(partitions))}")
    _require(cfg.model.name in models, "model.name",
             f"unknown model {cfg.model.name!r}; known: {', '.join(sorted(models))}")
    _require(cfg.compressor.name in compressors, "compressor.name",
             f"unknown compressor {cfg.compressor.name!r}; "
             f"known: {', '.join(sorted(compressors))}")
    _require(cfg.client.execution != "batched" or cfg.sam.name == "none", "client.execution",
             "'batched' trains plain SGD only; use 'auto' or 'sequential' with sam.name = "
             f"{cfg.sam.name!r}")
    _require(cfg.sam.name in estimators, "sam.name",
             f"unknown estimator {cfg.sam.name!r}; known: {', '.join(sorted(estimators))}")
    params = cfg.compressor.params
    if params is not None and hasattr(params, "validate"):
        params.validate()
    methods = registry.lookup("algorithms")
    _require(cfg.algorithm.name in methods, "algorithm.name",
             f"unknown algorithm {cfg.algorithm.name!r}; "
             f"known: {', '.join(sorted(methods))}")
    method = methods[cfg.algorithm.name]
    (cfg.algorithm.params if cfg.algorithm.params is not None else method.Config()).validate()
    method.check(cfg)
    _check_data_model(cfg)


def _check_data_model(cfg: Config) -> None:
    """Checks that need the dataset's shape: the model must fit it, augmentation and
    classes_per_client must make sense for it."""
    augmentable, dense = registry.lookup("augmentable"), registry.lookup("dense")
    models, fit_error = registry.lookup("models"), registry.lookup("model_fit_error")

    cfg.data.validate()  # the dataset's shape is only meaningful for valid data keys
    cfg.model.validate()
    info = registry.lookup("dataset_info")(cfg.data)
    _require(not cfg.data.augment or cfg.data.dataset in augmentable, "data.augment",
             f"random crop + flip is defined for {', '.join(augmentable)} only "
             f"(dataset {cfg.data.dataset!r})")
    _require(cfg.data.partition != "shards" or cfg.data.classes_per_client <= info.num_classes,
             "data.classes_per_client", f"{cfg.data.classes_per_client} exceeds the "
             f"{info.num_classes} classes of {cfg.data.dataset!r}")
    _require(cfg.client.backprop != "dense" or cfg.model.name in dense,
             "client.backprop", f"'dense' is defined for the dense chains "
             f"{', '.join(dense)} (model {cfg.model.name!r}); use 'auto' or 'autograd'")
    problem = fit_error(cfg.model, info.input_shape, info.num_classes)
    if problem is not None:
        fitting = sorted(m for m in models if fit_error(
            dataclasses.replace(cfg.model, name=m), info.input_shape, info.num_classes) is None)
        raise ConfigError("model.name", f"{problem}; dataset {cfg.data.dataset!r} has "
                          f"inputs of shape {'x'.join(map(str, info.input_shape))} and "
                          f"{info.num_classes} classes; models that fit it: "
                          f"{', '.join(fitting) or 'none'}")


# ---------------------------------------------------------------------------- typing


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float only), or raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        _require(value in choices, key, f"must be one of {', '.join(map(repr, choices))} "
                 f"(got {value!r})")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], key)
    if origin in (tuple, list):
        _require(isinstance(value, (list, tuple)), key, f"must be a list (got {value!r})")
        (elem, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_check_type(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(ok, key, f"must be a number (got {type(value).__name__} {value!r})")
        return float(value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        _require(ok, key, f"must be an integer (got {type(value).__name__} {value!r})")
        return value
    if tp is bool:
        _require(isinstance(value, bool), key,
                 f"must be true or false (got {type(value).__name__} {value!r})")
        return value
    if tp is str:
        _require(isinstance(value, str), key,
                 f"must be a string (got {type(value).__name__} {value!r})")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in a dataclass


def build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, checking keys and types."""
    _require(isinstance(table, dict), prefix, "must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    for k in table:
        if k not in known:
            raise ConfigError(f"{prefix}.{k}", f"unknown key; known keys of [{prefix}]: "
                              f"{', '.join(sorted(known))}")
    kwargs = {k: _check_type(v, hints[k], f"{prefix}.{k}") for k, v in table.items()}
    return cls(**kwargs)


def _named(table: dict[str, Any], section: str, kind: str, default: str
           ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A ``[section]`` whose ``name`` picks an implementation from the registry's ``kind``
    table: (name, the other keys, that table); an unknown name lists the known ones."""
    known = registry.lookup(kind)
    table = dict(table)
    name = table.pop("name", default)
    _require(isinstance(name, str), f"{section}.name", "must be a string")
    _require(name in known, f"{section}.name",
             f"unknown {section} {name!r}; known: {', '.join(sorted(known))}")
    return name, table, known


def _build_compressor(table: dict[str, Any]) -> CompressorConfig:
    name, table, compressors = _named(table, "compressor", "compressors",
                                      CompressorConfig.name)
    generic = {}
    for f in fields(CompressorConfig):
        if f.name not in ("name", "params") and f.name in table:
            generic[f.name] = table.pop(f.name)
    _require("params" not in table, "compressor.params", "unknown key")
    # ef left unset takes the compressor's own default (its class attribute ``ef_default``,
    # e.g. true for 3sfc as in its paper; false elsewhere); the resolved value is stored
    generic.setdefault("ef", compressors[name].ef_default)
    params = build(compressors[name].Config, table, "compressor")
    base = build(CompressorConfig, generic, "compressor")
    return dataclasses.replace(base, name=name, params=params)


def _build_algorithm(table: dict[str, Any]) -> AlgorithmConfig:
    """``[algorithm]``: ``name`` and the named algorithm's own keys (its ``Config``)."""
    name, table, methods = _named(table, "algorithm", "algorithms", AlgorithmConfig.name)
    _require("params" not in table, "algorithm.params", "unknown key")
    return AlgorithmConfig(name=name, params=build(methods[name].Config, table, "algorithm"))


def _expand_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """``~`` and ``~user`` at the start of a path key expanded (a literal "~" folder is
    never what a config means)."""
    out = dict(raw)
    for section, key in PATH_KEYS:
        table = out.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str):
            _require("\0" not in table[key], f"{section}.{key}", "must not contain a NUL byte")
            out[section] = {**table, key: os.path.expanduser(table[key])}
    return out


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a parsed TOML document."""
    for k in raw:
        if k not in SECTIONS:
            raise ConfigError(k, f"unknown section; known sections: {', '.join(SECTIONS)}")
    raw = _expand_paths(raw)
    sections = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        _require(isinstance(table, dict), name, "must be a table ([section])")
        builder = {"compressor": _build_compressor, "algorithm": _build_algorithm}.get(name)
        sections[name] = builder(table) if builder else build(cls, table, name)
    cfg = Config(**sections)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"client.lr=0.05"`` -> (["client", "lr"], 0.05); a bare word is a string."""
    if "=" not in item:
        raise ConfigError(item, "--set takes KEY=VALUE, e.g. --set client.lr=0.05")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(key, "--set keys are SECTION.KEY, e.g. client.lr")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


#: keys whose ``--set`` values do not enter a derived run name (None: a whole section):
#: they change how a run is executed, checkpointed or measured (``eval``), not what it
#: trains; and ``run.rounds``: a shorter run is the start of a longer one (``--resume
#: --set run.rounds=N`` extends a run). fedmpi.analysis ignores the same keys.
NAME_NEUTRAL = {"run": {"name", "rounds", "out_dir", "threads", "mpi_wait", "mpi_poll_max_ms",
                        "compute_slots", "pool_fits", "hdf5_swmr", "device", "server_trains",
                        "tensorboard"},
                "data": {"root", "download", "check_md5"}, "eval": None, "checkpoint": None}
MAX_RUN_NAME = 120  #: longer derived names end in a hash of their overrides


def _name_part(value: Any) -> str:
    import re

    text = ("true" if value else "false") if isinstance(value, bool) else (
        "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "_"


def run_name(path: str | None, raw: dict[str, Any], overrides: typing.Sequence[str]) -> str:
    """The run name of ``load(path, overrides)``: ``--set run.name`` if given; else the
    file's ``run.name`` (or the file's name; ``quickstart`` for the embedded default) plus
    one ``key-value`` part per ``--set`` that changes the file's value and the results,
    e.g. ``quickstart_lr-0.1``, so runs of one file with different overrides never share
    a run file. ``raw`` is the parsed file, before the overrides."""
    import hashlib
    import os

    parsed = [parse_override(item) for item in overrides]
    for (section, key), value in parsed:
        if (section, key) == ("run", "name"):
            return str(value)
    base = raw.get("run", {}).get("name") if isinstance(raw.get("run"), dict) else None
    if not base:
        base = (os.path.splitext(os.path.basename(path))[0] if path else RunConfig.name)
    changed: dict[tuple[str, str], Any] = {}
    for (section, key), value in parsed:
        neutral = NAME_NEUTRAL.get(section, ())
        if neutral is None or key in neutral:
            continue
        table = raw.get(section) if isinstance(raw.get(section), dict) else {}
        if key in table:
            same = table[key] == value
        else:
            cls = SECTIONS.get(section)
            known = {f.name: f for f in fields(cls)} if cls else {}
            same = key in known and known[key].default == value
        changed.pop((section, key), None)  # the last --set of a key wins, in its place
        if not same:
            changed[(section, key)] = value
    short = [k if k != "name" else s for s, k in changed]
    parts = [f"{_name_part(short[i] if short.count(short[i]) == 1 else f'{s}.{k}')}-"
             f"{_name_part(v)}" for i, ((s, k), v) in enumerate(changed.items())]
    name = "_".join([str(base), *parts])
    if len(name) > MAX_RUN_NAME:
        digest = hashlib.sha1("_".join(parts).encode()).hexdigest()[:10]
        name = f"{name[:MAX_RUN_NAME - 11]}_{digest}"
    return name


def load(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a TOML file (None = the embedded default), apply ``--set`` overrides, name the
    run (:func:`run_name`), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(path, "config file not found") from None
        except IsADirectoryError:
            raise ConfigError(path, "is a directory, not a config file") from None
        except OSError as exc:
            raise ConfigError(path, f"cannot read the config file ({exc.strerror or exc})"
                              ) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(path, f"not a TOML text file (byte {exc.start} is not UTF-8)"
                              ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path, f"TOML syntax error: {exc}") from None
    name = run_name(path, raw, overrides)
    for item in overrides:
        (section, key), value = parse_override(item)
        if section not in SECTIONS:
            raise ConfigError(f"{section}.{key}", f"--set on unknown section [{section}]")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(section, "must be a table")
        raw[section][key] = value
    for item in overrides:  # an override must name an existing key
        (section, key), _ = parse_override(item)
        own = section in ("compressor", "algorithm")  # their own keys: checked when built
        if not own and key not in {f.name for f in fields(SECTIONS[section])}:
            raise ConfigError(f"{section}.{key}", "--set on a key that does not exist")
    if isinstance(raw.get("run", {}), dict):
        raw.setdefault("run", {})["name"] = name
    return from_dict(raw)


# ---------------------------------------------------------------------------- writing


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for f in fields(cfg):
        section = getattr(cfg, f.name)
        table = {k: v for k, v in dataclasses.asdict(section).items() if k != "params"}
        if isinstance(section, (CompressorConfig, AlgorithmConfig)) and section.params:
            table.update(dataclasses.asdict(section.params))
        out[f.name] = {k: v for k, v in table.items() if v is not None}
    return out


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML text; ``from_dict(tomllib.loads(to_toml(c))) == c``."""
    lines = []
    for section, table in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


def loads(text: str) -> Config:
    return from_dict(tomllib.loads(text))


# ---------------------------------------------------------------------------- reference


def _field_docs(cls: type) -> dict[str, str]:
    """``#:`` comments of a dataclass's fields (trailing, or on the lines just above)."""
    import inspect
    import re

    docs: dict[str, str] = {}
    pending: list[str] = []
    joined: list[str] = []  # a field whose annotation spans lines is joined first
    for line in inspect.getsource(cls).splitlines():
        if joined and joined[-1].count("[") > joined[-1].count("]"):
            joined[-1] += " " + line.strip()
        else:
            joined.append(line)
    for line in joined:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        m = re.match(r"^(\w+)\s*:\s*[^=]+=.*?(?:#:\s*(.*))?$", stripped)
        if m and not stripped.startswith(("def ", "class ")):
            docs[m.group(1)] = " ".join(pending + ([m.group(2)] if m.group(2) else []))
        pending = [] if not stripped.startswith("#") else pending
    return docs


def reference_rows() -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every config key, compressor and algorithm keys
    included."""
    rows = []
    for section, cls in SECTIONS.items():
        docs = _field_docs(cls)
        for f in fields(cls):
            if f.name == "params":
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{section}.{f.name}", _toml_value(default), docs.get(f.name, "")))
    for name, comp in sorted(registry.lookup("compressors").items()):
        docs = _field_docs(comp.Config)
        for f in fields(comp.Config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"compressor.{f.name} ({name})", _toml_value(default),
                         docs.get(f.name, "")))
    for name, alg in sorted(registry.lookup("algorithms").items()):
        docs = _field_docs(alg.Config)
        for f in fields(alg.Config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"algorithm.{f.name} ({name})", _toml_value(default),
                         docs.get(f.name, "")))
    return rows


def reference_markdown() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | {m.replace('|', '/')} |" for k, d, m in reference_rows()]
    return "\n".join(lines)


def reference_text() -> str:
    """Every key as ``key = default`` with its meaning, for a terminal."""
    out = []
    for key, default, meaning in reference_rows():
        out += [f"{key} = {default}", *(f"    {line}" for line in _wrap(meaning))]
    return "\n".join(out)


def _wrap(text: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, 84) or [""]


def main(argv: typing.Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m fedmpi.config", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check a fedmpi run config and print it resolved: every key with its "
        "value,\nthe --set overrides applied and the run name that python -m fedmpi.train "
        "would use.\nOr list every config key with its default and meaning.",
        epilog="examples:\n"
        "  python -m fedmpi.config                          the default job, resolved\n"
        "  python -m fedmpi.config jobs/x.toml --set client.lr=0.1\n"
        "  python -m fedmpi.config --keys                   every key, default, meaning\n"
        "  python -m fedmpi.config --markdown               the same as README's table\n"
        "exit status: 0 valid, 2 a config error (printed with the key it names)")
    p.add_argument("config", nargs="?", help="TOML run file (default: the embedded "
                   "quickstart job)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--keys", action="store_true", help="list every key, its default and "
                      "meaning")
    what.add_argument("--markdown", action="store_true", help="the same as a markdown table")
    args = p.parse_args(argv)
    if args.keys or args.markdown:
        print(reference_text() if args.keys else reference_markdown())
        return 0
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as exc:
        print(f"fedmpi.config: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(to_toml(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
