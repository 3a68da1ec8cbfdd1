"""Knowledge on the wire: encoding and the server's checks of every reply.

Released knowledge travels as a float16 array ``[P_round, C]`` (rows are probability
vectors). The server trusts nothing it receives: :func:`validate_knowledge` checks
record and array names, dtype, shape, size, finiteness, non-negativity and row sums,
and raises :class:`InvalidPayload` with a reason a log line can show. A bad payload
excludes that client for the round; the round goes on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

WIRE_DTYPE = np.float16
REPLY_RECORDS = frozenset({"knowledge", "metrics"})
KNOWLEDGE_ARRAYS = frozenset({"knowledge"})
ROW_SUM_TOLERANCE = 1e-2  # float16 rounding of C probabilities stays well inside this
MAX_PAYLOAD_BYTES = 64 * 2**20


class InvalidPayload(ValueError):
    """A reply that the server must not fuse; the message says why."""


def encode(probs: np.ndarray) -> np.ndarray:
    """Probability rows -> wire array (float16)."""
    return np.ascontiguousarray(probs, dtype=WIRE_DTYPE)


def validate_knowledge(
    *,
    record_names: Iterable[str],
    arrays: Mapping[str, np.ndarray],
    expected_rows: int,
    num_classes: int,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> np.ndarray:
    """Check one reply and return its knowledge as float64 rows renormalised to sum 1.

    ``record_names`` are the reply's record names (``{"knowledge", "metrics"}`` expected),
    ``arrays`` the arrays of its knowledge record (``{"knowledge"}`` expected).
    """
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
    if not isinstance(k, np.ndarray) or k.dtype.kind != "f":
        kind = k.dtype if isinstance(k, np.ndarray) else type(k).__name__
        raise InvalidPayload(f"knowledge must be a floating-point array; got {kind}")
    if k.nbytes > max_bytes:
        raise InvalidPayload(f"knowledge is {k.nbytes} bytes; the limit is {max_bytes}")
    if k.shape != (expected_rows, num_classes):
        raise InvalidPayload(
            f"knowledge must have shape ({expected_rows}, {num_classes}); got {k.shape}"
        )
    k = k.astype(np.float64)
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
