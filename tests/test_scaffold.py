"""SCAFFOLD (fedmpi/algorithms/scaffold.py): the client's corrected steps and option II
control variates, and the server's x and c updates, by hand on a linear model; the
second uplink payload and the broadcast of c counted; convergence against FedAvg on
non-IID data; any compressor; rank invariance; resume restores c and every c_i."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmpi import algorithms, checkpoint, compress, config
from fedmpi.compress import Payload

from .algohelp import assert_same_runs, hand_sgd, linear_group
from .conftest import SMALL, run_and_open, run_train

ARGS = ["algorithm.name=scaffold", "client.local_steps=4", "client.batch_size=5",
        "client.lr=0.2"]


def test_client_steps_and_control_variate_by_hand():
    """y <- y - lr (g(y) - c_i + c); c_i+ = c_i - c + (x - y)/(K lr); uploads dy, dc."""
    cfg, group, shard = linear_group(ARGS)
    d = group.model.d
    gen = torch.Generator().manual_seed(9)
    c, c_i = torch.randn(d, generator=gen) * 0.1, torch.randn(d, generator=gen) * 0.1
    group.algorithm.receive(group.algorithm.parse(Payload({"c": c.numpy()}).to_bytes()), 3)
    group.states[5].algorithm = c_i.clone()
    x = group.model.params.clone()
    group.set_global(x)
    (res,) = group.run_round(3, [5])
    assert list(res.payloads) == ["update", "control"]
    assert all(p.nbytes == 4 * d for p in res.payloads.values())  # identity: 4 d each

    xn, cn, cin = x.double().numpy(), c.double().numpy(), c_i.double().numpy()
    y = hand_sgd(cfg, shard, xn, 3, 5, lambda w: cn - cin)
    k, lr = cfg.client.local_steps, cfg.client.lr
    c_plus = cin - cn + (xn - y) / (k * lr)
    dy = res.payloads["update"]["values"].astype(np.float64)
    dc = res.payloads["control"]["values"].astype(np.float64)
    np.testing.assert_allclose(dy, y - xn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dc, c_plus - cin, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(group.states[5].algorithm.double().numpy(), c_plus,
                               rtol=1e-4, atol=1e-5)


def test_first_round_without_c_is_fedavg_plus_a_control_upload():
    _, group, _ = linear_group(ARGS)
    _, plain, _ = linear_group(ARGS[1:])
    for g in (group, plain):
        g.set_global(plain.model.params.clone())
        g.algorithm.receive(g.algorithm.parse(np.zeros(0, dtype=np.uint8)), 0)
    a, b = group.run_round(0, [5])[0], plain.run_round(0, [5])[0]
    # (the fused SGD step of plain FedAvg rounds differently: float tolerance)
    np.testing.assert_allclose(a.payloads["update"]["values"], b.payload["values"],
                               rtol=1e-5, atol=1e-7)


def test_server_step_and_control_variate_by_hand():
    """x <- x + lr_g mean(dy); c <- c + (|S|/N) mean(dc); c broadcast as 4 d bytes."""
    cfg = config.load(None, ["algorithm.name=scaffold", "data.num_clients=5",
                             "server.lr=0.5"])
    d = 7
    spec = compress.ModelSpec(d=d, shapes=[(d,)])
    srv = algorithms.server_half(cfg, spec)
    assert srv.broadcast(0).nbytes == 0  # c = 0 everywhere: nothing to send in round 0
    gen = torch.Generator().manual_seed(1)
    c0 = torch.randn(d, generator=gen)
    srv.load_state_dict({"c": c0})
    dy = {1: torch.randn(d, generator=gen), 4: torch.randn(d, generator=gen)}
    dc = {1: torch.randn(d, generator=gen), 4: torch.randn(d, generator=gen)}
    step = srv.aggregate({"update": dy, "control": dc}, {1: 3, 4: 9}, torch.zeros(d))
    torch.testing.assert_close(step, 0.5 * (dy[1] + dy[4]) / 2)
    torch.testing.assert_close(srv.c, c0 + (2 / 5) * (dc[1] + dc[4]) / 2)
    sent = srv.broadcast(1)
    assert sent.nbytes == 4 * d
    np.testing.assert_array_equal(sent["c"], srv.c.numpy())
    again = algorithms.server_half(cfg, spec)
    again.load_state_dict(srv.state_dict())
    torch.testing.assert_close(again.c, srv.c)
    with pytest.raises(config.ConfigError, match="server.aggregation"):
        config.load(None, ["algorithm.name=scaffold", "server.aggregation=majority"])


SCAF = [*SMALL, "--set", "algorithm.name=scaffold"]


def test_bytes_of_both_payloads_and_the_broadcast(tmp_path):
    run = run_and_open(tmp_path, 1, SCAF)
    d, n = int(run.attrs["num_params"]), 6
    assert (run.clients["uplink_bytes"] == 2 * 4 * d).all()  # dy and dc, dense
    assert (run.rounds["uplink_payload_bytes"] == n * 2 * 4 * d).all()
    # dense model every round, c from round 1 on
    assert list(run.rounds["downlink_payload_bytes"]) == [n * 4 * d] + [n * 8 * d] * 2
    assert (run.rounds["compression_ratio_up"] == 1.0).all()


def test_scaffold_is_not_worse_than_fedavg_on_non_iid_data(tmp_path):
    common = [*SMALL, "--set", "run.rounds=12", "--set", "client.local_steps=10",
              "--set", "data.syn_alpha=1", "--set", "data.syn_beta=1"]
    fedavg = run_and_open(tmp_path, 1, common, name="fedavg")
    scaffold = run_and_open(tmp_path, 1, [*common, "--set", "algorithm.name=scaffold"],
                            name="scaffold")
    acc, base = scaffold.rounds["test_acc"], fedavg.rounds["test_acc"]
    assert scaffold.rounds["test_loss"][-1] < scaffold.rounds["test_loss"][0]
    assert acc[-1] > 0.2  # 10 classes: chance is 0.1
    assert acc[-3:].mean() >= base[-3:].mean() - 0.05, (acc, base)


@pytest.mark.parametrize("comp", [["compressor.name=topk", "compressor.ef=true"],
                                  ["compressor.name=qsgd"]], ids=["topk-ef", "qsgd"])
def test_any_compressor_and_rank_invariance(tmp_path, comp):
    args = [*SCAF, "--set", "server.participation=0.5",
            *(x for c in comp for x in ("--set", c))]
    one = run_and_open(tmp_path, 1, args, name="one")
    three = run_and_open(tmp_path, 3, args, name="three")
    assert_same_runs(one, three)
    d = int(one.attrs["num_params"])
    per_client = one.clients["uplink_bytes"][one.clients["participation"] == 1]
    assert (per_client > 0).all() and (per_client < 2 * 4 * d).all()  # both compressed
    assert np.isfinite(one.rounds["test_loss"]).all()


def test_resume_restores_c_and_every_c_i(tmp_path):
    """A run checkpointed at the top of round 2 and resumed there on another rank count
    equals the uninterrupted run: c (server) and c_i (clients) come back."""
    args = [*SCAF, "--set", "compressor.name=topk", "--set", "compressor.ef=true",
            "--set", "server.participation=0.5", "--set", "checkpoint.every=2"]
    reference = run_and_open(tmp_path, 2, [*args, "--set", "run.rounds=5"], name="ref")
    run_train(tmp_path, 3, [*args, "--set", "run.rounds=3"], name="f")
    state = checkpoint.load(str(tmp_path / "f.ckpt"))
    assert state["round"] == 2 and state["algorithm"]["c"] is not None
    assert any(s.algorithm is not None for s in state["clients"].values())
    assert all("control" in s.payloads for s in state["clients"].values())
    resumed = run_and_open(tmp_path, 2, [*args, "--set", "run.rounds=5", "--resume"],
                           name="f")
    assert resumed.complete and list(resumed.attrs["resumed_at_rounds"]) == [2]
    assert_same_runs(resumed, reference)
