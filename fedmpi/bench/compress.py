"""``python -m fedmpi.bench compress``: encode / decode throughput of every compressor.

For the MLP on MNIST (d = 199,210, 6 tensors) and ResNet-18 without BatchNorm on CIFAR-10
(d = 11,169,162, 42 tensors) it times, on one Gaussian update vector, side by side in one
process:

* ``encode``: ``Compressor.encode`` up to the payload (numpy wire arrays);
* ``decode``: what the server does, ``parse`` of the wire bytes then ``decode``;
* ``topk``: a plain ``torch.topk(|x|, ceil(0.01 d))`` of the same vector, the yardstick.

It prints MB/s of dense fp32 input (4 d bytes / median seconds), the payload size and the
encode and decode times as multiples of that torch.topk (``x topk``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from fedmpi import compress, config
from fedmpi.compress import Context, ModelSpec

NAME = "compress"


def mlp_shapes() -> list[tuple[int, ...]]:
    return [(200, 784), (200,), (200, 200), (200,), (10, 200), (10,)]


def resnet18_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    """The 42 tensors of the CIFAR ResNet-18 with conv biases and no BatchNorm."""
    shapes: list[tuple[int, ...]] = [(64, 3, 3, 3), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            shapes += [(cout, cin, 3, 3), (cout,), (cout, cout, 3, 3), (cout,)]
            if block == 0 and (stride != 1 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,)]
            cin = cout
    return shapes + [(num_classes, 512), (num_classes,)]


#: label -> [compressor] table of the benchmarked configurations
CASES: dict[str, dict] = {
    "identity": {"name": "identity"},
    "topk 1% per-layer": {"name": "topk", "ratio": 0.01},
    "topk 1% global": {"name": "topk", "ratio": 0.01, "per_layer": False},
    "randk 1% seed": {"name": "randk", "ratio": 0.01},
    "randk 1% indices": {"name": "randk", "ratio": 0.01, "shared_seed": False},
    "dgc 0.1%": {"name": "dgc", "ratio": 0.001},
    "signsgd l1": {"name": "signsgd"},
    "stc 1/400": {"name": "stc", "ratio": 0.0025},
    "qsgd s=15 b=512": {"name": "qsgd", "levels": 15, "bucket": 512},
    "qsgd s=1 b=512": {"name": "qsgd", "levels": 1, "bucket": 512},
}


def timed(fn, repeat: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(label: str, shapes, repeat: int, device: torch.device, only: list[str]
                ) -> list[tuple]:
    d = sum(math.prod(s) for s in shapes)
    spec = ModelSpec(d=d, shapes=shapes, device=device)
    x = torch.randn(d, generator=torch.Generator().manual_seed(0)).to(device)
    k = math.ceil(0.01 * d)
    t_topk = timed(lambda: torch.topk(x.abs(), k, sorted=False), repeat, device)
    rows = [(label, d, "torch.topk 1%", 4 * d / t_topk / 1e6, float("nan"), k * 8, 1.0,
             float("nan"))]
    for case, table in CASES.items():
        if only and not any(o in case for o in only):
            continue
        comp = compress.build(config.from_dict({"compressor": table}).compressor, spec)
        ctx = Context(round=0, client=0, seed=0, spec=spec)
        state = comp.init_state(0)
        payload, _ = comp.encode(x, state, ctx)
        buf = payload.to_bytes()
        t_enc = timed(lambda c=comp, s=state, cx=ctx: c.encode(x, s, cx), repeat, device)
        t_dec = timed(lambda c=comp, b=buf, cx=ctx: c.decode(c.parse(b, cx), cx), repeat,
                      device)
        rows.append((label, d, case, 4 * d / t_enc / 1e6, 4 * d / t_dec / 1e6,
                     payload.nbytes, t_enc / t_topk, t_dec / t_topk))
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fedmpi.bench compress",
                                description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="timed calls per measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--models", default="mlp,resnet18", help="mlp and/or resnet18")
    p.add_argument("--only", default="", help="comma-separated substrings of case names")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    only = [o for o in args.only.split(",") if o]
    models = {"mlp": mlp_shapes(), "resnet18": resnet18_shapes()}
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, models[name], args.repeat, device, only)
    print(f"fedmpi compressor throughput: device {device}, {torch.get_num_threads()} torch "
          f"thread(s), median of {args.repeat}; MB/s of dense fp32 input; x topk = time / "
          "torch.topk(|x|, 1%) of the same vector")
    head = (f"{'model':<9} {'d':>11} {'compressor':<18} {'enc MB/s':>9} {'dec MB/s':>9} "
            f"{'payload B':>11} {'enc x topk':>10} {'dec x topk':>10}")
    print(head)
    print("-" * len(head))
    for label, d, case, enc, dec, nbytes, renc, rdec in rows:
        print(f"{label:<9} {d:>11,} {case:<18} {enc:>9.0f} {_fmt(dec, '9.0f')} "
              f"{nbytes:>11,} {renc:>10.2f} {_fmt(rdec, '10.2f')}")
    return 0


def _fmt(v: float, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if np.isnan(v) else format(v, spec)
