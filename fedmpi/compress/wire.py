"""Wire-format building blocks shared by the compressors: every helper maps numpy arrays to
a flat ``uint8`` array and back, byte-exact, with no header and no padding beyond the last
partial byte.

* values: fp32 or fp16 (:data:`VALUE_DTYPES`, the ``value_dtype`` key of the sparse
  compressors);
* indices into a vector of ``d`` entries: little-endian unsigned integers of the smallest
  whole number of bytes that holds ``d - 1`` (:func:`index_width`: 1 byte up to d = 256,
  2 up to 65,536, 3 up to 16,777,216, ...), i.e. ``k * index_width(d)`` bytes;
* signs: 8 per byte, least significant bit first (:func:`pack_bits`), ``ceil(n / 8)`` bytes;
* fixed-width unsigned codes (QSGD's sign + level): ``width`` bits each, LSB first,
  ``ceil(n * width / 8)`` bytes (:func:`pack_uint`);
* budgets: how many entries ``k`` a keep fraction or a byte budget buys, globally or split
  over the parameter tensors (:func:`sparse_counts`);
* sorted positions of the nonzeros of a sparse vector: a Golomb(-Rice) code of the gaps
  with parameter ``M = 2**b`` (:func:`golomb_encode`), ``b`` from Sattler et al.'s rule
  (:func:`golomb_parameter`), ``ceil((k * b + sum_i ceil(gap_i / M)) / 8)`` bytes.

The Golomb code of a gap ``g >= 1`` (``g = pos_i - pos_{i-1}``, ``pos_{-1} = -1``) is the
quotient ``q = (g - 1) // M`` in unary (``q`` one-bits, then a zero-bit) and the remainder
``(g - 1) % M`` in ``b`` bits: ``q + 1 + b = ceil(g / M) + b`` bits, the count of
Sattler et al. (STC, IEEE TNNLS 2019, and ``felisat/federated-learning``). The stream holds
all ``k`` remainders first (``k * b`` bits) and then the ``k`` unary quotients, so that both
halves decode with vectorised numpy; the bit count is exactly that of the interleaved code.
"""

from __future__ import annotations

import math

import numpy as np

from fedmpi.errors import ConfigError

VALUE_DTYPES: dict[str, type] = {"fp32": np.float32, "fp16": np.float16}

#: the golden ratio, in Sattler et al.'s choice of the Golomb parameter
GOLDEN = (1.0 + math.sqrt(5.0)) / 2.0


# ---------------------------------------------------------------------------- values


def value_bytes(value_dtype: str) -> int:
    """Bytes per value of ``value_dtype`` ("fp32" or "fp16")."""
    return np.dtype(VALUE_DTYPES[value_dtype]).itemsize


def encode_values(values: np.ndarray, value_dtype: str) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=VALUE_DTYPES[value_dtype])


# ---------------------------------------------------------------------------- indices


def index_width(d: int) -> int:
    """Bytes per index into ``d`` entries: the fewest whole bytes that hold ``d - 1``."""
    return max(1, (max(int(d) - 1, 0).bit_length() + 7) // 8)


def pack_indices(idx: np.ndarray, d: int) -> np.ndarray:
    """``k`` indices in ``[0, d)`` as ``k * index_width(d)`` little-endian bytes."""
    w = index_width(d)
    wide = "<u4" if w <= 4 else "<u8"
    a = np.ascontiguousarray(idx, dtype=wide)
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, a.itemsize)[:, :w]).reshape(-1)


