"""Loading, grouping and plotting shared by the scripts in ``analysis/``.

Run files are read only through :func:`fedmpi.metrics.open_run`. A run's resolved config
(the TOML text in its ``config`` attribute) decides where it belongs:

* its **method** is the compressor (``compressor.*``, ``server.aggregation``) and the
  perturbation estimator (``sam.*``): ``FedAvg``, ``3SFC``, ``FedSAM+Top-k``; where runs
  that share a name differ in one of those keys, the values are appended,
  ``3SFC (ef=false)`` (not where a key only changes with the setting, such as a byte
  budget matched to each dataset);
* its **setting** (a table row, a figure) is everything else that varies between the runs
  read: dataset and model always, plus e.g. ``num_clients=20`` (keys that change only
  together with the dataset and model, such as a per-dataset sample cap, are not shown).
  Keys that do not change the experiment (run name, seed, output folder, threads, device,
  evaluation and checkpoint cadence, data folder) are ignored; ``row_keys`` moves method
  keys to the setting (e.g. ``compressor.budget_bytes`` for a budget table);
* runs that share method and setting are the seeds of one cell: mean and sample standard
  deviation (ddof = 1; 0 with one seed) over them.

Accuracies are reported in percent. The compression ratio of a run is dense fp32 bytes
times participating clients over the uplink bytes the transport measured, summed over all
rounds. Plotting helpers import matplotlib (the ``analysis`` extra) lazily, with the Agg
backend, and save every figure as PNG and PDF.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmpi.config import tomllib
from fedmpi.metrics import Run, RunFileError, open_run

#: display names (config name -> paper name); unknown names are shown as they are
COMPRESSORS = {"identity": "FedAvg", "3sfc": "3SFC", "fedsynth": "FedSynth", "dgc": "DGC",
               "topk": "Top-k", "randk": "Rand-k", "signsgd": "signSGD", "stc": "STC",
               "qsgd": "QSGD", "topk_3sfc": "DGC (3SFC code)",
               "signsgd_3sfc": "signSGD (3SFC code)", "stc_3sfc": "STC (3SFC code)"}
ESTIMATORS = {"none": "", "fedsam": "FedSAM", "mofedsam": "MoFedSAM",
              "fedlesam": "FedLESAM", "fedsynsam": "FedSynSAM"}
#: algorithm.name -> the prefix of its method label (FedAvg, the default, adds none)
ALGORITHMS = {"fedavg": "", "fedprox": "FedProx", "scaffold": "SCAFFOLD"}
DATASETS = {"synthetic": "Synthetic", "mnist": "MNIST", "fmnist": "FMNIST",
            "emnist": "EMNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
MODELS = {"mlp": "MLP", "logreg": "LogReg", "mnistnet": "MnistNet", "convnet": "ConvNet",
          "lenet5": "LeNet-5", "resnet18": "ResNet-18", "regnetx_200mf": "RegNetX-200MF",
          "vgg11star": "VGG-11*"}

#: keys that never separate two runs (bookkeeping, not the experiment)
IGNORED_SECTIONS = ("eval", "checkpoint")
IGNORED_KEYS = {"run.name", "run.seed", "run.out_dir", "run.threads", "run.mpi_wait",
                "run.mpi_poll_max_ms", "run.hdf5_swmr", "run.device", "run.tensorboard",
                "data.root", "data.download", "data.check_md5", "run.round_timeout"}
METHOD_SECTIONS = ("algorithm", "compressor", "sam")
METHOD_KEYS = {"server.aggregation"}


# ---------------------------------------------------------------------------- loading


@dataclass
class RunInfo:
    """One run file with its parsed config."""

    path: str
    run: Run
    flat: dict[str, Any]  #: "section.key" -> value, from the stored TOML
    method: str = ""  #: filled by :func:`group`
    compressor: str = ""
    estimator: str = ""
    setting: str = ""

    @property
    def seed(self) -> int:
        return int(self.flat.get("run.seed", 0))

    @property
    def name(self) -> str:
        return str(self.flat.get("run.name", os.path.basename(self.path)))


def find_files(paths: Iterable[str]) -> list[str]:
    """``*.h5`` files: the files given, and every one below the folders given (sorted)."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            for root, _dirs, files in os.walk(p):
                out += [os.path.join(root, f) for f in files if f.endswith(".h5")]
        elif os.path.exists(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"no such run file or folder: {p}")
    seen, unique = set(), []
    for p in sorted(out):
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def flatten_config(toml_text: str) -> dict[str, Any]:
    doc = tomllib.loads(toml_text)
    return {f"{section}.{k}": (tuple(v) if isinstance(v, list) else v)
            for section, table in doc.items() for k, v in table.items()}


