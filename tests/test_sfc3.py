"""3SFC compressor: bytes, budget, config, scale and EF, bit-exact server decode (in one
process and across MPI ranks), E-3SFC double-way downlink, end-to-end real-MNIST runs.

Run as a module under mpiexec (``python -m mpi4py -m tests.test_sfc3 --mpi-decode-check``)
it is the multi-rank decode check that ``test_server_decode_bitwise_across_ranks`` starts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmpi import compress, config, data, downlink, launch, synth
from fedmpi.compress import Context, ErrorFeedback, ModelSpec
from fedmpi.compress.sfc3 import SFC3
from fedmpi.config import ConfigError
from fedmpi.models import FlatModel, build_module
from fedmpi.server import Server
from tests.conftest import REPO, mnist_root, run_and_open
from tests.test_synth import mnist_samples

MNIST = (1, 28, 28)


def make_model(shape=MNIST, classes=10, hidden=32, seed=0) -> FlatModel:
    return FlatModel(build_module(config.ModelConfig(hidden=hidden), shape, classes, seed))


def spec_of(model: FlatModel, shape=MNIST, classes=10) -> ModelSpec:
    return ModelSpec(d=model.d, shapes=model.shapes, input_shape=shape, num_classes=classes)


def load_cfg(*sets: str, name: str = "3sfc") -> config.Config:
    return config.load(None, [f"compressor.name={name}", "data.dataset=mnist",
                              "data.partition=iid", *sets])


def build(model, *sets, shape=MNIST, classes=10, name="3sfc"):
    cfg = load_cfg(*sets, name=name)
    return compress.build(cfg.compressor, spec_of(model, shape, classes)), cfg


def real_updates(model: FlatModel, w: torch.Tensor, n: int, shape=MNIST, classes=10,
                 seed=0, steps=3, lr=0.2) -> list[torch.Tensor]:
    """n client updates w_K - w of a few SGD steps on random inputs with hard labels."""
    from fedmpi.synth import SynthModel

    sm = SynthModel(model)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        cur = w.clone()
        for _ in range(steps):
            x = torch.rand((16, *shape), generator=g)
            y = F.one_hot(torch.randint(0, classes, (16,), generator=g), classes).float()
            cur = cur - lr * sm.grad(cur, x, y)
        out.append(cur - w)
    return out


def contexts(clients, w, model, round_=3, seed=0, spec=None):
    spec = spec or ModelSpec(d=w.numel(), shapes=[])
    return [Context(round=round_, client=c, seed=seed, spec=spec, global_params=w,
                    model=model) for c in clients]


def scrambled_replica(seed=0, **kw) -> FlatModel:
    """A client rank's model: same architecture, last trained weights (scratch)."""
    replica = make_model(seed=seed, **kw)
    replica.params.copy_(torch.randn(replica.d, generator=torch.Generator().manual_seed(99)))
    return replica


# ---------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("m", [1, 3])
def test_payload_bytes_formula_and_parse(m):
    model = make_model()
    comp, _ = build(model, f"compressor.m={m}", "compressor.s_steps=1",
                    "compressor.max_iter=2", "compressor.ef=false")
    w = model.params.clone()
    u = real_updates(model, w, 1)[0]
    (payload, _), = comp.encode_many([u], [None], contexts([0], w, model))
    assert payload.nbytes == 4 * (m * (784 + 10) + 1)
    assert [(k, v.dtype, v.size) for k, v in payload.fields.items()] == [
        ("x", np.float32, m * 784), ("y", np.float32, m * 10), ("scale", np.float32, 1)]
    back = comp.parse(payload.to_bytes(), contexts([0], w, model)[0])
    assert all(np.array_equal(back[k], payload[k]) for k in payload.fields)
    with pytest.raises(ValueError):
        comp.parse(payload.to_bytes()[:-1], contexts([0], w, model)[0])


