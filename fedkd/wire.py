"""Knowledge on the wire: encoding and the server's checks of every reply.

Released knowledge travels as an array ``[P_round, C]`` of probability rows in one of
two wire formats (``knowledge.wire-format``, both directions):

* ``float16`` -- 2 bytes a probability, relative error <= 2^-11;
* ``uint8``   -- 8-bit quantisation, 1 byte a probability: q = round(255 p) by the
  largest-remainder method, so every row sums to exactly 255 and decodes to
  p' = q / 255 with |p' - p| < 1/255 and rows that sum to 1 exactly.

With ``shield.top-k = k`` (0 < k < C) a released row is its k largest probabilities plus
the rest of the mass spread evenly over the other C - k classes, so the uplink sends only
what the row holds (:func:`pack_release`): ``top-classes`` [P, k] (uint8, or uint16 above
256 classes) and ``top-values``, float16 [P, k] (the rest is 1 - their sum) or, in the
uint8 format, [P, k + 1] integers summing to 255 (the k values and the rest, quantised
together). Top-3 of 10 classes: 9 bytes a row instead of 20 (float16), 7 instead of 10
(uint8). The downlink stays dense: fused knowledge mixes many sites' top-k sets.

The server trusts nothing it receives: :func:`validate_knowledge` checks record and
array names, dtype, shape, size, finiteness, non-negativity and row sums, and raises
:class:`InvalidPayload` with a reason a log line can show. A bad payload excludes that
client for the round; the round goes on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import numpy as np

WIRE_DTYPE = np.float16  # the default wire format's dtype
WIRE_FORMATS = {"float16": np.dtype(np.float16), "uint8": np.dtype(np.uint8)}
QUANT_LEVELS = 255  # uint8 rows sum to exactly this
REPLY_RECORDS = frozenset({"knowledge", "metrics"})
KNOWLEDGE_ARRAYS = frozenset({"knowledge"})
TOP_K_ARRAYS = frozenset({"top-classes", "top-values"})
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


def _sparse(top_k: int, num_classes: int) -> bool:
    return 0 < top_k < num_classes


def _class_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.uint16)


def pack_release(probs: np.ndarray, wire_format: str = "float16", top_k: int = 0) -> dict[str, np.ndarray]:
    """A site's released rows [P, C] -> the arrays of its knowledge record (module doc).

    Dense (``{"knowledge": encode(probs)}``) unless 0 < ``top_k`` < C; then the k largest
    entries of each row and their classes. Rows released by ``shield.top-k`` are exactly
    recovered by :func:`unpack_top_k` (up to the wire format's rounding): their other
    entries all equal the spread rest, which is never above the k-th largest.
    """
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    num_classes = probs.shape[-1]
    if not _sparse(top_k, num_classes):
        return {"knowledge": encode(probs, wire_format)}
    classes = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    values = np.take_along_axis(probs, classes, axis=-1)
    if _wire_dtype(wire_format) == np.uint8:
        rest = np.clip(probs.sum(axis=-1, keepdims=True) - values.sum(axis=-1, keepdims=True), 0.0, None)
        wire_values = quantize(np.concatenate([values, rest], axis=-1)).astype(np.uint8)
    else:
        wire_values = values.astype(np.float16)
    return {"top-classes": classes.astype(_class_dtype(num_classes)), "top-values": np.ascontiguousarray(wire_values)}


def site_record(
    arrays: Mapping[str, np.ndarray], *, num_classes: int, wire_format: str = "float16", top_k: int = 0
) -> dict[str, np.ndarray]:
    """The knowledge record a site sends, from the arrays it releases.

    A release (one ``knowledge`` array of finite, non-negative float rows [P, C]) goes
    through :func:`pack_release`. Anything else (the malformed payloads of
    :mod:`fedkd.adversary`) is sent as it is, float arrays in the wire dtype, so the
    server's checks, not the sender's packing, decide what becomes of it.
    """
    k = arrays.get("knowledge")
    if (
        set(arrays) == KNOWLEDGE_ARRAYS and k.dtype.kind == "f" and k.ndim == 2 and k.shape[1] == num_classes
        and np.isfinite(k).all() and (k >= 0).all()
    ):
        return pack_release(k, wire_format, top_k)
    return {name: encode(a, wire_format) if a.dtype.kind == "f" else a for name, a in arrays.items()}


def unpack_top_k(classes: np.ndarray, values: np.ndarray, num_classes: int) -> np.ndarray:
    """``top-classes`` and ``top-values`` -> dense float64 rows [P, C]: the k values at their
    classes, the rest of the mass (uint8: the last value / 255; float16: 1 - the sum, at
    least 0) spread evenly over the other classes."""
    k = classes.shape[1]
    if values.dtype == np.uint8:
        top, rest = values[:, :k] / QUANT_LEVELS, values[:, k] / QUANT_LEVELS
    else:
        top = values.astype(np.float64)
        rest = np.clip(1.0 - top.sum(axis=-1), 0.0, None)
    dense = np.repeat((rest / (num_classes - k))[:, None], num_classes, axis=-1)
    np.put_along_axis(dense, classes.astype(np.int64), top, axis=-1)
    return dense


def _check_top_k(
    arrays: Mapping[str, np.ndarray], *, expected_rows: int, num_classes: int, top_k: int, quantized: bool
) -> np.ndarray:
    """Checks of a sparse top-k reply (see :func:`validate_knowledge`); returns dense rows."""
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise InvalidPayload(f"{name} must be an array; got {type(a).__name__}")
    classes, values = arrays["top-classes"], arrays["top-values"]
    if classes.dtype != _class_dtype(num_classes):
        raise InvalidPayload(f"top-classes must be {_class_dtype(num_classes)}; got {classes.dtype}")
    if classes.shape != (expected_rows, top_k):
        raise InvalidPayload(f"top-classes must have shape ({expected_rows}, {top_k}); got {classes.shape}")
    if len(classes) and int(classes.max()) >= num_classes:
        raise InvalidPayload(f"top-classes holds a class >= {num_classes}")
    if top_k > 1 and len(classes) and (np.diff(np.sort(classes, axis=-1), axis=-1) == 0).any():
        raise InvalidPayload("top-classes repeats a class within a row")
    want_shape = (expected_rows, top_k + 1) if quantized else (expected_rows, top_k)
    if quantized:
        if values.dtype != np.uint8:
            raise InvalidPayload(f"top-values must be uint8 (wire format uint8); got {values.dtype}")
    elif values.dtype.kind != "f":
        raise InvalidPayload(f"top-values must be a floating-point array; got {values.dtype}")
    if values.shape != want_shape:
        raise InvalidPayload(f"top-values must have shape {want_shape}; got {values.shape}")
    if quantized:
        _check_level_sums(values, "top-values")
    return unpack_top_k(classes, values, num_classes)  # non-finite values: refused by _check_rows


def validate_knowledge(
    *,
    record_names: Iterable[str],
    arrays: Mapping[str, np.ndarray],
    expected_rows: int,
    num_classes: int,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    wire_format: str = "float16",
    top_k: int = 0,
) -> np.ndarray:
    """Check one reply and return its knowledge as float64 rows renormalised to sum 1.

    ``record_names`` are the reply's record names (``{"knowledge", "metrics"}`` expected),
    ``arrays`` the arrays of its knowledge record (``{"knowledge"}`` expected, or
    ``{"top-classes", "top-values"}`` when 0 < ``top_k`` < C: the federation's
    ``shield.top-k``), ``wire_format`` the federation's (a float16 reply to a uint8
    federation is refused, and the other way round: sites and server must agree on the
    bytes).
    """
    expected_dtype = _wire_dtype(wire_format)
    quantized = expected_dtype == np.uint8
    records = set(record_names)
    if records != REPLY_RECORDS:
        raise InvalidPayload(
            f"reply records must be {sorted(REPLY_RECORDS)}; got {sorted(records)}"
        )
    expected_arrays = TOP_K_ARRAYS if _sparse(top_k, num_classes) else KNOWLEDGE_ARRAYS
    if set(arrays) != expected_arrays:
        raise InvalidPayload(
            f"knowledge record must hold exactly {sorted(expected_arrays)}; got {sorted(arrays)}"
        )
    if expected_arrays is TOP_K_ARRAYS:
        size = sum(a.nbytes for a in arrays.values() if isinstance(a, np.ndarray))
        if size > max_bytes:
            raise InvalidPayload(f"knowledge is {size} bytes; the limit is {max_bytes}")
        return _check_rows(_check_top_k(
            arrays, expected_rows=expected_rows, num_classes=num_classes, top_k=top_k, quantized=quantized
        ))
    k = arrays["knowledge"]
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
        _check_level_sums(k, "knowledge")
    return _check_rows(decode(k))


def _check_level_sums(rows: np.ndarray, name: str) -> None:
    """uint8 rows must sum to exactly :data:`QUANT_LEVELS` (what :func:`quantize` sends)."""
    bad = int((rows.sum(axis=1, dtype=np.int64) != QUANT_LEVELS).sum())
    if bad:
        raise InvalidPayload(f"uint8 {name} rows must sum to {QUANT_LEVELS}; {bad} rows do not")


def _check_rows(k: np.ndarray) -> np.ndarray:
    """Finite, non-negative rows summing to 1 within tolerance; renormalised."""
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


MAX_METRICS = 64
"""Most metrics one reply may carry (fedkd's sites report about 25)."""

MAX_METRIC_NAME = 64
"""Longest metric name accepted, in characters."""

MAX_EXAMPLES = 10**9
"""Largest ``num-examples`` a reply may claim (example-weighted means trust it)."""

RESERVED_METRICS = frozenset({"event", "round", "client", "node"})
"""Names a site's metrics may not use: the run records' own fields."""

_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


def validate_metrics(metrics: Mapping[str, object] | None, *, allow_nan: frozenset[str] = frozenset()) -> dict[str, int | float]:
    """A reply's metrics, checked before anything is recorded: at most
    :data:`MAX_METRICS` of them, each name a string of at most :data:`MAX_METRIC_NAME`
    letters, digits, ``_.-`` (starting with a letter) and none of
    :data:`RESERVED_METRICS`; each value one finite real number (no lists, no booleans;
    NaN only for the names in ``allow_nan``); ``num-examples``, if present, an integer in
    0..:data:`MAX_EXAMPLES`. Returns them as Python ints and floats, as received
(``partition-id`` included); raises
    :class:`InvalidPayload` naming the first problem, what is allowed and what was received."""
    if metrics is None:
        raise InvalidPayload("the reply has no metrics record")
    if not isinstance(metrics, Mapping):
        raise InvalidPayload(f"metrics must be a mapping; got {type(metrics).__name__}")
    if len(metrics) > MAX_METRICS:
        raise InvalidPayload(f"a reply may carry at most {MAX_METRICS} metrics; got {len(metrics)}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or len(name) > MAX_METRIC_NAME or not _METRIC_NAME.match(name):
            shown = name[:MAX_METRIC_NAME] + "..." if isinstance(name, str) and len(name) > MAX_METRIC_NAME else name
            raise InvalidPayload(f"metric name must be at most {MAX_METRIC_NAME} letters, digits or _.- "
                                 f"starting with a letter; got {shown!r}")
        if name in RESERVED_METRICS:
            raise InvalidPayload(f"metric name {name!r} is reserved ({', '.join(sorted(RESERVED_METRICS))})")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            kind = f"a list of {len(value)}" if isinstance(value, (list, tuple)) else type(value).__name__
            raise InvalidPayload(f"metric {name} must be one number; got {kind}")
        number = float(value)
        if not (math.isfinite(number) or (math.isnan(number) and name in allow_nan)):
            raise InvalidPayload(f"metric {name} must be a finite number; got {number!r}")
        out[name] = int(value) if isinstance(value, (int, np.integer)) else number
    examples = out.get("num-examples")
    if examples is not None and not (0 <= examples <= MAX_EXAMPLES and float(examples).is_integer()):
        raise InvalidPayload(f"metric num-examples must be an integer in 0..{MAX_EXAMPLES}; got {examples!r}")
    return out
