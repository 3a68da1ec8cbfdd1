"""Tests for fedkd.data.sources: the embedded and named datasets, the text federation's
tokenisation, and the on-disk split cache."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedkd.data import DataUnavailableError, load_federation, load_source
from fedkd.data.text import TOPICS
from text_support import L, needs_extra, site_config


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


# ----------------------------------------------------------------- the synthetic dataset


def test_synthetic_source_has_the_configured_shape_classes_and_scale():
    from fedkd.data import SyntheticSpec

    x, y, num_classes = load_source("synthetic", synthetic=SyntheticSpec(
        examples=1003, classes=7, features=12, informative=5, separation=1.5, seed=4))
    assert x.shape == (1003, 12) and x.dtype == np.float32
    assert y.shape == (1003,) and y.dtype == np.int64
    assert num_classes == 7
    counts = np.bincount(y, minlength=7)
    assert counts.sum() == 1003 and counts.max() - counts.min() <= 1  # equal classes, no label noise
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)  # standardised per feature
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-4)


def test_synthetic_source_same_seed_same_data_other_seed_other_data():
    from fedkd.data import SyntheticSpec

    spec = SyntheticSpec(examples=300, classes=3, features=8, informative=4, seed=1)
    x1, y1, _ = load_source("synthetic", synthetic=spec)
    x2, y2, _ = load_source("synthetic", synthetic=spec, seed=99)  # the run seed does not change the data
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, y3, _ = load_source("synthetic", synthetic=SyntheticSpec(examples=300, classes=3, features=8,
                                                                  informative=4, seed=2))
    assert not np.allclose(x1, x3)
    assert (y1 != y3).any()


def test_synthetic_separation_reaches_the_generator():
    """Larger data.synthetic-separation, easier classes: a 5-nearest-neighbour classifier
    (an independent judge of separability) does far better at 3.0 than at 0.3."""
    from sklearn.neighbors import KNeighborsClassifier

    from fedkd.data import SyntheticSpec

    scores = {}
    for separation in (0.3, 3.0):
        x, y, _ = load_source("synthetic", synthetic=SyntheticSpec(
            examples=2000, classes=4, features=8, informative=6, separation=separation, seed=0))
        scores[separation] = KNeighborsClassifier(5).fit(x[:1500], y[:1500]).score(x[1500:], y[1500:])
    assert scores[3.0] > scores[0.3] + 0.3, scores


def test_synthetic_image_shape_and_a_tiny_federation_builds(tmp_path, monkeypatch):
    from fedkd.config import load_config
    from fedkd.data import sources
    from fedkd.federation.preflight import check_site_models

    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path))
    config = load_config(overrides={
        "data.dataset": "synthetic", "data.num-clients": 50, "data.partitioner": "iid",
        "data.synthetic-examples": 5000, "data.synthetic-classes": 4, "data.synthetic-features": 16,
        "data.synthetic-informative": 6, "data.synthetic-shape": "1x4x4",
        "model.architectures": "mlp-small,mlp-large,cnn-small",
    })
    split = _uncached_load(config.data, 0)
    assert split.input_shape == (1, 4, 4) and split.num_classes == 4
    assert len(split.clients) == 50
    assert min(len(c.train) for c in split.clients) >= 15  # 5000 * 0.55 / 50 = 55 each, 70% to train
    assert len(split.public) == 1500 and len(split.test) == 750
    ids = np.concatenate([split.public.ids, split.test.ids]
                         + [getattr(c, part).ids for c in split.clients for part in ("train", "val", "test")])
    assert len(ids) == 5000 and len(np.unique(ids)) == 5000  # every example in exactly one part
    check_site_models(config=config, split=split)  # mlp-small, mlp-large, cnn-small read it
    # the cache key has the synthetic keys: another size or seed is another entry
    path = sources.split_cache_path(config.data, 0)
    assert path is not None and path.is_file()
    for key, value in (("synthetic-examples", 5001), ("synthetic-seed", 1), ("synthetic-separation", 1.0),
                       ("synthetic-shape", "4x4")):
        other = load_config(overrides={**config.to_flat(), f"data.{key}": value})
        assert sources.split_cache_path(other.data, 0) != path, key
    _assert_same_split(_uncached_load(config.data, 0), split)  # read back from the cache
    sources.load_federation.cache_clear()


def test_synthetic_config_refusals_name_the_key_the_limit_and_the_value():
    from fedkd.config import ConfigError, load_config

    cases = {
        "data.synthetic-informative": ({"data.synthetic-features": 8, "data.synthetic-informative": 9},
                                       ["<= data.synthetic-features (8)", "got 9"]),
        "data.synthetic-shape": ({"data.synthetic-shape": "3x8x8"}, ["data.synthetic-features (64)", "'3x8x8'"]),
        "data.synthetic-examples": ({"data.synthetic-examples": 10}, [">= 20", "got 10"]),
    }
    for key, (overrides, words) in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(overrides={"data.dataset": "synthetic", **overrides})
        (line,) = err.value.problems
        assert line.startswith(key + ":") and all(w in line for w in words), line
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"data.dataset": "synthetic", "data.synthetic-classes": 10,
                               "data.synthetic-informative": 4})  # 20 clusters > 2**4 vertices
    assert "at least 5 informative" in str(err.value) and "got 4" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"data.dataset": "synthetic", "data.synthetic-shape": "8 by 8"})
    assert "data.synthetic-shape: must be ''" in str(err.value)
    # the same keys are not checked for another dataset (they are not read)
    load_config(overrides={"data.synthetic-shape": "3x8x8"})


# ----------------------------------------------------------------- named datasets offline


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network for ``datasets`` and ``huggingface_hub``, and empty caches."""
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