def test_mnist_mlp_compression_ratio_is_250_6():
    model = make_model(hidden=200)
    assert model.d == 199_210
    comp, _ = build(model)
    assert comp.dense_bytes() == 796_840
    assert 4 * comp.inner.payload_floats == 3_180
    assert round(comp.dense_bytes() / 3_180, 1) == 250.6


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("budget, key, m", [
    ("compressor.budget=795", None, 1),          # exactly M = 1: 794 + 1 floats
    ("compressor.budget=1588", None, 1),
    ("compressor.budget=1589", None, 2),
    ("compressor.budget_bytes=3180", None, 1),
    ("compressor.budget_bytes=6355", None, 1),   # 1588 floats
    ("compressor.budget_bytes=6356", None, 2),   # 1589 floats = 2 (794) + 1
    ("compressor.budget=794", "compressor.budget", 0),
    ("compressor.budget_bytes=3179", "compressor.budget_bytes", 0),
])
def test_budget_gives_m_or_an_error(budget, key, m):
    model = make_model()
    if key is None:
        comp, cfg = build(model, budget, "compressor.ef=false")
        assert comp.m == m
        floats = cfg.compressor.params.budget or cfg.compressor.params.budget_bytes // 4
        assert 4 * comp.payload_floats <= 4 * floats
        assert (comp.m + 1) * 794 + 1 > floats  # the largest M that fits
    else:
        with pytest.raises(ConfigError) as err:
            build(model, budget)
        assert err.value.key == key
        assert "795 floats" in str(err.value)


@pytest.mark.parametrize("sets, key", [
    (["compressor.m=0"], "compressor.m"),
    (["compressor.s_steps=0"], "compressor.s_steps"),
    (["compressor.lambd=-1.0"], "compressor.lambd"),
    (["compressor.lr=0.0"], "compressor.lr"),
    (["compressor.max_iter=0"], "compressor.max_iter"),
    (["compressor.batch_clients=0"], "compressor.batch_clients"),
    (["compressor.budget=-1"], "compressor.budget"),
    (["compressor.budget=900", "compressor.budget_bytes=4000"], "compressor.budget"),
    (["compressor.m=2", "compressor.budget=2000"], "compressor.m"),
    (["compressor.optimizer='adam'"], "compressor.optimizer"),
    (["compressor.eval_mode='jit'"], "compressor.eval_mode"),
    (["compressor.lambda=0.1"], "compressor.lambda"),
])
def test_bad_keys_are_named(sets, key):
    with pytest.raises(ConfigError) as err:
        load_cfg(*sets)
    assert err.value.key == key


def test_factored_eval_mode_needs_a_dense_chain():
    """eval_mode = factored is refused, naming the key, for a convolutional model (by
    shapes when the compressor is built); accepted and the auto default for the MLP."""
    mlp = make_model()
    comp, _ = build(mlp, "compressor.eval_mode='factored'", "compressor.ef=false")
    assert synth.Layers.of(comp.direction(mlp)) is not None
    conv = FlatModel(build_module(config.ModelConfig(name="mnistnet"), MNIST, 10, 0))
    with pytest.raises(ConfigError) as err:
        build(conv, "compressor.eval_mode='factored'")
    assert err.value.key == "compressor.eval_mode"
    build(conv)  # auto: fine (loop evaluation)
    assert synth.resolve_mode("auto", torch.device("cpu"), comp.direction(mlp)) == "factored"


def test_ef_is_on_by_default_for_3sfc_only():
    assert load_cfg().compressor.ef is True
    assert load_cfg("compressor.ef=false").compressor.ef is False
    assert load_cfg(name="fedsynth").compressor.ef is False
    assert load_cfg(name="identity").compressor.ef is False
    cfg = load_cfg("compressor.s_steps=3")
    assert config.loads(config.to_toml(cfg)) == cfg  # the resolved value is stored
    model = make_model()
    assert isinstance(build(model)[0], ErrorFeedback)
    assert isinstance(build(model, "compressor.ef=false")[0], SFC3)


