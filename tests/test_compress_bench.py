"""The compressor throughput benchmark runs, is discovered by the dispatcher and prints
one row per compressor with the payload size the compressor reports."""

from __future__ import annotations

import math

from fedmpi.bench import __main__ as dispatcher
from fedmpi.bench import compress as bench


def test_dispatcher_finds_the_compress_benchmark():
    assert dispatcher.benchmarks()["compress"] == "fedmpi.bench.compress"


def test_resnet18_shapes_have_the_spec_size():
    shapes = bench.resnet18_shapes()
    assert len(shapes) == 42 and sum(math.prod(s) for s in shapes) == 11_169_162
    assert sum(math.prod(s) for s in bench.mlp_shapes()) == 199_210


def test_benchmark_prints_a_row_per_compressor(capsys):
    assert dispatcher.main(["compress", "--models", "mlp", "--only", "topk 1% global,qsgd s=1 b",
                            "--repeat", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("mlp")]
    assert [r[2] for r in rows] == ["torch.topk", "topk", "qsgd"]
    assert rows[1][-3] == "13,951"  # 1993 entries x (4 + 3) bytes
    assert rows[2][-3] == "51,363"  # ceil(199,210 * 2 / 8) + 4 * ceil(199,210 / 512)
    assert all(float(r[-5]) > 0 for r in rows)  # encode MB/s