def test_named_dataset_offline_raises_clear_error(offline_hub):
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


# ----------------------------------------------------------------- text sources


@needs_extra
def test_text_federation_is_tokenised_once_as_int64_ids():
    data = site_config().data
    start = time.perf_counter()
    split = load_federation(data, 0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    assert load_federation(data, 0) is split  # cached per process: not re-tokenised per round
    assert time.perf_counter() - start < first
    assert split.public.x.dtype == np.int64 and split.public.x.shape[1:] == (L,)
    assert split.input_shape == (L,) and split.num_classes == len(TOPICS)
    assert split.model_options == {"vocab_size": 30522, "pad_id": 0}
    x = split.public.x
    assert (x[:, 0] == 101).all()  # [CLS] first; pad id 0 after the text
    assert ((x == 0).cumsum(axis=1) * (x != 0) == 0).all()  # no token after a pad


def test_ag_news_offline_fails_with_a_clear_message(offline_hub):
    with pytest.raises(DataUnavailableError) as err:
        load_source("ag_news")
    message = str(err.value)
    assert "ag_news" in message and "data.path" in message and "topics" in message


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
    from fedkd.data import sources

    sources.load_federation.cache_clear()  # the per-process cache would hide the disk cache
    return sources.load_federation(data_config, seed)


def test_split_cache_gives_the_same_split_and_skips_rebuilding(tmp_path, monkeypatch):
    from fedkd.data import sources
    from fedkd.config import DataConfig

    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path))
    config = DataConfig(num_clients=4, alpha=0.5)
    built = _uncached_load(config, 3)
    path = sources.split_cache_path(config, 3)
    assert path is not None and path.parent.parent == tmp_path and path.is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the split was rebuilt although it is cached")

    monkeypatch.setattr(sources, "split_federation", no_rebuild)
    _assert_same_split(_uncached_load(config, 3), built)
    # another seed or setting is another entry
    assert sources.split_cache_path(config, 4) != path
    assert sources.split_cache_path(DataConfig(num_clients=4, alpha=0.6), 3) != path
    sources.load_federation.cache_clear()


def test_split_cache_rebuilds_a_damaged_file(tmp_path, monkeypatch):
    from fedkd.data import sources
    from fedkd.config import DataConfig

    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path))
    config = DataConfig(num_clients=3)
    built = _uncached_load(config, 0)
    path = sources.split_cache_path(config, 0)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as after a crash mid-copy
    _assert_same_split(_uncached_load(config, 0), built)
    _assert_same_split(sources._read_split(path), built)  # rewritten whole
    sources.load_federation.cache_clear()


def test_split_cache_off_and_not_for_user_files(tmp_path, monkeypatch):
    from fedkd.data import sources
    from fedkd.config import DataConfig

    monkeypatch.setenv("FEDKD_CACHE_DIR", "")
    assert sources.split_cache_path(DataConfig(), 0) is None
    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path))
    assert sources.split_cache_path(DataConfig(dataset="mnist", path=str(tmp_path / "mnist")), 0) is None
    assert sources.split_cache_path(DataConfig(dataset="ag_news"), 0) is None
    assert sources.split_cache_path(DataConfig(dataset="topics", tokenizer=str(tmp_path)), 0) is None
    assert sources.split_cache_path(DataConfig(dataset="topics"), 0) is not None


def test_public_redact_rewrites_only_the_pii_rows_of_the_public_set():
    """data.public-redact = pii: the public texts with a PII-like match read 'redacted' in its
    place, the others keep their token ids; the private splits are untouched; two probes that
    differ only in their digits come out as the same ids."""
    from fedkd.config import load_config
    from fedkd.data import load_federation
    from fedkd.data.sources import redact_public
    from fedkd.data.text import detokenize, tokenize
    from fedkd.shielding import pii_rows

    text = {"data.dataset": "topics", "data.text-examples": 240, "data.num-clients": 2,
            "model.architectures": "bert-tiny", "global-student.model": "bert-tiny"}
    plain = load_federation(load_config(overrides=text).data, 0)
    config = load_config(overrides={**text, "data.public-redact": "pii"})
    redacted = load_federation(config.data, 0)
    before = detokenize(plain.public.x, tokenizer=config.data.tokenizer)
    flagged = pii_rows(before)
    assert 0 < flagged.sum() < len(flagged)
    np.testing.assert_array_equal(redacted.public.x[~flagged], plain.public.x[~flagged])
    after = detokenize(redacted.public.x[flagged], tokenizer=config.data.tokenizer)
    assert all("redacted" in t for t in after) and not pii_rows(after).any()
    np.testing.assert_array_equal(redacted.public.y, plain.public.y)
    np.testing.assert_array_equal(redacted.clients[0].train.x, plain.clients[0].train.x)
    probes = tokenize(["my pin is 4 8 1 5", "my pin is 0 2 7 3"], max_length=config.data.max_length,
                      tokenizer=config.data.tokenizer)
    out = redact_public(probes, config.data)
    assert not np.array_equal(probes[0], probes[1])
    np.testing.assert_array_equal(out[0], out[1])