# ---------------------------------------------------------------------------- encoder


def test_decoded_update_reproduces_one_real_sample_gradient():
    """u = grad of one real MNIST sample (7x7) with a one-hot label: through the
    compressor, some of 4 clients' random starts decode to cos > 0.99 and ~u. (LBFGS
    without line search misses from some starts; see test_synth.)"""
    x, labels = mnist_samples(1)
    shape = tuple(x.shape[1:])
    model = make_model(shape, hidden=16)
    w = model.params.clone()
    comp, _ = build(model, "compressor.ef=false", shape=shape)
    from fedmpi.synth import SynthModel

    u = SynthModel(model).grad(w, x, F.one_hot(labels, 10).float())
    out = comp.compress_many([u] * 4, [None] * 4, contexts(range(4), w, model))
    best = max(out, key=lambda o: float(F.cosine_similarity(o[2], u, 0)))
    payload, _, decoded, target = best
    assert target is u
    assert float(F.cosine_similarity(decoded, u, 0)) > 0.99
    assert float((decoded - u).norm() / u.norm()) < 0.15
    assert float(payload["scale"][0]) != 0.0


def test_scale_and_error_feedback_residual():
    model = make_model()
    w = model.params.clone()
    comp, _ = build(model, "compressor.s_steps=1", "compressor.max_iter=5")
    assert isinstance(comp, ErrorFeedback)
    direction = comp.inner.direction(model)
    state = comp.init_state(7)
    assert torch.equal(state.residual, torch.zeros(model.d))
    updates = real_updates(model, w, 2)
    for r, update in enumerate(updates):
        old = state.residual.clone()
        (payload, state, decoded, target), = comp.compress_many(
            [update], [state], contexts([7], w, model, round_=r))
        assert torch.equal(target, update + old)  # u = update + e
        x = torch.from_numpy(payload["x"]).view(1, *MNIST)
        y = torch.from_numpy(payload["y"]).view(1, 10)
        g = direction(w, x, y)
        s = float(payload["scale"][0])
        expected = float(torch.dot(g, target)) / float(torch.dot(g, g))
        assert s == float(np.float32(expected))  # s = <g*, u> / ||g*||^2, sent as fp32
        assert torch.equal(decoded, g * s)  # the decoder: s g* at w^t
        assert torch.equal(state.residual, target - decoded)  # e <- u - s g*
        # s g* is the projection of u on g*: the residual is orthogonal to g*
        assert abs(float(torch.dot(state.residual, g))) <= 1e-4 * float(
            state.residual.norm() * g.norm())
        assert float(state.residual.norm()) < float(target.norm())


def test_zero_update_gives_zero_scale_and_no_nan():
    model = make_model()
    w = model.params.clone()
    comp, _ = build(model, "compressor.s_steps=2")
    (payload, state, decoded, _), = comp.compress_many(
        [torch.zeros(model.d)], [comp.init_state(0)], contexts([0], w, model))
    assert float(payload["scale"][0]) == 0.0
    assert all(bool(np.isfinite(v).all()) for v in payload.fields.values())
    assert torch.equal(decoded, torch.zeros(model.d))
    assert torch.equal(state.residual, torch.zeros(model.d))


def test_encoding_uses_global_weights_not_the_scratch_model():
    """The replica model holds the last trained weights; the payload depends only on w^t
    (and the replica's weights are left as they were)."""
    model = make_model()
    w = model.params.clone()
    comp, _ = build(model, "compressor.s_steps=1", "compressor.ef=false")
    u = real_updates(model, w, 1)[0]
    a, = comp.encode_many([u], [None], contexts([0], w, model))
    replica = scrambled_replica()
    scratch = replica.params.clone()
    b, = comp.encode_many([u], [None], contexts([0], w, replica))
    assert np.array_equal(a[0].to_bytes(), b[0].to_bytes())
    assert torch.equal(replica.params, scratch)


