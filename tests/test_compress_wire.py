"""Wire-format helpers: index widths, bit packing, budgets and the Golomb position coder
(round trips on random masks; its bit count against Sattler et al.'s formula, §4.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpi.compress import wire
from fedmpi.config import ConfigError

FAST = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------------------- indices


@pytest.mark.parametrize("d,width", [(1, 1), (2, 1), (256, 1), (257, 2), (65_536, 2),
                                     (65_537, 3), (199_210, 3), (11_169_162, 3),
                                     (16_777_216, 3), (16_777_217, 4), (2**32 + 1, 5)])
def test_index_width_is_the_fewest_whole_bytes(d, width):
    assert wire.index_width(d) == width
    assert (d - 1) < 256 ** width


@FAST
@given(st.integers(1, 2**40), st.data())
def test_indices_round_trip(d, data):
    idx = np.asarray(data.draw(st.lists(st.integers(0, d - 1), max_size=50)), dtype=np.int64)
    buf = wire.pack_indices(idx, d)
    assert buf.dtype == np.uint8 and buf.size == idx.size * wire.index_width(d)
    np.testing.assert_array_equal(wire.unpack_indices(buf, d), idx)


def test_unpack_indices_rejects_out_of_range_and_ragged():
    buf = wire.pack_indices(np.array([5, 300]), 65_536)
    with pytest.raises(ValueError, match="out of range"):
        wire.unpack_indices(buf, 300)
    with pytest.raises(ValueError, match="multiple"):
        wire.unpack_indices(buf[:-1], 65_536)


# ---------------------------------------------------------------------------- bits


@FAST
@given(st.lists(st.booleans(), max_size=100))
def test_signs_pack_eight_per_byte(bits):
    buf = wire.pack_bits(np.asarray(bits, dtype=bool))
    assert buf.size == math.ceil(len(bits) / 8)
    np.testing.assert_array_equal(wire.unpack_bits(buf, len(bits)), np.asarray(bits, bool))


@FAST
@given(st.lists(st.booleans(), max_size=100))
def test_signs_unpack_to_plus_minus_one(bits):
    b = np.asarray(bits, dtype=bool)
    got = wire.unpack_signs(wire.pack_bits(b), b.size)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.where(b, -1.0, 1.0))


def test_sign_bits_are_lsb_first():
    np.testing.assert_array_equal(wire.pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1])),
                                  np.array([1, 1], dtype=np.uint8))


@FAST
@given(st.integers(1, 20), st.data())
def test_uint_codes_round_trip(width, data):
    n = data.draw(st.integers(0, 70))
    codes = np.asarray(data.draw(st.lists(st.integers(0, 2**width - 1), min_size=n,
                                          max_size=n)), dtype=np.int64)
    buf = wire.pack_uint(codes, width)
    assert buf.size == math.ceil(n * width / 8)
    np.testing.assert_array_equal(wire.unpack_uint(buf, width, n), codes)


@pytest.mark.parametrize("width", [1, 3, 5, 8])
def test_uint_fast_path_matches_the_bit_matrix(width):
    codes = np.random.default_rng(width).integers(0, 2**width, size=1001)
    bits = ((codes[:, None] >> np.arange(width)) & 1).astype(np.uint8).reshape(-1)
    np.testing.assert_array_equal(wire.pack_uint(codes, width),
                                  np.packbits(bits, bitorder="little"))


# ---------------------------------------------------------------------------- budgets


@FAST
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=12), st.data())
def test_apportion_sums_exactly_and_covers_every_tensor(sizes, data):
    total = data.draw(st.integers(len(sizes), sum(sizes)))
    k = wire.apportion(total, sizes)
    assert sum(k) == total
    assert all(1 <= kl <= n for kl, n in zip(k, sizes, strict=True))
    # proportional up to the rounding and the minimum of one
    for kl, n in zip(k, sizes, strict=True):
        assert kl <= max(1, math.ceil(total * n / sum(sizes))) + 1


def test_ratio_counts_round_before_ceiling():
    assert wire.ceil_count(0.01, 200) == 2  # 0.01 * 200 = 2.0000000000000004
    assert wire.ceil_count(0.01, 11_169_162) == 111_692  # docs/algorithms.md §4.1
    assert wire.ceil_count(1e-6, 10) == 1
    assert wire.sparse_counts([784, 10], True, 0.01) == [8, 1]
    assert wire.sparse_counts([784, 10], False, 0.01) == [8]


def test_budget_counts_and_errors_name_the_key():
    assert wire.sparse_counts([1000], False, 0.5, budget=700, per_entry=7) == [100]
    assert sum(wire.sparse_counts([600, 400], True, 0.5, budget=700, per_entry=7)) == 100
    assert wire.sparse_counts([10], False, 0.5, budget=10_000, per_entry=7) == [10]
    with pytest.raises(ConfigError) as err:
        wire.sparse_counts([600, 400, 5], True, 0.5, budget=20, per_entry=7)
    assert err.value.key == "compressor.budget_bytes"
    with pytest.raises(ConfigError) as err:
        wire.check_ratio(0.0)
    assert err.value.key == "compressor.ratio"


# ---------------------------------------------------------------------------- Golomb


def test_golomb_parameter_worked_numbers():
    # docs/algorithms.md §4.4: p = 1/400 -> b* = 8, b_bar = 10.11; p = 1% -> b* = 6, 8.11
    assert wire.golomb_parameter(1 / 400) == 8
    assert wire.golomb_expected_bits(1 / 400) == pytest.approx(10.11, abs=0.01)
    assert wire.golomb_parameter(0.01) == 6
    assert wire.golomb_expected_bits(0.01) == pytest.approx(8.11, abs=0.01)
    assert wire.golomb_parameter(1.0) == 0
    assert wire.golomb_parameter(0.9) == 0


@st.composite
def masks(draw):
    n = draw(st.integers(1, 3000))
    p = draw(st.floats(0.0005, 1.0))
    seed = draw(st.integers(0, 2**32 - 1))
    mask = np.random.default_rng(seed).random(n) < p
    if not mask.any():
        mask[draw(st.integers(0, n - 1))] = True
    return mask


def gap_bits(pos: np.ndarray, b: int) -> int:
    """Sattler's exact count, independently: sum_i ceil(gap_i / 2**b) + b per position."""
    gaps = np.diff(np.concatenate([[-1], pos]))
    return int(sum(math.ceil(int(g) / 2**b) for g in gaps)) + b * len(gaps)


