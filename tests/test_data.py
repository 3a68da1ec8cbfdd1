"""Tests for fedkd.data (DESIGN section 2): partitions, the federated split, sources."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from fedkd.data import (
    DataUnavailableError,
    load_source,
    partition_indices,
    public_fingerprint,
    split_federation,
)


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


def test_digits_source(digits):
    x, y, num_classes = digits
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert num_classes == 10
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))


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
    assert split.public_fingerprint == expected == public_fingerprint(ids)
    assert public_fingerprint(list(ids)) == expected  # same ids, any integer container
    assert public_fingerprint(ids.astype(np.int32)) == expected
    changed = ids.copy()
    changed[0] = 1797 + 1
    assert public_fingerprint(changed) != expected
    assert public_fingerprint(ids[::-1]) != expected  # order matters
    assert public_fingerprint(ids[:-1]) != expected


# ----------------------------------------------------------------- named datasets offline


def test_named_dataset_offline_raises_clear_error(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # `datasets` reads these variables once, at import; it may already be imported (by the
    # partitioner tests), so set its resolved flags too, and point its caches at an empty folder
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(DataUnavailableError) as err:
        load_source("mnist")
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert "mnist" in message
    assert "data.path" in message
    assert elapsed < 10.0, f"offline failure took {elapsed:.1f} s"


def test_named_dataset_missing_local_path_raises_clear_error(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataUnavailableError) as err:
        load_source("cifar10", path=str(missing))
    assert "cifar10" in str(err.value)
    assert str(missing) in str(err.value)


# ----------------------------------------------------------------- the split cache


def _assert_same_split(a, b):
    assert (a.num_classes, a.input_shape) == (b.num_classes, b.input_shape)
    assert len(a.clients) == len(b.clients)
    pairs = [(a.public, b.public), (a.test, b.test)]
    for ca, cb in zip(a.clients, b.clients):
        pairs += [(ca.train, cb.train), (ca.val, cb.val), (ca.test, cb.test)]
    for da, db in pairs:
        for name in ("x", "y", "ids"):
            xa, xb = getattr(da, name), getattr(db, name)
            assert xa.dtype == xb.dtype
            np.testing.assert_array_equal(xa, xb)


def _uncached_load(data_config, seed):
    from fedkd.data import sources as data

    data.load_federation.cache_clear()  # the per-process cache would hide the disk cache
    return data.load_federation(data_config, seed)


def test_split_cache_gives_the_same_split_and_skips_rebuilding(tmp_path, monkeypatch):
    from fedkd.data import sources as data
    from fedkd.config import DataConfig

    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path))
    config = DataConfig(num_clients=4, alpha=0.5)
    built = _uncached_load(config, 3)
    path = data.split_cache_path(config, 3)
    assert path is not None and path.parent.parent == tmp_path and path.is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the split was rebuilt although it is cached")

    monkeypatch.setattr(data, "split_federation", no_rebuild)
    _assert_same_split(_uncached_load(config, 3), built)
    # another seed or setting is another entry
    assert data.split_cache_path(config, 4) != path
    assert data.split_cache_path(DataConfig(num_clients=4, alpha=0.6), 3) != path
    data.load_federation.cache_clear()


def test_split_cache_rebuilds_a_damaged_file(tmp_path, monkeypatch):
    from fedkd.data import sources as data
    from fedkd.config import DataConfig

    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path))
    config = DataConfig(num_clients=3)
    built = _uncached_load(config, 0)
    path = data.split_cache_path(config, 0)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as after a crash mid-copy
    _assert_same_split(_uncached_load(config, 0), built)
    _assert_same_split(data._read_split(path), built)  # rewritten whole
    data.load_federation.cache_clear()


def test_split_cache_off_and_not_for_user_files(tmp_path, monkeypatch):
    from fedkd.data import sources as data
    from fedkd.config import DataConfig

    monkeypatch.setenv("FEDKD_CACHE_DIR", "")
    assert data.split_cache_path(DataConfig(), 0) is None
    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path))
    assert data.split_cache_path(DataConfig(dataset="mnist", path=str(tmp_path / "mnist")), 0) is None
    assert data.split_cache_path(DataConfig(dataset="ag_news"), 0) is None
    assert data.split_cache_path(DataConfig(dataset="topics", tokenizer=str(tmp_path)), 0) is None
    assert data.split_cache_path(DataConfig(dataset="topics"), 0) is not None