def unpack_indices(buf: np.ndarray, d: int) -> np.ndarray:
    """The inverse of :func:`pack_indices`: int64 indices."""
    w = index_width(d)
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    if buf.size % w:
        raise ValueError(f"index bytes ({buf.size}) are not a multiple of the width {w}")
    item = 4 if w <= 4 else 8
    wide = np.zeros((buf.size // w, item), dtype=np.uint8)
    wide[:, :w] = buf.reshape(-1, w)
    out = wide.reshape(-1).view("<u4" if item == 4 else "<u8").astype(np.int64)
    if out.size and int(out.max()) >= d:
        raise ValueError(f"index {int(out.max())} out of range for d = {d}")
    return out


# ---------------------------------------------------------------------------- bits


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Booleans (or 0/1) as ``ceil(n / 8)`` bytes, 8 per byte, least significant bit first."""
    return np.packbits(np.asarray(bits, dtype=bool).reshape(-1), bitorder="little")


def unpack_bits(buf: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` bits of ``buf`` (LSB first) as booleans."""
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    if buf.size != (n + 7) // 8:
        raise ValueError(f"{n} bits need {(n + 7) // 8} bytes, got {buf.size}")
    return np.unpackbits(buf, count=n, bitorder="little").astype(bool)


#: byte -> its 8 bits (LSB first) as +1.0 (bit 0) / -1.0 (bit 1)
_SIGN_TABLE = (1.0 - 2.0 * ((np.arange(256)[:, None] >> np.arange(8)) & 1)).astype(np.float32)


def unpack_signs(buf: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` bits of ``buf`` as float32 +1 (bit 0) / -1 (bit 1), by byte table."""
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    if buf.size != (n + 7) // 8:
        raise ValueError(f"{n} bits need {(n + 7) // 8} bytes, got {buf.size}")
    return _SIGN_TABLE[buf].reshape(-1)[:n]


# ---------------------------------------------------------------------------- ternary

#: ``mode`` byte of a ternary field: every entry nonzero, 1 bit each (bit 1 = negative) ...
TERNARY_BITS = 0
#: ... or some entries are 0: base-3 digits (0, +1 -> 1, -1 -> 2), 5 per byte (3^5 <= 256)
TERNARY_TRITS = 1
_TRIT_POWERS = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def ternary_size(n: int, mode: int) -> int:
    """Bytes of ``n`` entries in ``mode``: ``ceil(n / 8)`` (bits) or ``ceil(n / 5)``."""
    return (n + 7) // 8 if mode == TERNARY_BITS else (n + 4) // 5


def pack_ternary(s: np.ndarray, free: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """Values in {-1, 0, +1} as ``(mode, bytes)``: one bit each when none is 0 (where
    ``free`` is true the value is not needed and may be anything), else base-3 digits,
    1.6 bits each. ``sign(0) = 0`` needs the third symbol; a plain sign bit cannot say it."""
    s = np.asarray(s, dtype=np.int8).reshape(-1)
    zero = s == 0
    if free is not None:
        zero &= ~np.asarray(free, dtype=bool).reshape(-1)
    if not zero.any():
        return TERNARY_BITS, pack_bits(s < 0)
    trits = np.where(s < 0, 2, s).astype(np.uint8)
    trits = np.concatenate([trits, np.zeros(-trits.size % 5, dtype=np.uint8)])
    return TERNARY_TRITS, (trits.reshape(-1, 5) * _TRIT_POWERS).sum(1, dtype=np.uint8)


def unpack_ternary(mode: int, buf: np.ndarray, n: int) -> np.ndarray:
    """The inverse of :func:`pack_ternary`: float32 -1 / 0 / +1 (bits mode: never 0)."""
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    if mode == TERNARY_BITS:
        return unpack_signs(buf, n)
    if mode != TERNARY_TRITS:
        raise ValueError(f"unknown ternary mode {mode}")
    if buf.size != (n + 4) // 5:
        raise ValueError(f"{n} trits need {(n + 4) // 5} bytes, got {buf.size}")
    digits = (buf[:, None] // _TRIT_POWERS) % 3
    if int(buf.max(initial=0)) >= 243:
        raise ValueError("a base-3 byte above 242")
    return np.array([0.0, 1.0, -1.0], dtype=np.float32)[digits.reshape(-1)[:n]]


def packed_size(n: int, width: int) -> int:
    """Bytes of ``n`` codes of ``width`` bits: ``ceil(n * width / 8)``."""
    return (int(n) * int(width) + 7) // 8


def pack_uint(codes: np.ndarray, width: int) -> np.ndarray:
    """Unsigned integer codes below ``2**width`` as a ``width``-bit LSB-first stream."""
    codes = np.asarray(codes).reshape(-1)
    n = codes.size
    if not 1 <= width <= 32:
        raise ValueError(f"code width must be in [1, 32], got {width}")
    if width > 8:  # generic: a bit matrix (wide codes are rare: QSGD with s >= 128)
        shifts = np.arange(width, dtype=np.uint32)
        bits = ((codes.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)
        return np.packbits(bits.reshape(-1), bitorder="little")
    # groups of 8 codes fill exactly `width` bytes: build each group in one uint64,
    # column by column (contiguous rows of the transposed groups)
    groups = (n + 7) // 8
    padded = np.zeros(groups * 8, dtype=np.uint8)
    padded[:n] = codes
    cols = padded.reshape(groups, 8).T.copy()
    word = cols[0].astype(np.uint64)
    for j in range(1, 8):
        word |= cols[j].astype(np.uint64) << np.uint64(j * width)
    out = word.view(np.uint8).reshape(groups, 8)[:, :width].reshape(-1)
    return np.ascontiguousarray(out[:packed_size(n, width)])


def unpack_uint(buf: np.ndarray, width: int, n: int) -> np.ndarray:
    """The inverse of :func:`pack_uint`: ``n`` codes (uint8 if ``width <= 8``, else int64)."""
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    if buf.size != packed_size(n, width):
        raise ValueError(f"{n} codes of {width} bits need {packed_size(n, width)} bytes, "
                         f"got {buf.size}")
    if width > 8:
        bits = np.unpackbits(buf, count=n * width, bitorder="little").reshape(n, width)
        weights = (np.uint64(1) << np.arange(width, dtype=np.uint64))
        return (bits.astype(np.uint64) * weights).sum(axis=1).astype(np.int64)
    groups = (n + 7) // 8
    raw = np.zeros(groups * width, dtype=np.uint8)
    raw[:buf.size] = buf
    wide = np.zeros((groups, 8), dtype=np.uint8)
    wide[:, :width] = raw.reshape(groups, width)
    word = wide.reshape(-1).view("<u8")
    mask = np.uint64((1 << width) - 1)
    out = np.empty((8, groups), dtype=np.uint8)
    for j in range(8):
        out[j] = (word >> np.uint64(j * width)) & mask
    return out.T.reshape(-1)[:n]


# ---------------------------------------------------------------------------- budgets


def check_ratio(ratio: float, key: str = "compressor.ratio") -> None:
    if not (0.0 < ratio <= 1.0 and math.isfinite(ratio)):
        raise ConfigError(key, f"must be in (0, 1] (got {ratio})")


def check_budget(budget: int, key: str = "compressor.budget_bytes") -> None:
    if budget < 0:
        raise ConfigError(key, f"must be >= 0 (0 = use compressor.ratio; got {budget})")


def ceil_count(ratio: float, n: int) -> int:
    """``ceil(ratio * n)`` clamped to [1, n] (rounded first, so 0.01 * 200 is 2, not 3)."""
    return max(1, min(int(n), math.ceil(round(ratio * n, 9))))


def apportion(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` entries over tensors of ``sizes``: proportional, at least 1 and at
    most ``n_l`` each, largest remainder first; the counts sum to ``total`` exactly."""
    d, n_layers = sum(sizes), len(sizes)
    if not n_layers <= total:
        raise ValueError(f"{total} entries cannot give each of {n_layers} tensors one")
    if total >= d:
        return list(sizes)
    quota = [total * n / d for n in sizes]
    k = [min(n, max(1, math.floor(q))) for q, n in zip(quota, sizes, strict=True)]
    diff = total - sum(k)
    while diff:
        step = 1 if diff > 0 else -1
        cand = [i for i in range(n_layers) if (k[i] < sizes[i] if step > 0 else k[i] > 1)]
        cand.sort(key=lambda i: ((quota[i] - k[i]) * step, sizes[i]), reverse=True)
        for i in cand[:abs(diff)]:
            k[i] += step
        diff = total - sum(k)
    return k


def budget_entries(budget: int, per_entry: int, fixed: int, minimum: int,
                   key: str = "compressor.budget_bytes") -> int:
    """Entries a byte budget buys: ``(budget - fixed) // per_entry``, at least ``minimum``."""
    k = (budget - fixed) // per_entry
    if k < minimum:
        raise ConfigError(key, f"{budget} bytes buy {max(k, 0)} entries of {per_entry} bytes "
                          f"(+ {fixed} fixed bytes); at least {minimum} needed, i.e. "
                          f">= {fixed + minimum * per_entry} bytes")
    return k


def sparse_counts(sizes: list[int], per_layer: bool, ratio: float,
                  budget: int = 0, per_entry: int = 1, fixed: int = 0) -> list[int]:
    """Entries to keep in each segment (the tensors if ``per_layer``, else one of ``d``).

    ratio mode (``budget == 0``): ``ceil(ratio * n)`` per segment (at least 1);
    budget mode: ``K = (budget - fixed) // per_entry`` entries, split by :func:`apportion`.
    """
    segs = list(sizes) if per_layer else [sum(sizes)]
    if budget <= 0:
        return [ceil_count(ratio, n) for n in segs]
    total = budget_entries(budget, per_entry, fixed, len(segs))
    return apportion(min(total, sum(segs)), segs)


# ---------------------------------------------------------------------------- Golomb


def golomb_parameter(p: float) -> int:
    """Sattler et al.'s ``b* = 1 + floor(log2(ln(phi - 1) / ln(1 - p)))``, at least 0.

    ``p`` is the density of nonzeros (k / n); a dense mask (p = 1) gets b = 0.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {p}")
    if p >= 1.0:
        return 0
    ratio = math.log(GOLDEN - 1.0) / math.log1p(-p)
    return max(0, 1 + math.floor(math.log2(ratio)))


def golomb_expected_bits(p: float) -> float:
    """Expected bits per position for i.i.d. Bernoulli(p) positions (Sattler et al.):
    ``b* + 1 / (1 - (1 - p)**(2**b*))``."""
    b = golomb_parameter(p)
    if p >= 1.0:
        return float(b + 1)
    return b + 1.0 / (1.0 - (1.0 - p) ** (2 ** b))


def golomb_bits(positions: np.ndarray, b: int) -> int:
    """Exact bits of :func:`golomb_encode`: ``k * b + sum_i ceil(gap_i / 2**b)``."""
    gaps = np.diff(np.asarray(positions, dtype=np.int64), prepend=-1)
    return int(len(gaps) * b + int(((gaps - 1) >> b).sum()) + len(gaps))


def golomb_encode(positions: np.ndarray, b: int) -> np.ndarray:
    """Strictly increasing non-negative positions as a Golomb byte stream (module doc)."""
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    if pos.size == 0:
        return np.zeros(0, dtype=np.uint8)
    gaps = np.diff(pos, prepend=-1)
    if int(gaps.min()) < 1:
        raise ValueError("positions must be strictly increasing and >= 0")
    rest = gaps - 1
    q = rest >> b
    unary = np.ones(int(q.sum()) + pos.size, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0  # each quotient ends with a zero-bit
    if b > 0:
        shifts = np.arange(b, dtype=np.int64)
        rem = ((rest[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
        bits = np.concatenate([rem, unary])
    else:
        bits = unary
    return np.packbits(bits, bitorder="little")


def golomb_decode(buf: np.ndarray, k: int, b: int) -> np.ndarray:
    """The ``k`` positions coded in ``buf`` (int64), checking that nothing trails them."""
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    if k == 0:
        if buf.size:
            raise ValueError(f"Golomb stream of 0 positions has {buf.size} bytes")
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(buf, bitorder="little")
    head = k * b
    if bits.size < head + k:
        raise ValueError(f"Golomb stream too short for {k} positions")
    if b > 0:
        rem_bits = bits[:head].reshape(k, b).astype(np.int64)
        rem = (rem_bits << np.arange(b, dtype=np.int64)).sum(axis=1)
    else:
        rem = np.zeros(k, dtype=np.int64)
    ends = np.flatnonzero(bits[head:] == 0)
    if ends.size < k:
        raise ValueError(f"Golomb stream holds fewer than {k} positions")
    ends = ends[:k]
    total = head + int(ends[-1]) + 1
    if (total + 7) // 8 != buf.size:
        raise ValueError(f"Golomb stream of {k} positions is {(total + 7) // 8} bytes, "
                         f"got {buf.size}")
    q = np.diff(ends, prepend=-1) - 1
    gaps = (q << b) + rem + 1
    return np.cumsum(gaps) - 1