def load(paths: Iterable[str], include_incomplete: bool = False,
         warn: Callable[[str], None] | None = None) -> list[RunInfo]:
    """Open every run below ``paths``; incomplete runs are left out unless asked for."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    runs = []
    for p in find_files(paths):
        try:
            run = open_run(p)
        except RunFileError as exc:  # truncated, corrupt: named in about a second
            warn(f"skipping {exc}")
            continue
        except (OSError, KeyError) as exc:
            warn(f"skipping {p}: not a readable run file ({exc})")
            continue
        if not run.complete and not include_incomplete:
            warn(f"skipping {p}: incomplete ({len(run)} rounds written)")
            continue
        if len(run) == 0:
            warn(f"skipping {p}: no rounds written")
            continue
        runs.append(RunInfo(p, run, flatten_config(run.attrs["config"])))
    return runs


# ---------------------------------------------------------------------------- grouping


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.split(".")[0] in IGNORED_SECTIONS


def _is_method(key: str, row_keys: Sequence[str]) -> bool:
    return key not in row_keys and (key.split(".")[0] in METHOD_SECTIONS
                                    or key in METHOD_KEYS)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(_fmt(v) for v in value)
    return str(value)


def _varying(runs: Sequence[RunInfo], keys: Iterable[str]) -> list[str]:
    return [k for k in keys if len({repr(r.flat.get(k)) for r in runs}) > 1]


def _suffix(run: RunInfo, keys: Sequence[str]) -> str:
    return ", ".join(f"{k.split('.')[1]}={_fmt(run.flat.get(k))}" for k in keys)


def _label_parts(runs: Sequence[RunInfo], base: Callable[[RunInfo], str],
                 keys: Sequence[str]) -> dict[int, str]:
    """``base(run)``, plus the values of those ``keys`` that differ between runs of the same
    base *within one setting* (a key that only changes with the setting, such as a byte
    budget matched to each dataset, names no separate method)."""
    by_base: dict[str, list[RunInfo]] = {}
    for r in runs:
        by_base.setdefault(base(r), []).append(r)
    out = {}
    for b, members in by_base.items():
        by_row: dict[str, list[RunInfo]] = {}
        for r in members:
            by_row.setdefault(r.setting, []).append(r)
        vary = [k for k in keys if any(_varying(rows, [k]) for rows in by_row.values())]
        for r in members:
            out[id(r)] = f"{b} ({_suffix(r, vary)})" if vary and b else (
                _suffix(r, vary) if vary else b)
    return out


def _compressor_base(r: RunInfo) -> str:
    name = str(r.flat.get("compressor.name", "identity"))
    label = COMPRESSORS.get(name, name)
    if r.flat.get("server.aggregation") == "majority":
        label += " (majority vote)"
    alg = str(r.flat.get("algorithm.name", "fedavg"))  # runs before [algorithm]: FedAvg
    alg = ALGORITHMS.get(alg, alg)
    if alg:
        label = alg if label == "FedAvg" else f"{alg}+{label}"
    return label


def _estimator_base(r: RunInfo) -> str:
    name = str(r.flat.get("sam.name", "none"))
    return ESTIMATORS.get(name, name)


def setting_base(r: RunInfo) -> str:
    d, m = str(r.flat.get("data.dataset", "?")), str(r.flat.get("model.name", "?"))
    return f"{DATASETS.get(d, d)} / {MODELS.get(m, m)}"


@dataclass
class Table:
    """Runs arranged as settings (rows) x methods (columns), seeds in each cell."""

    rows: list[str]
    methods: list[str]
    cells: dict[tuple[str, str], list[RunInfo]] = field(default_factory=dict)

    def runs(self, row: str, method: str) -> list[RunInfo]:
        return self.cells.get((row, method), [])


def _sortable(v: Any) -> tuple:
    """Numbers (and booleans) by value before everything else by text."""
    return (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, repr(v))


def _method_order(r: RunInfo, keys: Sequence[str]) -> tuple:
    comp = str(r.flat.get("compressor.name", ""))
    est = str(r.flat.get("sam.name", "none"))
    ck = list(COMPRESSORS).index(comp) if comp in COMPRESSORS else len(COMPRESSORS)
    ek = list(ESTIMATORS).index(est) if est in ESTIMATORS else len(ESTIMATORS)
    return (ek, est, ck, comp, *(_sortable(r.flat.get(k)) for k in keys))


def _setting_order(r: RunInfo, keys: Sequence[str]) -> tuple:
    d, m = r.flat.get("data.dataset"), r.flat.get("model.name")
    out: list[Any] = [list(DATASETS).index(d) if d in DATASETS else len(DATASETS), str(d),
                      list(MODELS).index(m) if m in MODELS else len(MODELS), str(m)]
    out += [_sortable(r.flat.get(k)) for k in keys]
    return tuple(out)


def group(runs: Sequence[RunInfo], row_keys: Sequence[str] = (),
          warn: Callable[[str], None] | None = None) -> Table:
    """Label every run's method and setting and arrange them in a :class:`Table`."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    keys = sorted({k for r in runs for k in r.flat})
    comp_keys = [k for k in keys if _is_method(k, row_keys) and not k.startswith("sam.")]
    sam_keys = [k for k in keys if _is_method(k, row_keys) and k.startswith("sam.")]
    setting_keys = [k for k in keys if not _ignored(k) and not _is_method(k, row_keys)
                    and k not in ("data.dataset", "model.name")]
    by_base: dict[str, list[RunInfo]] = {}
    for r in runs:
        by_base.setdefault(setting_base(r), []).append(r)
    # keys that vary for one dataset/model (not those that only follow it, e.g. EMNIST caps)
    setting_vary = [k for k in setting_keys
                    if k in row_keys or any(_varying(g, [k]) for g in by_base.values())]
    setting_vary.sort(key=lambda k: (k not in row_keys, row_keys.index(k) if k in row_keys
                                     else 0, k))
    for r in runs:
        r.setting = setting_base(r) + "".join(
            f", {k.split('.')[1]}={_fmt(r.flat.get(k))}" for k in setting_vary)
    comp = _label_parts(runs, _compressor_base, [k for k in comp_keys
                                                 if k not in ("compressor.name",
                                                              "algorithm.name")])
    est = _label_parts(runs, _estimator_base, [k for k in sam_keys if k != "sam.name"])
    for r in runs:
        r.compressor, r.estimator = comp[id(r)], est[id(r)]
        if r.estimator and r.compressor == "FedAvg":
            r.method = r.estimator
        elif r.estimator:
            r.method = f"{r.estimator}+{r.compressor}"
        else:
            r.method = r.compressor
    ordered = sorted(runs, key=lambda r: _method_order(r, sam_keys + comp_keys))
    methods = list(dict.fromkeys(r.method for r in ordered))
    ordered = sorted(runs, key=lambda r: _setting_order(r, setting_vary))
    rows = list(dict.fromkeys(r.setting for r in ordered))
    table = Table(rows, methods)
    for r in sorted(runs, key=lambda r: (r.seed, r.path)):
        cell = table.cells.setdefault((r.setting, r.method), [])
        if any(o.seed == r.seed for o in cell):
            other = next(o for o in cell if o.seed == r.seed)
            warn(f"{r.path}: same setting, method and seed as {other.path}; kept the first")
            continue
        cell.append(r)
    return table