@FAST
@given(masks())
def test_golomb_round_trip_on_random_masks(mask):
    pos = np.flatnonzero(mask)
    b = wire.golomb_parameter(pos.size / mask.size)
    buf = wire.golomb_encode(pos, b)
    assert buf.dtype == np.uint8
    np.testing.assert_array_equal(wire.golomb_decode(buf, pos.size, b), pos)
    # the stream is exactly the code's bits, rounded up to whole bytes
    assert wire.golomb_bits(pos, b) == gap_bits(pos, b)
    assert buf.size == math.ceil(gap_bits(pos, b) / 8)


@FAST
@given(masks(), st.integers(0, 12))
def test_golomb_round_trip_any_parameter(mask, b):
    pos = np.flatnonzero(mask)
    np.testing.assert_array_equal(wire.golomb_decode(wire.golomb_encode(pos, b), pos.size, b),
                                  pos)


@pytest.mark.parametrize("p", [1 / 400, 0.01, 0.1])
def test_golomb_bits_match_the_expected_formula(p):
    """On i.i.d. Bernoulli(p) masks the mean bits per position is Sattler's b_bar."""
    mask = np.random.default_rng(7).random(400_000) < p
    pos = np.flatnonzero(mask)
    b = wire.golomb_parameter(p)
    per_position = wire.golomb_encode(pos, b).size * 8 / pos.size
    assert per_position == pytest.approx(wire.golomb_expected_bits(p), rel=0.02)


def test_golomb_decode_rejects_damaged_streams():
    pos = np.array([3, 10, 11, 400])
    buf = wire.golomb_encode(pos, 4)
    with pytest.raises(ValueError):
        wire.golomb_decode(buf[:-1], 4, 4)
    with pytest.raises(ValueError, match="bytes"):
        wire.golomb_decode(np.concatenate([buf, [0]]).astype(np.uint8), 4, 4)
    with pytest.raises(ValueError, match="increasing"):
        wire.golomb_encode(np.array([3, 3]), 2)
