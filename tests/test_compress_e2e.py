"""End to end on real MNIST, every compressor at -n 1 and -n 3 (mpiexec): the bytes MPI
moved equal the payload bytes (per round and per client), the run is the same whatever
the number of ranks, and the model learns (test accuracy far above the 10% of chance)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import mnist_root, run_and_open

ROOT = mnist_root()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(ROOT is None, reason="real MNIST files not found")]

ROUNDS = 6
BASE = ["--set", "data.dataset=mnist", "--set", f"data.root={ROOT}",
        "--set", "data.partition=iid", "--set", "data.num_clients=5",
        "--set", f"run.rounds={ROUNDS}", "--set", f"eval.every={ROUNDS}",
        "--set", "run.threads=1", "--set", "client.local_steps=5",
        "--set", "client.lr=0.2", "--set", "model.hidden=200"]


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


CASES = {
    "topk": sets("compressor.name=topk", "compressor.ef=true", "compressor.ratio=0.1"),
    "randk": sets("compressor.name=randk", "compressor.ef=true", "compressor.scaled=false",
                  "compressor.ratio=0.1"),
    "dgc": sets("compressor.name=dgc", "compressor.ratio=0.05", "compressor.warmup_rounds=2",
                "compressor.momentum=0.5", "compressor.clip_norm=5.0"),
    "signsgd": sets("compressor.name=signsgd", "compressor.ef=true"),
    "signsgd-majority": sets("compressor.name=signsgd", "compressor.scale=none",
                             "server.aggregation=majority", "server.lr=0.003"),
    # STC up/down; 3 of 5 clients per round, so clients miss rounds and download the cache
    "stc-updown": sets("compressor.name=stc", "compressor.ef=true", "compressor.ratio=0.05",
                       "compressor.downlink=same", "server.participation=0.6"),
    "qsgd": sets("compressor.name=qsgd", "compressor.levels=1"),
}


def check_bytes(run) -> None:
    r, c = run.rounds, run.clients
    np.testing.assert_array_equal(r["uplink_bytes"], r["uplink_payload_bytes"])
    np.testing.assert_array_equal(r["uplink_bytes"], c["uplink_bytes"].sum(axis=1))
    part = c["participation"].astype(bool)
    assert (c["uplink_bytes"][~part] == 0).all() and (c["uplink_bytes"][part] > 0).all()
    dense = 4 * int(run.attrs["num_params"])
    np.testing.assert_allclose(r["compression_ratio_up"],
                               dense * part.sum(axis=1) / r["uplink_bytes"])
    eff = c["efficiency"][part]
    assert np.isfinite(eff).all() and (eff > 0).all() and (eff <= 1 + 1e-6).all()
    np.testing.assert_allclose(r["efficiency_mean"],
                               np.nanmean(np.where(part, c["efficiency"], np.nan), axis=1))


def check_missed_round_downloads(run, client_ranks: int) -> None:
    """STC up/down: each participant downloads every broadcast since it last took part
    (capped at the dense model); the broadcasts themselves are what MPI moved."""
    r, part = run.rounds, run.clients["participation"].astype(bool)
    sizes = r["transport_downlink_bytes"] / client_ranks
    assert sizes[0] == 0 and (sizes[1:] > 0).all()
    dense = 4 * int(run.attrs["num_params"])
    assert (sizes[1:] < dense / 10).all()
    np.testing.assert_allclose(r["compression_ratio_down"][1:], dense / sizes[1:])
    last = np.full(part.shape[1], -1)
    for t in range(len(sizes)):
        want = 0
        for cid in np.flatnonzero(part[t]):
            want += min(dense, sizes[last[cid] + 1:t + 1].sum())
            last[cid] = t
        assert r["downlink_payload_bytes"][t] == want
    assert not part.all()  # some client did miss rounds


@pytest.mark.parametrize("case", list(CASES))
def test_compressor_end_to_end(tmp_path, case):
    runs = {n: run_and_open(tmp_path, n, BASE + CASES[case], name=f"{case}-n{n}")
            for n in (1, 3)}
    for n, run in runs.items():
        assert run.complete and len(run) == ROUNDS
        check_bytes(run)
        if case == "stc-updown":
            check_missed_round_downloads(run, client_ranks=1 if n == 1 else 2)
    one, three = runs[1], runs[3]
    for key in ("test_acc", "test_loss", "uplink_bytes", "downlink_payload_bytes"):
        np.testing.assert_array_equal(one.rounds[key], three.rounds[key], err_msg=key)
    for key in ("efficiency", "uplink_bytes", "train_loss"):
        np.testing.assert_array_equal(one.clients[key], three.clients[key], err_msg=key)
    acc = float(three.rounds["test_acc"][-1])
    assert acc > 0.4, f"{case}: final test accuracy {acc:.3f}"