# ---------------------------------------------------------------------------- metrics


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return x[np.isfinite(x)]


def last_finite(x: np.ndarray) -> float:
    f = _finite(x)
    return float(f[-1]) if f.size else float("nan")


def compression_ratio(run: Run) -> float:
    """Dense fp32 bytes x participants / measured uplink bytes, over all rounds."""
    up = float(np.sum(run.rounds["uplink_bytes"]))
    dense = float(run.attrs["dense_bytes"]) * float(np.sum(run.rounds["participants"]))
    return dense / up if up > 0 else float("nan")


def byte_unit(n: float) -> tuple[float, str]:
    """The decimal unit that shows ``n`` bytes with 1 to 3 digits before the point."""
    scale, unit = 1.0, "B"
    for next_unit in ("KB", "MB", "GB", "TB"):
        if not math.isfinite(n) or abs(n) < 1000 * scale:
            break
        scale, unit = scale * 1000.0, next_unit
    return scale, unit


def fmt_bytes_stat(mean: float, std: float | None = None, pm: str = "±") -> str:
    """``3.18 KB`` or ``3.18 ± 0.02 KB``: three significant digits in the mean's unit
    (never ``0.003 ± 0.000 MB``), the std in the same unit and decimals."""
    if not math.isfinite(mean):
        return "nan"
    scale, unit = byte_unit(mean)
    v = mean / scale
    decimals = 0 if unit == "B" else max(0, 2 - int(math.floor(math.log10(abs(v)))) if v
                                          else 2)
    text = f"{v:.{decimals}f}"
    if std is not None:
        text += f" {pm} {std / scale:.{decimals}f}"
    return f"{text} {unit}"


