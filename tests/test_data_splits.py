"""Tests for fedkd.data.splits (DESIGN section 2): partitions, the federated split, the
public set's fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from fedkd.data import augment_public, load_source, partition_indices, public_fingerprint, split_federation
from fedkd.data.splits import TRANSFER_COPY_ID


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


# ----------------------------------------------------------------- partition_indices


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
@pytest.mark.parametrize("seed", [0, 3])
def test_dirichlet_partitions_cover_every_example_once(digits, alpha, seed):
    _, y, _ = digits
    parts = partition_indices(y, num_partitions=6, partitioner="dirichlet", alpha=alpha, seed=seed)
    assert len(parts) == 6
    joined = np.concatenate(parts)
    assert len(joined) == len(y)  # no example twice ...
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(y)))  # ... and none missing
    assert min(len(p) for p in parts) >= 10  # min_partition_size default


def test_dirichlet_alpha_controls_label_skew(digits):
    _, y, _ = digits

    def mean_classes_covered(alpha):
        parts = partition_indices(y, num_partitions=6, alpha=alpha, seed=0)
        # classes holding at least 5% of the client's share
        return np.mean([(np.bincount(y[p], minlength=10) / len(p) >= 0.05).sum() for p in parts])

    assert mean_classes_covered(0.05) < mean_classes_covered(100.0)
    assert mean_classes_covered(100.0) == 10


def test_dirichlet_same_seed_same_partition(digits):
    _, y, _ = digits
    a = partition_indices(y, num_partitions=4, alpha=0.3, seed=5)
    b = partition_indices(y, num_partitions=4, alpha=0.3, seed=5)
    c = partition_indices(y, num_partitions=4, alpha=0.3, seed=6)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


@pytest.mark.parametrize("classes_per_client", [1, 2, 3])
def test_pathological_at_most_k_classes_per_client(digits, classes_per_client):
    _, y, _ = digits
    parts = partition_indices(
        y, num_partitions=10, partitioner="pathological", classes_per_client=classes_per_client, seed=1
    )
    assert len(parts) == 10
    for p in parts:
        assert len(np.unique(y[p])) <= classes_per_client
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)  # disjoint


@pytest.mark.parametrize("n", [3, 7, 10])
def test_iid_sizes_are_balanced(digits, n):
    _, y, _ = digits
    parts = partition_indices(y, num_partitions=n, partitioner="iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))


def test_partition_errors(digits):
    _, y, _ = digits
    with pytest.raises(ValueError, match="dirichlet, iid, pathological"):
        partition_indices(y, num_partitions=3, partitioner="zipf")
    with pytest.raises(ValueError, match="cannot split"):
        partition_indices(y[:5], num_partitions=6)


# ----------------------------------------------------------------- split_federation


def _all_id_sets(split):
    sets = {"public": split.public.ids, "test": split.test.ids}
    for i, client in enumerate(split.clients):
        sets[f"client{i}.train"] = client.train.ids
        sets[f"client{i}.val"] = client.val.ids
        sets[f"client{i}.test"] = client.test.ids
    return sets


@pytest.fixture(scope="module")
def split(digits):
    x, y, c = digits
    return split_federation(x, y, num_classes=c, num_clients=5, alpha=0.5, seed=0)


def test_split_parts_are_disjoint_and_cover_everything(split):
    sets = _all_id_sets(split)
    joined = np.concatenate(list(sets.values()))
    assert len(joined) == 1797
    assert len(np.unique(joined)) == 1797  # pairwise disjoint
    np.testing.assert_array_equal(np.sort(joined), np.arange(1797))


def test_split_shapes_and_fractions(split, digits):
    x, y, _ = digits
    assert split.num_classes == 10 and split.input_shape == (64,)
    assert len(split.clients) == 5
    assert abs(len(split.public) - 0.3 * 1797) <= 1
    assert abs(len(split.test) - 0.15 * 1797) <= 2
    # ids index into the source: x and y travel with them
    np.testing.assert_array_equal(split.public.x, x[split.public.ids])
    np.testing.assert_array_equal(split.clients[2].train.y, y[split.clients[2].train.ids])
    for client in split.clients:
        assert len(client.train) > 0 and len(client.test) > 0
        share = len(client.train) + len(client.val) + len(client.test)
        assert abs(len(client.test) - 0.2 * share) <= 1


def test_same_seed_same_split_different_seed_different(digits):
    x, y, c = digits
    a = split_federation(x, y, num_classes=c, num_clients=4, seed=11)
    b = split_federation(x, y, num_classes=c, num_clients=4, seed=11)
    other = split_federation(x, y, num_classes=c, num_clients=4, seed=12)
    for key, ids in _all_id_sets(a).items():
        np.testing.assert_array_equal(ids, _all_id_sets(b)[key])
    assert a.public_fingerprint == b.public_fingerprint
    assert not np.array_equal(a.public.ids, other.public.ids)
    assert a.public_fingerprint != other.public_fingerprint
    assert not np.array_equal(a.clients[0].train.ids, other.clients[0].train.ids)


def test_public_fingerprint_is_sha256_of_ordered_ids(split):
    ids = split.public.ids
    expected = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()
    assert public_fingerprint(ids) == expected
    assert public_fingerprint(list(ids)) == expected  # same ids, any integer container
    assert public_fingerprint(ids.astype(np.int32)) == expected
    changed = ids.copy()
    changed[0] = 1797 + 1
    assert public_fingerprint(changed) != expected
    assert public_fingerprint(ids[::-1]) != expected  # order matters
    assert public_fingerprint(ids[:-1]) != expected


def test_public_fingerprint_covers_the_inputs(split):
    ids, x = split.public.ids, split.public.x
    by_hand = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes())
    by_hand.update(repr(tuple(x.shape)).encode())
    by_hand.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    assert split.public_fingerprint == public_fingerprint(ids, x) == by_hand.hexdigest()
    assert public_fingerprint(ids, x.astype(np.float64)) == split.public_fingerprint  # as loaded anywhere
    for bad in (np.zeros_like(x), np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x)):
        assert public_fingerprint(ids, bad) != split.public_fingerprint  # same ids, other inputs


# ----------------------------------------------------------------- the transfer set (augment_public)


def test_jittered_copies_follow_the_public_set_with_the_stated_noise(split):
    public = split.public
    n = len(public)
    out = augment_public(public, copies=3, jitter=0.5, seed=7)
    assert len(out) == 4 * n and out.x.dtype == np.float32
    np.testing.assert_array_equal(out.x[:n], public.x.astype(np.float32))  # the public set first, as it was
    np.testing.assert_array_equal(out.ids[:n], public.ids)
    np.testing.assert_array_equal(out.y, np.tile(public.y, 4))  # copy m of example j keeps j's label
    assert list(out.ids[n:n + 2]) == [TRANSFER_COPY_ID, TRANSFER_COPY_ID - 1] and len(np.unique(out.ids)) == 4 * n
    # the jitter, by hand: per copy and feature, (copy - source) / (0.5 * public std) is N(0, 1)
    flat = public.x.reshape(n, -1).astype(np.float64)
    std = flat.std(axis=0)
    noise = out.x[n:].reshape(3, n, -1).astype(np.float64) - flat[None]
    moving = std > 0.05
    np.testing.assert_array_equal(noise[:, :, std == 0], 0.0)  # constant pixels stay as they are
    z = noise[:, :, moving] / (0.5 * std[moving])
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02  # ~30k draws: 5 standard errors
    assert abs(np.corrcoef(z[0].ravel(), z[1].ravel())[0, 1]) < 0.03  # the copies are independent


def test_jittered_copies_are_seeded_and_zero_copies_is_the_public_set(split):
    a = augment_public(split.public, copies=2, jitter=0.3, seed=1)
    b = augment_public(split.public, copies=2, jitter=0.3, seed=1)
    c = augment_public(split.public, copies=2, jitter=0.3, seed=2)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x)
    assert public_fingerprint(a.ids, a.x) != public_fingerprint(c.ids, c.x)  # sites would refuse the other draw
    assert augment_public(split.public, copies=0, jitter=0.5, seed=1) is split.public
    float64 = dataclasses.replace(split.public, x=split.public.x.astype(np.float64))
    np.testing.assert_array_equal(augment_public(float64, copies=2, jitter=0.3, seed=1).x, a.x)  # as read from a file


def test_jittered_copies_refuse_token_ids_and_bad_knobs(split):
    tokens = dataclasses.replace(split.public, x=np.zeros((len(split.public), 8), np.int64))
    with pytest.raises(ValueError, match="data.public-copies: jittered copies need float features"):
        augment_public(tokens, copies=1, jitter=0.5, seed=0)
    with pytest.raises(ValueError, match="data.public-copies must be >= 0"):
        augment_public(split.public, copies=-1, jitter=0.5, seed=0)
