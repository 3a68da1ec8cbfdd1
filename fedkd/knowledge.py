"""Knowledge on the wire: encoding and the server's checks of every reply.

Released knowledge travels as an array ``[P_round, C]`` of probability rows in one of
two wire formats (``knowledge.wire-format``, both directions):

* ``float16`` -- 2 bytes a probability, relative error <= 2^-11;
* ``uint8``   -- 8-bit quantisation, 1 byte a probability: q = round(255 p) by the
  largest-remainder method, so every row sums to exactly 255 and decodes to
  p' = q / 255 with |p' - p| < 1/255 and rows that sum to 1 exactly.

The server trusts nothing it receives: :func:`validate_knowledge` checks record and
array names, dtype, shape, size, finiteness, non-negativity and row sums, and raises
:class:`InvalidPayload` with a reason a log line can show. A bad payload excludes that
client for the round; the round goes on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

WIRE_DTYPE = np.float16  # the default wire format's dtype
WIRE_FORMATS = {"float16": np.dtype(np.float16), "uint8": np.dtype(np.uint8)}
QUANT_LEVELS = 255  # uint8 rows sum to exactly this
REPLY_RECORDS = frozenset({"knowledge", "metrics"})
KNOWLEDGE_ARRAYS = frozenset({"knowledge"})
ROW_SUM_TOLERANCE = 1e-2  # float16 rounding of C probabilities stays well inside this
MAX_PAYLOAD_BYTES = 64 * 2**20


class InvalidPayload(ValueError):
    """A reply that the server must not fuse; the message says why."""


def _wire_dtype(wire_format: str) -> np.dtype:
    if wire_format not in WIRE_FORMATS:
        raise ValueError(f"wire format must be one of {sorted(WIRE_FORMATS)}; got {wire_format!r}")
    return WIRE_FORMATS[wire_format]


def quantize(probs: np.ndarray, levels: int = QUANT_LEVELS) -> np.ndarray:
    """Rows of probabilities -> non-negative integers summing to ``levels`` per row.

    Largest-remainder rounding: floor(levels * p), then the units still missing go to the
    entries with the largest fractional parts, so the row sum is exact and every entry is
    within one unit of levels * p."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = np.clip(probs, 0.0, None)
    scaled = probs / probs.sum(axis=-1, keepdims=True) * levels
    q = np.floor(scaled)
    missing = (levels - q.sum(axis=-1)).astype(np.int64)
    order = np.argsort(-(scaled - q), axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(probs.shape[-1])[None, :].repeat(len(probs), 0), axis=-1)
    q += ranks < missing[:, None]
    return q.astype(np.int64)


def encode(probs: np.ndarray, wire_format: str = "float16") -> np.ndarray:
    """Probability rows -> wire array in ``wire_format`` (see the module doc)."""
    dtype = _wire_dtype(wire_format)
    if dtype == np.uint8:
        return np.ascontiguousarray(quantize(np.atleast_2d(probs)), dtype=np.uint8)
    return np.ascontiguousarray(probs, dtype=dtype)


def decode(wire: np.ndarray) -> np.ndarray:
    """Wire array -> float64 probability rows (uint8 rows are divided by 255)."""
    wire = np.asarray(wire)
    if wire.dtype == np.uint8:
        return wire.astype(np.float64) / QUANT_LEVELS
    return wire.astype(np.float64)


def validate_knowledge(
    *,
    record_names: Iterable[str],
    arrays: Mapping[str, np.ndarray],
    expected_rows: int,
    num_classes: int,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    wire_format: str = "float16",
) -> np.ndarray:
    """Check one reply and return its knowledge as float64 rows renormalised to sum 1.

    ``record_names`` are the reply's record names (``{"knowledge", "metrics"}`` expected),
    ``arrays`` the arrays of its knowledge record (``{"knowledge"}`` expected),
    ``wire_format`` the federation's (a float16 reply to a uint8 federation is refused,
    and the other way round: sites and server must agree on the bytes).
    """
    expected_dtype = _wire_dtype(wire_format)
    records = set(record_names)
    if records != REPLY_RECORDS:
        raise InvalidPayload(
            f"reply records must be {sorted(REPLY_RECORDS)}; got {sorted(records)}"
        )
    if set(arrays) != KNOWLEDGE_ARRAYS:
        raise InvalidPayload(
            f"knowledge record must hold exactly {sorted(KNOWLEDGE_ARRAYS)}; got {sorted(arrays)}"
        )
    k = arrays["knowledge"]
    quantized = expected_dtype == np.uint8
    if not isinstance(k, np.ndarray) or (k.dtype != np.uint8 if quantized else k.dtype.kind != "f"):
        kind = k.dtype if isinstance(k, np.ndarray) else type(k).__name__
        want = "a uint8 array (wire format uint8)" if quantized else "a floating-point array"
        raise InvalidPayload(f"knowledge must be {want}; got {kind}")
    if k.nbytes > max_bytes:
        raise InvalidPayload(f"knowledge is {k.nbytes} bytes; the limit is {max_bytes}")
    if k.shape != (expected_rows, num_classes):
        raise InvalidPayload(
            f"knowledge must have shape ({expected_rows}, {num_classes}); got {k.shape}"
        )
    if quantized:
        sums = k.sum(axis=1, dtype=np.int64)
        if len(k) and (sums != QUANT_LEVELS).any():
            bad = int((sums != QUANT_LEVELS).sum())
            raise InvalidPayload(f"uint8 knowledge rows must sum to {QUANT_LEVELS}; {bad} rows do not")
    k = decode(k)
    if not np.isfinite(k).all():
        raise InvalidPayload(f"knowledge has {int((~np.isfinite(k)).sum())} non-finite values")
    if (k < 0).any():
        raise InvalidPayload(f"knowledge has {int((k < 0).sum())} negative values")
    row_sums = k.sum(axis=1)
    worst = float(np.abs(row_sums - 1.0).max()) if len(k) else 0.0
    if worst > ROW_SUM_TOLERANCE:
        raise InvalidPayload(
            f"knowledge rows must sum to 1 (tolerance {ROW_SUM_TOLERANCE}); worst is off by {worst:.3g}"
        )
    return k / row_sums[:, None]


def validate_client_id(metrics: Mapping[str, object], *, num_clients: int) -> int:
    """The reporting client's partition id from its reply metrics (node ids are random,
    so clients say which partition they hold); must be an integer in 0..num_clients-1."""
    value = metrics.get("partition-id")
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or float(value) != int(value)
    ):
        raise InvalidPayload(f"metrics need an integer 'partition-id'; got {value!r}")
    client = int(value)
    if not 0 <= client < num_clients:
        raise InvalidPayload(f"partition-id {client} is outside 0..{num_clients - 1}")
    return client