@dataclass(frozen=True)
class Metric:
    label: str  #: axis or column title, with the unit
    fn: Callable[[Run], float]
    higher_is_better: bool
    fmt: str = "{:.2f}"
    is_bytes: bool = False  #: format with :func:`fmt_bytes_stat` (adaptive unit)

    def format(self, mean: float, std: float | None = None, pm: str = "±") -> str:
        """``mean`` (and ``std``) as a table cell shows them."""
        if self.is_bytes:
            return fmt_bytes_stat(mean, std, pm)
        return self.fmt.format(mean) + (f" {pm} {self.fmt.format(std)}" if std is not None
                                        else "")


def total_bytes(run: Run, key: str) -> float:
    return float(np.sum(run.rounds[key]))


METRICS: dict[str, Metric] = {
    "final_acc": Metric("final test accuracy (%)",
                        lambda r: 100 * last_finite(r.rounds["test_acc"]), True),
    "best_acc": Metric("best test accuracy (%)",
                       lambda r: 100 * float(np.max(_finite(r.rounds["test_acc"]),
                                                    initial=np.nan)), True),
    "final_loss": Metric("final test loss", lambda r: last_finite(r.rounds["test_loss"]),
                         False, "{:.4f}"),
    "final_train_loss": Metric("final train loss",
                               lambda r: last_finite(r.rounds["train_loss"]), False,
                               "{:.4f}"),
    "efficiency": Metric("mean compression efficiency (cosine)",
                         lambda r: float(np.mean(_finite(r.rounds["efficiency_mean"])))
                         if _finite(r.rounds["efficiency_mean"]).size else float("nan"),
                         True, "{:.4f}"),
    "ratio": Metric("uplink compression ratio (x)", compression_ratio, True, "{:.1f}"),
    "uplink": Metric("total uplink (bytes the clients sent)",
                     lambda r: total_bytes(r, "uplink_payload_bytes"), False, is_bytes=True),
    "downlink": Metric("total downlink (bytes the participants downloaded)",
                       lambda r: total_bytes(r, "downlink_payload_bytes"), False,
                       is_bytes=True),
    "traffic": Metric("total traffic (uplink + downlink bytes)",
                      lambda r: total_bytes(r, "uplink_payload_bytes")
                      + total_bytes(r, "downlink_payload_bytes"), False, is_bytes=True),
    "lmax": Metric("Hessian top eigenvalue", lambda r: last_finite(
        r.rounds["sharpness_lmax"]), False, "{:.3f}"),
    "trace": Metric("Hessian trace", lambda r: last_finite(r.rounds["sharpness_trace"]),
                    False, "{:.2f}"),
    "wall_time": Metric("wall time (s)", lambda r: last_finite(r.rounds["wall_time"]),
                        False, "{:.1f}"),
}


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  #: sample standard deviation (ddof 1), 0 for a single seed
    n: int


