"""Tests for fedkd.wire: the server's checks of every reply (DESIGN section 7)."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.wire import (
    QUANT_LEVELS,
    WIRE_DTYPE,
    InvalidPayload,
    decode,
    encode,
    pack_release,
    quantize,
    site_record,
    unpack_top_k,
    validate_client_id,
    validate_knowledge,
)

ROWS, CLASSES = 6, 4
RECORDS = ("knowledge", "metrics")


def _valid(dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.dirichlet(np.ones(CLASSES), size=ROWS).astype(dtype)


def _check(k, *, records=RECORDS, extra_arrays=None, **kwargs):
    arrays = {"knowledge": k, **(extra_arrays or {})}
    return validate_knowledge(
        record_names=records, arrays=arrays, expected_rows=ROWS, num_classes=CLASSES, **kwargs
    )


def test_valid_float16_payload_is_accepted_and_renormalised():
    k = encode(_valid(np.float64))
    assert k.dtype == WIRE_DTYPE == np.float16
    # float16 rounding leaves the row sums slightly off 1
    assert np.abs(k.astype(np.float64).sum(axis=1) - 1).max() > 0
    out = _check(k)
    assert out.dtype == np.float64
    assert out.shape == (ROWS, CLASSES)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(out, k.astype(np.float64), atol=2e-3)


def test_valid_payload_with_records_in_any_order():
    out = _check(_valid(), records=["metrics", "knowledge"])
    assert out.shape == (ROWS, CLASSES)


def _bad(mutate):
    k = _valid(np.float64)
    mutate(k)
    return k


@pytest.mark.parametrize(
    "payload, words",
    [
        (_bad(lambda k: k.__setitem__((0, 0), np.nan)), "non-finite"),
        (_bad(lambda k: k.__setitem__((1, 2), np.inf)), "non-finite"),
        (_bad(lambda k: k.__setitem__((2, 1), -np.inf)), "non-finite"),
        (_bad(lambda k: k.__setitem__((0, slice(None)), [1.2, -0.2, 0.0, 0.0])), "negative"),
        (_bad(lambda k: k.__setitem__((3, slice(None)), [0.5, 0.3, 0.1, 0.0])), "sum to 1"),
        (_bad(lambda k: k.__setitem__((4, slice(None)), [0.5, 0.5, 0.5, 0.5])), "sum to 1"),
        (np.zeros((ROWS, CLASSES)), "sum to 1"),
    ],
    ids=["nan", "inf", "-inf", "negative", "sum-0.9", "sum-2", "zeros"],
)
def test_bad_values_rejected(payload, words):
    with pytest.raises(InvalidPayload, match=words):
        _check(payload)


@pytest.mark.parametrize(
    "shape",
    [(ROWS - 1, CLASSES), (ROWS, CLASSES + 1), (ROWS * CLASSES,), (1, ROWS, CLASSES)],
)
def test_wrong_shape_rejected(shape):
    k = np.full(shape, 1.0 / shape[-1])
    with pytest.raises(InvalidPayload, match=r"shape") as err:
        _check(k)
    assert str((ROWS, CLASSES)) in str(err.value) and str(shape) in str(err.value)


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.uint8, np.bool_, np.complex64])
def test_non_float_dtype_rejected(dtype):
    k = np.zeros((ROWS, CLASSES), dtype=dtype)
    with pytest.raises(InvalidPayload, match="floating-point") as err:
        _check(k)
    assert np.dtype(dtype).name in str(err.value)


def test_non_array_rejected():
    with pytest.raises(InvalidPayload, match="floating-point.*list"):
        _check(_valid().tolist())


def test_one_hot_integer_knowledge_rejected_even_if_rows_sum_to_1():
    k = np.eye(CLASSES, dtype=np.int32)[np.arange(ROWS) % CLASSES]
    with pytest.raises(InvalidPayload, match="int32"):
        _check(k)


def test_unknown_array_keys_rejected():
    with pytest.raises(InvalidPayload, match="exactly") as err:
        _check(_valid(), extra_arrays={"logits": np.zeros((ROWS, CLASSES), np.float32)})
    assert "logits" in str(err.value)


def test_missing_knowledge_array_rejected():
    with pytest.raises(InvalidPayload, match="knowledge"):
        validate_knowledge(
            record_names=RECORDS, arrays={"probs": _valid()}, expected_rows=ROWS, num_classes=CLASSES
        )


@pytest.mark.parametrize(
    "records",
    [("knowledge", "metrics", "weights"), ("knowledge",), ("metrics",), ()],
    ids=["extra", "no-metrics", "no-knowledge", "empty"],
)
def test_wrong_record_names_rejected(records):
    with pytest.raises(InvalidPayload, match="records") as err:
        _check(_valid(), records=records)
    for name in records:
        assert name in str(err.value)


def test_oversize_payload_rejected():
    k = _valid(np.float16)  # 6 x 4 x 2 bytes = 48 bytes
    assert _check(k, max_bytes=48).shape == (ROWS, CLASSES)
    with pytest.raises(InvalidPayload, match="48 bytes.*limit is 47"):
        _check(k, max_bytes=47)


def test_oversize_payload_checked_before_shape():
    huge = np.zeros((1000, 1000), dtype=np.float32)  # 4 MB, wrong shape too
    with pytest.raises(InvalidPayload, match="limit"):
        _check(huge, max_bytes=1024)


def test_row_sum_within_tolerance_accepted():
    k = _valid(np.float64)
    k[0] *= 1.005  # off by 0.5%: float16 rounding territory
    out = _check(k)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-15)


def test_invalid_payload_is_a_value_error():
    assert issubclass(InvalidPayload, ValueError)


# ----------------------------------------------------------------- partition ids


@pytest.mark.parametrize("value, expected", [(0, 0), (4, 4), (3.0, 3)])
def test_valid_partition_ids(value, expected):
    assert validate_client_id({"partition-id": value}, num_clients=5) == expected


@pytest.mark.parametrize(
    "metrics",
    [{}, {"partition": 1}, {"partition-id": None}],
    ids=["empty", "other-key", "none"],
)
def test_missing_partition_id_rejected(metrics):
    with pytest.raises(InvalidPayload, match="partition-id"):
        validate_client_id(metrics, num_clients=5)


@pytest.mark.parametrize("value", [1.5, "1", True, False, [1]], ids=["float", "str", "true", "false", "list"])
def test_non_integer_partition_id_rejected(value):
    with pytest.raises(InvalidPayload, match="integer 'partition-id'"):
        validate_client_id({"partition-id": value}, num_clients=5)


@pytest.mark.parametrize("value", [-1, 5, 100, -1.0])
def test_out_of_range_partition_id_rejected(value):
    with pytest.raises(InvalidPayload, match=r"outside 0\.\.4"):
        validate_client_id({"partition-id": value}, num_clients=5)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_partition_id_rejected(value):
    with pytest.raises(InvalidPayload):
        validate_client_id({"partition-id": value}, num_clients=5)


# ------------------------------------------------------------- 8-bit wire format


def test_quantize_hand_example_uses_largest_remainders():
    # 255 * [0.5, 0.3, 0.2] = [127.5, 76.5, 51]: one unit missing after flooring, and the
    # tie between the two .5 remainders goes to the first
    np.testing.assert_array_equal(quantize(np.array([[0.5, 0.3, 0.2]])), [[128, 76, 51]])


def test_uint8_rows_sum_to_255_and_decode_within_one_level():
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.dirichlet(np.full(10, a), size=200) for a in (0.05, 1.0, 50.0)])
    wire = encode(p, "uint8")
    assert wire.dtype == np.uint8 and wire.nbytes == p.size
    np.testing.assert_array_equal(wire.sum(axis=1, dtype=np.int64), QUANT_LEVELS)
    assert np.abs(decode(wire) - p).max() < 1 / QUANT_LEVELS
    np.testing.assert_allclose(decode(wire).sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_uint8_payload_is_accepted_only_in_a_uint8_federation():
    wire = encode(_valid(np.float64), "uint8")
    out = _check(wire, wire_format="uint8")
    np.testing.assert_allclose(out, decode(wire))
    with pytest.raises(InvalidPayload, match="floating-point"):
        _check(wire)  # a float16 federation refuses 8-bit replies
    with pytest.raises(InvalidPayload, match="uint8"):
        _check(encode(_valid(np.float64)), wire_format="uint8")


def test_uint8_rows_that_do_not_sum_to_255_are_refused():
    wire = encode(_valid(np.float64), "uint8")
    wire[2, 0] += 1
    with pytest.raises(InvalidPayload, match="1 rows do not"):
        _check(wire, wire_format="uint8")


def test_unknown_wire_format_is_an_error():
    with pytest.raises(ValueError, match="float16"):
        encode(_valid(), "int4")


# ----------------------------------------------------------------- sparse top-k uplink


def _top_k_rows(k: int, rows: int = 200, classes: int = 10, seed: int = 5) -> np.ndarray:
    from fedkd.shielding import top_k_release

    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.dirichlet(np.full(classes, a), size=rows) for a in (0.05, 1.0, 50.0)])
    return top_k_release(p, k)


def _check_sparse(arrays, rows, classes, **kwargs):
    return validate_knowledge(record_names=RECORDS, arrays=arrays, expected_rows=rows, num_classes=classes, **kwargs)


@pytest.mark.parametrize("wire_format", ["float16", "uint8"])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_top_k_release_round_trips_through_the_sparse_record(wire_format, k):
    released = _top_k_rows(k)
    arrays = pack_release(released, wire_format, top_k=k)
    assert set(arrays) == {"top-classes", "top-values"}
    assert arrays["top-classes"].dtype == np.uint8 and arrays["top-classes"].shape == (600, k)
    per_row = 3 * k if wire_format == "float16" else 2 * k + 1  # bytes a row on the wire
    assert sum(a.nbytes for a in arrays.values()) == 600 * per_row
    out = _check_sparse(arrays, 600, 10, wire_format=wire_format, top_k=k)
    dense = _check_sparse(pack_release(released, wire_format), 600, 10, wire_format=wire_format)
    # as close to the released rows as the dense encoding of the same format
    tolerance = 2e-3 if wire_format == "float16" else 1 / QUANT_LEVELS
    assert np.abs(out - released).max() < tolerance
    assert np.abs(dense - released).max() < tolerance
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    # the decoded row still reveals only the top-k ranking: the other classes are equal
    kept = np.zeros(out.shape, dtype=bool)
    np.put_along_axis(kept, arrays["top-classes"].astype(np.int64), True, axis=1)
    others = out[~kept].reshape(len(out), 10 - k)
    np.testing.assert_allclose(others, others[:, :1].repeat(10 - k, axis=1), rtol=0, atol=1e-12)


def test_top_k_record_by_hand():
    row = np.array([[0.6, 0.05, 0.3, 0.05]])
    arrays = pack_release(row, "uint8", top_k=2)
    np.testing.assert_array_equal(arrays["top-classes"], [[0, 2]])
    np.testing.assert_array_equal(arrays["top-values"], [[153, 76, 26]])  # 255 * (0.6, 0.3, 0.1), largest remainder
    np.testing.assert_allclose(unpack_top_k(arrays["top-classes"], arrays["top-values"], 4),
                               [[153 / 255, 13 / 255, 76 / 255, 13 / 255]])


def test_top_k_off_or_k_at_least_c_sends_the_dense_array():
    p = _valid(np.float64)
    assert set(pack_release(p, "float16", top_k=0)) == {"knowledge"}
    assert set(pack_release(p, "float16", top_k=CLASSES)) == {"knowledge"}
    _check(pack_release(p, top_k=CLASSES)["knowledge"], top_k=CLASSES)


def _sparse_valid(wire_format="float16", k=2):
    return pack_release(_valid(np.float64), wire_format, top_k=k)


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda a: a.update({"top-classes": a["top-classes"].astype(np.int64)}), "uint8"),
        (lambda a: a["top-classes"].__setitem__((0, 0), CLASSES), "class >= 4"),
        (lambda a: a["top-classes"].__setitem__((1, 1), a["top-classes"][1, 0]), "repeats a class"),
        (lambda a: a.update({"top-classes": a["top-classes"][:, :1]}), "shape"),
        (lambda a: a.update({"top-values": a["top-values"][:-1]}), "shape"),
        (lambda a: a["top-values"].__setitem__((0, 0), np.nan), "non-finite"),
        (lambda a: a["top-values"].__setitem__((0, 0), -0.2), "negative"),
        (lambda a: a["top-values"].__setitem__((0, 0), 1.5), "sum to 1"),
        (lambda a: a.update({"top-values": a["top-values"].astype(np.int32)}), "floating-point"),
        (lambda a: a.pop("top-values"), "exactly"),
        (lambda a: a.update({"knowledge": np.zeros((ROWS, CLASSES))}), "exactly"),
    ],
)
def test_malformed_top_k_records_are_refused(mutate, words):
    arrays = _sparse_valid()
    mutate(arrays)
    with pytest.raises(InvalidPayload, match=words):
        _check_sparse(arrays, ROWS, CLASSES, top_k=2)


def test_top_k_federation_refuses_dense_and_wrong_format_replies():
    with pytest.raises(InvalidPayload, match="top-classes"):
        _check(encode(_valid(np.float64)), top_k=2)  # a dense reply where top-k was agreed
    with pytest.raises(InvalidPayload, match="uint8"):
        _check_sparse(_sparse_valid("float16"), ROWS, CLASSES, top_k=2, wire_format="uint8")
    arrays = _sparse_valid("uint8")
    arrays["top-values"][0, 0] += 1
    with pytest.raises(InvalidPayload, match="1 rows do not"):
        _check_sparse(arrays, ROWS, CLASSES, top_k=2, wire_format="uint8")


def test_site_record_packs_releases_and_passes_malformed_payloads_through():
    from fedkd.adversary import corrupt

    released = _valid(np.float64)
    packed = site_record({"knowledge": released}, num_classes=CLASSES, top_k=2)
    assert set(packed) == {"top-classes", "top-values"}
    rng = np.random.default_rng(0)
    for kind in ("nan", "negative", "wrong-shape", "extra-key", "int-dtype"):
        record = site_record(corrupt(released, kind, rng), num_classes=CLASSES, top_k=2)
        with pytest.raises(InvalidPayload):
            _check_sparse(record, ROWS, CLASSES, top_k=2)
    for kind in ("random", "flip"):  # valid knowledge: packed like any release, accepted
        record = site_record(corrupt(released, kind, rng), num_classes=CLASSES, top_k=2)
        assert _check_sparse(record, ROWS, CLASSES, top_k=2).shape == (ROWS, CLASSES)