def test_batched_encoding_equals_one_client_at_a_time():
    """Chunks of any size give the same payload bits (loop evaluation on the CPU)."""
    model = make_model()
    w = model.params.clone()
    comp, _ = build(model, "compressor.s_steps=2", "compressor.ef=false")
    ups = real_updates(model, w, 3)
    together = comp.encode_many(ups, [None] * 3, contexts(range(3), w, model))
    for i in range(3):
        (alone, _), = comp.encode_many([ups[i]], [None], contexts([i], w, model))
        assert np.array_equal(alone.to_bytes(), together[i][0].to_bytes())


@pytest.mark.parametrize("name", ["3sfc", "fedsynth"])
def test_a_fit_passed_in_the_context_runs_the_compressors_solver_and_leaves_it_pure(name):
    """Context.fit (a fit pool's FitPool.fit) gets the call's problems once, with the
    compressor's own synth.Solver; the payloads equal the local fit's bit for bit, and
    nothing is attached to the compressor (issue 21: compressors are pure)."""
    import dataclasses

    model = make_model()
    w = model.params.clone()
    sets = ["compressor.s_steps=2", "compressor.max_iter=3"]
    comp, _ = build(model, *sets, *(["compressor.batches=2"] if name == "fedsynth" else []),
                    name=name)
    assert comp.fits and comp.batch_clients > 1
    ups = real_updates(model, w, 3)
    states = [comp.init_state(c) for c in range(3)]
    local = comp.compress_many(ups, states, contexts(range(3), w, model))
    before = dict(vars(comp)), dict(vars(getattr(comp, "inner", comp)))
    calls = []

    def fit(round_, solver, targets, x0, y0):
        calls.append((round_, solver, targets.shape[0]))
        return solver(targets, x0, y0)

    ctxs = [dataclasses.replace(c, fit=fit) for c in contexts(range(3), w, model)]
    pooled = comp.compress_many(ups, states, ctxs)
    assert [(r, n) for r, _, n in calls] == [(3, 3)]  # one fit, every client's problems
    solver = calls[0][1]
    assert isinstance(solver, synth.Solver) and solver.d == model.d
    for (p, _, d, t), (q, _, e, u) in zip(local, pooled, strict=True):  # (state: t - d)
        assert np.array_equal(p.to_bytes(), q.to_bytes())
        assert torch.equal(d, e) and torch.equal(t, u)
    assert (dict(vars(comp)), dict(vars(getattr(comp, "inner", comp)))) == before
    with pytest.raises(RuntimeError, match="same w"):  # one pooled fit: one w^t
        comp.compress_many(ups[:2], states[:2], [ctxs[0], dataclasses.replace(
            ctxs[1], global_params=w.clone())])


# ---------------------------------------------------------------------------- server decode


def make_server(cfg: config.Config, model: FlatModel, comp, spec: ModelSpec) -> Server:
    test = data.ArrayDataset(np.zeros((2, *MNIST), dtype=np.uint8), np.zeros(2, np.int64))
    return Server(cfg, model, comp, spec, test, data.Normalizer(data.info(cfg.data)))


def test_server_decode_is_bitwise_the_clients_decode():
    server_model = make_model()
    w = server_model.params.clone() + 0.01 * torch.randn(
        server_model.d, generator=torch.Generator().manual_seed(5))
    server_model.load(w)
    spec = spec_of(server_model)
    comp, cfg = build(server_model, "compressor.s_steps=2")
    replica = scrambled_replica()
    global_params = w.clone()  # the client rank's own copy of w^t
    ups = real_updates(server_model, w, 4)
    states = [comp.init_state(c) for c in range(4)]
    out = comp.compress_many(ups, states, contexts(range(4), global_params, replica,
                                                   spec=spec))
    buf = np.concatenate([p.to_bytes() for p, *_ in out])
    server = make_server(cfg, server_model, comp, spec)
    decoded = server.decode(3, [0, 1, 2, 3], [p.nbytes for p, *_ in out], buf)
    for c, (_, _, client_decoded, _) in enumerate(out):
        assert torch.equal(decoded[c], client_decoded)
    assert torch.equal(server_model.params, w)  # decoding never writes w^t


