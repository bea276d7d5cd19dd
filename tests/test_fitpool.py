"""fedmpi.fitpool: the client ranks behind one compute slot fit their 3SFC samples on one
of them, bit-identically to fitting each on its own."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import SMALL, run_and_open

SFC = [*SMALL, "--set", "compressor.name='3sfc'", "--set", "compressor.s_steps=2",
       "--set", "compressor.max_iter=4", "--set", "data.num_clients=7"]


def same(a, b) -> None:
    for key in ("test_loss", "train_loss", "uplink_bytes", "efficiency_mean"):
        assert np.array_equal(a.rounds[key], b.rounds[key]), key
    assert np.array_equal(a.clients["efficiency"], b.clients["efficiency"], equal_nan=True)


@pytest.mark.parametrize("slots, sizes, extra", [
    (1, [0, 4, 4, 4, 4], []),  # one pool of the 4 client ranks
    (2, [0, 2, 2, 2, 2], ["--set", "server.participation=0.5"]),  # 2 pools; empty ranks
])
def test_pooled_fits_equal_own_fits(tmp_path, slots, sizes, extra):
    args = [*SFC, *extra, "--set", f"run.compute_slots={slots}"]
    pooled = run_and_open(tmp_path, 5, args, name="pooled")
    alone = run_and_open(tmp_path, 5, [*args, "--set", "run.pool_fits=false"], name="alone")
    assert list(pooled.attrs["fit_pool_size"]) == sizes
    assert list(alone.attrs["fit_pool_size"]) == [0] * 5
    fitted = pooled.attrs["fit_pool_fitted"]
    assert int(fitted.sum()) == int(pooled.rounds["participants"].sum())  # every fit, once
    assert np.count_nonzero(fitted) == slots  # by the pools' leaders only
    same(pooled, alone)
    assert pooled.complete and alone.complete


def test_pooled_run_equals_one_process(tmp_path):
    """And both equal the single-process run (rank-count invariance holds with pooling)."""
    args = [*SFC, "--set", "run.compute_slots=1"]
    pooled = run_and_open(tmp_path, 4, args, name="pooled")
    one = run_and_open(tmp_path, 1, args, name="one")
    assert list(pooled.attrs["fit_pool_size"]) == [0, 3, 3, 3]
    same(pooled, one)