def stat(values: Sequence[float]) -> Stat:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if v.size == 0:
        return Stat(float("nan"), float("nan"), 0)
    return Stat(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size))


def cell_stat(runs: Sequence[RunInfo], metric: str) -> Stat:
    return stat([METRICS[metric].fn(r.run) for r in runs])


def best_methods(table: Table, row: str, metric: str) -> set[str]:
    """The methods of ``row`` whose mean is best (all of them on a tie)."""
    means = {m: cell_stat(table.runs(row, m), metric).mean for m in table.methods
             if table.runs(row, m)}
    means = {m: v for m, v in means.items() if math.isfinite(v)}
    if not means:
        return set()
    target = (max if METRICS[metric].higher_is_better else min)(means.values())
    return {m for m, v in means.items() if v == target}


# ---------------------------------------------------------------------------- series


#: the byte axes of a learning curve: name -> the per-round byte metrics summed
TRAFFIC = {"uplink": ("uplink_bytes",), "downlink": ("downlink_payload_bytes",),
           "total": ("uplink_bytes", "downlink_payload_bytes")}


@dataclass
class Series:
    """A per-round metric of one cell: mean and std over seeds, aligned on rounds."""

    rounds: np.ndarray  #: 1-based round numbers
    mean: np.ndarray
    std: np.ndarray
    x_bytes: np.ndarray  #: mean cumulative uplink bytes after each round
    n: int
    #: mean cumulative bytes after each round, per :data:`TRAFFIC` axis
    traffic: dict[str, np.ndarray] = field(default_factory=dict)


def series(runs: Sequence[RunInfo], key: str, scale: float = 1.0) -> Series:
    """``/rounds/<key>`` of each seed, cut to the shortest run; NaN rows stay NaN."""
    n = min(len(r.run) for r in runs)
    ys = np.stack([np.asarray(r.run.rounds[key][:n], dtype=float) * scale for r in runs])
    traffic = {axis: np.mean([np.cumsum(sum(np.asarray(r.run.rounds[k][:n], dtype=float)
                                            for k in keys)) for r in runs], axis=0)
               for axis, keys in TRAFFIC.items()}
    xs = np.stack([np.cumsum(np.asarray(r.run.rounds["uplink_bytes"][:n], dtype=float))
                   for r in runs])
    with warnings.catch_warnings():  # all-NaN rounds (no evaluation) stay NaN
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = np.nanmean(ys, axis=0)
        std = np.nanstd(ys, axis=0, ddof=1) if len(runs) > 1 else np.zeros(n)
    rounds = np.asarray(runs[0].run.rounds["round"][:n], dtype=float) + 1
    return Series(rounds, mean, np.nan_to_num(std), xs.mean(axis=0), len(runs), traffic)


# ---------------------------------------------------------------------------- plotting