def mpi_decode_check() -> int:
    """Rank 0 is the server; ranks 1.. own clients 0..4 round-robin. Every client rank
    encodes its clients together and sends payload bytes + its decoded updates; rank 0
    decodes the bytes with Server.decode and compares bit for bit."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    model = make_model()
    w = model.params.clone() + 0.01 * torch.randn(
        model.d, generator=torch.Generator().manual_seed(5))
    spec = spec_of(model)
    comp, cfg = build(model, "compressor.s_steps=2")
    mine = [c for c in range(5) if rank > 0 and c % (size - 1) == rank - 1]
    sent = []
    if mine:
        replica = scrambled_replica()
        ups = real_updates(model, w, 5)
        out = comp.compress_many([ups[c] for c in mine], [comp.init_state(c) for c in mine],
                                 contexts(mine, w.clone(), replica, spec=spec))
        sent = [(c, p.to_bytes(), d.numpy()) for c, (p, _, d, _) in zip(mine, out,
                                                                          strict=True)]
    gathered = comm.gather(sent, root=0)
    if rank != 0:
        return 0
    wire = [item for part in gathered for item in part]
    model.load(w)
    server = make_server(cfg, model, comp, spec)
    decoded = server.decode(3, [c for c, _, _ in wire], [b.size for _, b, _ in wire],
                            np.concatenate([b for _, b, _ in wire]))
    bad = [c for c, _, d in wire if not np.array_equal(decoded[c].numpy(), d)]
    print(f"clients {sorted(decoded)} decoded; mismatches {bad}", flush=True)
    return 1 if bad or len(wire) != 5 else 0


@pytest.mark.slow
def test_server_decode_bitwise_across_ranks():
    env = launch.environment()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(launch.command(3, "tests.test_sfc3", ["--mpi-decode-check"]),
                          capture_output=True, text=True, timeout=240, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "clients [0, 1, 2, 3, 4] decoded; mismatches []" in proc.stdout


# ---------------------------------------------------------------------------- downlink


def test_double_way_downlink_keeps_replicas_identical():
    """E-3SFC: the server compresses its step (+ its own residual) with 3SFC; a client
    rank's replica that adds the broadcast decode equals the server's model bit for bit."""
    server_model, client_model = make_model(), scrambled_replica()
    spec = spec_of(server_model)
    cfg = load_cfg("compressor.s_steps=2", "compressor.downlink='same'")
    server_dl = downlink.build("same", spec, 0, lambda: compress.build(cfg.compressor, spec))
    client_dl = downlink.build("same", spec, 0, lambda: compress.build(cfg.compressor, spec))
    replica = server_model.params.clone()  # every rank builds the same w^0
    gen = torch.Generator().manual_seed(1)
    for rnd in range(3):
        payload = server_dl.server_payload(server_model.params, rnd)
        client_dl.client_apply(client_dl.parse(payload.to_bytes(), rnd), replica, rnd,
                               client_model)
        assert torch.equal(replica, server_model.params), rnd
        assert payload.nbytes == (0 if rnd == 0 else 3_180)
        step = real_updates(server_model, server_model.params.clone(), 1,
                            seed=int(torch.randint(0, 1000, (), generator=gen)))[0]
        before = server_model.params.clone()
        target = step + server_dl.residual
        server_dl.server_step(server_model.params, step, rnd, server_model)
        applied = server_model.params - before
        assert torch.allclose(server_dl.residual, target - applied, atol=1e-7)
        assert float(F.cosine_similarity(applied, target, 0)) > 0.05
    assert not isinstance(server_dl.compressor, ErrorFeedback)  # one residual, not two


# ---------------------------------------------------------------------------- end to end

E2E = ["--set", "data.dataset=mnist", "--set", "data.partition=iid",
       "--set", "data.num_clients=5", "--set", "client.local_steps=5",
       "--set", "client.lr=0.5", "--set", "client.batch_size=64", "--set", "run.threads=1",
       "--set", "compressor.name=3sfc", "--set", "compressor.s_steps=2"]


def need_mnist():
    root = mnist_root()
    if root is None:
        pytest.skip("real MNIST not found ($FEDMPI_DATA_ROOT or data/)")
    return ["--set", f"data.root={root}"]


@pytest.mark.slow
def test_e2e_mnist_3sfc_learns_and_does_not_depend_on_ranks(tmp_path):
    args = [*E2E, *need_mnist(), "--set", "run.rounds=5"]
    run3 = run_and_open(tmp_path, 3, args, name="three")
    r = run3.rounds
    assert run3.complete
    assert run3.config.compressor.ef is True
    assert np.all(np.round(r["compression_ratio_up"], 1) == 250.6)
    assert np.all(r["uplink_bytes"] == 5 * 3_180)
    assert np.all(r["uplink_payload_bytes"] == r["uplink_bytes"])
    eff = run3.clients["efficiency"]
    assert np.all((eff > 0) & (eff <= 1))
    assert r["test_loss"][-1] < r["test_loss"][0] - 0.1  # it learns ...
    assert r["test_acc"].max() > 0.2  # ... well above chance (0.1)
    run1 = run_and_open(tmp_path, 1, args, name="one")
    for key in ("test_loss", "test_acc", "train_loss", "efficiency_mean"):
        assert np.array_equal(run1.rounds[key], r[key]), key
    assert np.array_equal(run1.clients["efficiency"], eff)


@pytest.mark.slow
def test_e2e_mnist_without_ef_and_with_double_way_downlink(tmp_path):
    args = [*E2E, *need_mnist(), "--set", "run.rounds=3", "--set", "model.hidden=32",
            "--set", "compressor.ef=false", "--set", "compressor.downlink='same'"]
    run = run_and_open(tmp_path, 3, args, name="noef")
    r = run.rounds
    assert run.complete and run.config.compressor.ef is False
    assert np.all(r["uplink_bytes"] == 5 * 3_180)
    # round 0 broadcasts nothing (w^0 is known everywhere); then one 3SFC payload
    assert list(r["downlink_payload_bytes"]) == [0, 5 * 3_180, 5 * 3_180]
    assert np.all(np.isfinite(run.clients["efficiency"]))
    assert np.all(np.isfinite(r["test_loss"]))


@pytest.mark.slow
def test_bench_prints_the_phase_table_and_the_fit_comparison(capsys):
    from fedmpi.bench import sfc3 as bench

    root = need_mnist()[1].split("=", 1)[1]
    assert bench.main(["--data-root", root, "--ranks", "1", "--rounds", "2", "--clients", "2",
                       "--s-steps", "1", "--local-steps", "1", "--batch-size", "8",
                       "--threads", "1"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith(" -n 1"))
    assert len(row) == 13 and row[10] == "250.6"  # ranks, round, 5 phases, ..., ratio
    for method in ("sequential", "batched lockstep LBFGS, loop", "batched lockstep LBFGS, vmap",
                   "batched lockstep LBFGS, factored"):
        assert method in out
    assert bench.main(["--data-root", "/nonexistent"]) == 2


if __name__ == "__main__":
    if "--mpi-decode-check" in sys.argv:
        sys.exit(mpi_decode_check())
    sys.exit("usage: python -m mpi4py -m tests.test_sfc3 --mpi-decode-check")
