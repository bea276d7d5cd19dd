"""analysis/reproduce.py on fabricated run files and a fabricated log of the authors' code:
every cell's numbers, the verdicts, missing cells, runs off the paper's protocol, the
claims per baseline family, and the figure."""

from __future__ import annotations

import numpy as np
import pytest

from fedmpi import config
from fedmpi.metrics import RunWriter

from .test_analysis import _script

PROTOCOL = {
    "run": {"rounds": 3},
    "data": {"dataset": "mnist", "partition": "dirichlet", "alpha": 1.0, "train_frac": 0.8,
             "client_holdout": 0.2, "num_clients": 10},
    "model": {"name": "mlp"},
    "client": {"lr": 0.01, "batch_size": 256, "local_steps": 0, "local_epochs": 5,
               "lr_decay": 0.99, "lr_decay_first": True},
}
METHODS = {"fedavg": {"name": "identity"}, "3sfc": {"name": "3sfc", "ef": True},
           "3sfc-noef": {"name": "3sfc", "ef": False},
           "dgc": {"name": "topk_3sfc", "budget_bytes": 3180},
           "signsgd": {"name": "signsgd_3sfc"}, "dgc-std": {"name": "dgc", "budget_bytes": 3180},
           "stc-std": {"name": "stc", "ef": True, "ratio": 0.22}}


def fabricate(folder, method: str, seed: int, accs, uplink: int = 100, **changes) -> None:
    raw = {k: dict(v) for k, v in PROTOCOL.items()}
    raw["run"].update(seed=seed, name=f"{method}_{seed}")
    raw["compressor"] = dict(METHODS[method])
    for key, value in changes.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    raw["run"]["rounds"] = len(accs)  # the protocol check reads the stored rounds
    cfg = config.from_dict(raw)
    w = RunWriter(str(folder / f"{method}_{seed}.h5"), cfg, 1, 10, np.ones((10, 10)),
                  attrs={"dense_bytes": 1000}, swmr=False)
    for t, acc in enumerate(accs):
        w.append({"round": t, "test_acc": acc, "wall_time": 10.0 * (t + 1),
                  "uplink_bytes": uplink, "participants": 10,
                  "client_acc_mean": acc - 0.01}, {})
    w.close(complete=True)


def rounds_protocol(monkeypatch, reproduce, n: int) -> None:
    monkeypatch.setitem(reproduce.PROTOCOL, "run.rounds", n)


@pytest.fixture()
def reproduce():
    return _script("reproduce")