def pyplot():
    """matplotlib.pyplot on the Agg backend, styled for papers."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the analysis scripts need matplotlib: pip install -e '.[analysis]'"
                         ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "figure.dpi": 100, "savefig.dpi": 200, "font.size": 9, "axes.titlesize": 10,
        "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
        "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5,
        "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 1.4,
        "savefig.bbox": "tight", "pdf.fonttype": 42,
    })
    return plt


#: the colour each method keeps in every figure (an index into :func:`palette`): the
#: compressors' paper names, the estimators' and "no SAM" (the sharpness bars' plain
#: runs, FedAvg's colour); other labels get a colour derived from their name
PREFERRED = {"FedAvg": 0, "no SAM": 0, "3SFC": 1, "DGC": 2, "Top-k": 3, "STC": 4,
             "signSGD": 5, "QSGD": 6, "Rand-k": 7, "FedSynth": 8, "FedSAM": 9,
             "MoFedSAM": 10, "FedLESAM": 12, "FedSynSAM": 14}


def palette() -> list[Any]:
    """20 distinct colours: tab10, then the darker half of tab20b."""
    import matplotlib

    tab10, tab20b = matplotlib.colormaps["tab10"], matplotlib.colormaps["tab20b"]
    return [tab10(i) for i in range(10)] + [tab20b(i) for i in range(0, 20, 2)]


def colors(methods: Sequence[str]) -> dict[str, Any]:
    """A colour per method label that depends on the label itself, not on which other
    methods a figure shows, so one method has one colour in every figure: the
    :data:`PREFERRED` colour of the label (or of its name before " (", "FedAvg (ef=...)"),
    else one chosen by a hash of the label; the next free one where two labels collide."""
    import zlib

    colours = palette()
    out: dict[str, Any] = {}
    used: set[int] = set()
    for m in methods:
        base = m.split(" (")[0]
        want = PREFERRED.get(m, PREFERRED.get(base, zlib.crc32(m.encode()) % len(colours)))
        i = want
        while i in used and len(used) < len(colours):
            i = (i + 1) % len(colours)
        used.add(i)
        out[m] = colours[i]
    return out


def plot_band(ax, x: np.ndarray, s: Series, label: str, color: Any,
              limits: tuple[float, float] | None = None, alpha: float = 0.2,
              **line) -> None:
    """A mean line with a +-std band over seeds, skipping rounds without a value; the band
    is clipped to ``limits`` (an accuracy band never leaves [0, 100] %)."""
    ok = np.isfinite(s.mean) & np.isfinite(x)
    if not ok.any():
        return
    ax.plot(x[ok], s.mean[ok], color=color, label=label, **line)
    if s.n > 1:
        low, high = (s.mean - s.std)[ok], (s.mean + s.std)[ok]
        if limits is not None:
            low, high = np.clip(low, *limits), np.clip(high, *limits)
        ax.fill_between(x[ok], low, high, color=color, alpha=alpha, linewidth=0)


def bytes_axis(ax, which: str = "x") -> None:
    """Tick labels in adaptive byte units (10 KB, 3 MB) on a byte axis."""
    from matplotlib.ticker import FuncFormatter

    def tick(v: float, _pos) -> str:
        scale, unit = byte_unit(v)
        return f"{v / scale:g} {unit}"

    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_formatter(FuncFormatter(tick))
    axis.set_minor_formatter(FuncFormatter(lambda v, pos: ""))


def integer_ticks(ax) -> None:
    """Whole numbers only on the x axis (rounds)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "figure"


def save(fig, out_base: str) -> list[str]:
    """Write ``out_base.png`` and ``out_base.pdf``; returns the paths."""
    os.makedirs(os.path.dirname(out_base) or ".", exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = f"{out_base}.{ext}"
        fig.savefig(path)
        paths.append(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def figure_legend(fig, axes, ncol: int | None = None) -> None:
    """One legend for the whole figure, below the panels."""
    handles, labels = [], []
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=ncol or min(len(labels), 5),
                   frameon=False, bbox_to_anchor=(0.5, -0.01))


def seeds_note(table: Table, row: str) -> str:
    ns = sorted({len(table.runs(row, m)) for m in table.methods if table.runs(row, m)})
    if not ns:
        return ""
    n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return f"mean over {n} seed(s)" + (", band = ±1 std" if ns[-1] > 1 else "")


# ---------------------------------------------------------------------------- command lines


def plain(text: str) -> str:
    """reStructuredText markup out of a docstring, for --help: ``x`` and :role:`x` -> x."""
    return re.sub(r"(?::\w+:)?`{1,2}([^`]+)`{1,2}", r"\1", text)


def cli(script: str, doc: str, separates: str = "figures",
        out: bool = True) -> argparse.ArgumentParser:
    """The arguments every analysis script shares: run files or folders, -o, --rows."""
    p = argparse.ArgumentParser(prog=f"python analysis/{script}.py",
                                description=plain(doc.split("\n\n")[0]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run files (.h5) or folders of them")
    if out:
        p.add_argument("-o", "--out", default="figures", help="output folder (default figures)")
    p.add_argument("--rows", nargs="*", default=[], metavar="SECTION.KEY",
                   help=f"config keys that separate {separates} rather than methods")
    p.add_argument("--include-incomplete", action="store_true")
    return p


def load_cli(script: str, args: argparse.Namespace) -> list[RunInfo]:
    """The runs named on a command line; a missing path exits 2 with a message."""
    try:
        return load(args.runs, args.include_incomplete)
    except FileNotFoundError as exc:
        print(f"{script}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