def test_report_cells_verdicts_and_claims(tmp_path, reproduce, monkeypatch):
    rounds_protocol(monkeypatch, reproduce, 3)
    runs = tmp_path / "runs"
    runs.mkdir()
    fabricate(runs, "fedavg", 0, [0.5, 0.8, 0.90])
    fabricate(runs, "fedavg", 1, [0.5, 0.8, 0.92])
    fabricate(runs, "3sfc", 0, [0.5, 0.7, 0.88], uplink=40)
    fabricate(runs, "3sfc", 1, [0.5, 0.7, 0.89], uplink=40)
    fabricate(runs, "dgc", 0, [0.5, 0.6, 0.80], uplink=40)
    fabricate(runs, "dgc", 1, [0.5, 0.6, 0.81], uplink=40)
    fabricate(runs, "dgc-std", 0, [0.5, 0.6, 0.90], uplink=40)  # better than 3SFC on seed 0
    fabricate(runs, "dgc-std", 1, [0.5, 0.6, 0.85], uplink=40)  # worse on seed 1
    fabricate(runs, "3sfc-noef", 0, [0.5, 0.6, 0.70])
    fabricate(runs, "stc-std", 0, [0.5, 0.6, 0.881], uplink=40)  # one seed only
    fabricate(runs, "signsgd", 0, [0.5, 0.6, 0.95], client__lr=0.05)  # off the protocol
    authors = tmp_path / "authors"
    authors.mkdir()
    (authors / "fedavg.log").write_text(
        "# authors' code /x; flags: --method fedavg --dataset mnist --model mlp --n_client 10"
        " --n_epoch 3 --seed 1\nClient 0: {0: 1}\n"
        + "".join(f"Round {t + 1}, Clients Acc: [0.5, 0.7], Server Acc: [{a}]\n"
                  for t, a in enumerate([0.4, 0.7, 0.95])))
    (authors / "ours.log").write_text(  # an unfinished run: shown, never used as a cell
        "# authors' code /x; flags: --method ours --dataset mnist --model mlp --n_client 10"
        " --n_epoch 3 --seed 1\nRound 1, Clients Acc: [0.1], Server Acc: [0.2]\n")
    out = tmp_path / "report.md"
    notes = tmp_path / "notes.md"
    notes.write_text("## What was checked\n\nThe trajectories.\n")
    assert reproduce.main([str(runs), "--paper", "3sfc", "--authors", str(authors),
                           "-o", str(out), "--notes", str(notes)]) == 0
    text = out.read_text()
    assert text.rstrip().endswith("The trajectories.") or "The trajectories." in text
    assert f"--notes {notes}" in text  # the command that made it
    rows = {tuple(c.strip() for c in line.split("|")[1:4]): [c.strip() for c in
                                                             line.split("|")[4:-1]]
            for line in text.splitlines() if line.startswith("| mnist-mlp")}
    fedavg = rows[("mnist-mlp", "10", "fedavg")]
    # paper 0.9017 (typed), authors 0.95 (its last round), fedmpi 0.91 +- 0.0141 (2 seeds)
    assert fedavg[0] == "0.9017" and fedavg[1] == "0.9500 (1)"
    assert fedavg[2] == f"0.9100 ± {np.std([0.90, 0.92], ddof=1):.4f} (2)"
    assert fedavg[3] == "-0.0400" and fedavg[4] == "+0.0083"
    assert fedavg[5] == "MISS (-0.0400)"  # judged against the authors' code, not the paper
    sfc = rows[("mnist-mlp", "10", "3sfc")]
    assert sfc[1] == "see 3sfc-noef" and sfc[5] == "ok"  # 0.885 vs the paper's 0.8876
    assert sfc[6] == "250.0x / 250x"  # 1000 dense bytes x 10 participants / 40 bytes
    assert rows[("mnist-mlp", "10", "stc")][2] == "missing"
    assert rows[("mnist-mlp", "10", "stc")][5] == "missing"
    assert rows[("mnist-mlp", "10", "signsgd")][2] == "missing"  # left out: lr differs
    assert "client.lr = 0.05 (paper: 0.01)" in text
    assert "ran 1 of 3 rounds" in text
    assert rows[("mnist-mlp", "10", "3sfc-noef")][5] == "no reference"
    claims = [line for line in text.splitlines() if "higher test accuracy than DGC" in line]
    assert "| paper | +0.0800 (+0.0800, +0.0800) | 2 | holds |" in claims[0]
    assert "| standard | +0.0100 (-0.0200, +0.0400) | 2 | inconclusive at this n |" in claims[1]
    stc = [line for line in text.splitlines() if "comparable to STC" in line]
    assert "| standard | -0.0010 (-0.0010) | 1 | inconclusive at n = 1 |" in stc[1]
    signsgd = [line for line in text.splitlines() if "comparable to signSGD" in line]
    assert "| paper | — | 0 | no runs |" in signsgd[0]  # its only run is off the protocol
    assert (tmp_path / "report-curves.png").stat().st_size > 1000


def test_paper_file_holds_the_mnist_mlp_column(reproduce):
    paper = reproduce.read_paper("3sfc")
    got = {c.row: v for c, (v, _) in paper.items() if c.column == "mnist-mlp"
           and c.clients == 10 and c.table == 2}
    assert got == {"fedavg": 0.9017, "dgc": 0.8663, "signsgd": 0.8692, "stc": 0.8848,
                   "3sfc": 0.8876}


def test_runs_are_placed_by_their_config(tmp_path, reproduce, monkeypatch):
    rounds_protocol(monkeypatch, reproduce, 2)
    fabricate(tmp_path, "3sfc", 0, [0.1, 0.2], compressor__m=2)
    fabricate(tmp_path, "dgc", 0, [0.1, 0.2], compressor__budget_bytes=4 * (4 * 794 + 1))
    fabricate(tmp_path, "3sfc-noef", 0, [0.1, 0.2], client__local_epochs=10)
    from fedmpi import analysis

    cells = sorted((c.table, c.row) for c, _ in map(reproduce.place, analysis.load([tmp_path])))
    assert cells == [(3, "3sfc@2x"), (3, "dgc@4x"), (4, "3sfc-noef@K=10")]
