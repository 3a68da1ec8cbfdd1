"""Where a federation's arrays come from, and the on-disk cache of its split.

* **Sources** (:func:`load_source`): the embedded datasets (``digits``, shipped with
  scikit-learn; ``synthetic``, drawn from scikit-learn's ``make_classification`` to any
  size, :func:`synthetic_source`; ``topics``, the generated corpus of :mod:`fedkd.data.text`), Hugging Face
  image datasets (``mnist``, ``cifar10``, any hub id) and text datasets (``ag_news``,
  ``text:<hub id>``), read through ``datasets`` from a local copy or the hub.
* **The federation** (:func:`load_federation`): a :class:`fedkd.config.DataConfig`'s
  source, split by :func:`fedkd.data.splits.split_federation`, cached per process.
* **The split cache** (:func:`split_cache_path`): on one machine (a simulation: the
  driver and every Ray actor; a study's many runs) the split of an embedded dataset is
  also kept on disk, so the processes after the first load a few arrays instead of
  importing scikit-learn and ``datasets`` and partitioning again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from fedkd.plugins import is_plugin_path
from fedkd.data.splits import (
    SPLIT_PARTS,
    ArrayDataset,
    ClientData,
    DataUnavailableError,
    FederatedSplit,
    augment_public,
    split_federation,
)
from fedkd.data.own import dataset_arrays, encode_labels, read_own_data, scale_features, standardize_split
from fedkd.data.text import TOPICS, _HF_TEXT_NAMES, detokenize, is_text_dataset, tokenize, topic_corpus, vocab_info


# ---------------------------------------------------------------------------- sources

_HF_NAMES = {"mnist": ("ylecun/mnist", "image"), "cifar10": ("uoft-cs/cifar10", "img")}


def load_source(
    name: str, *, path: str = "", max_length: int = 32, tokenizer: str = "", num_examples: int = 3000,
    label_column: str = "", feature_columns: str = "", seed: int = 0, synthetic: SyntheticSpec | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Return ``(x, y, num_classes)`` for dataset ``name``.

    Text sources (``topics``, the embedded generated corpus; ``ag_news``; ``text:<hub
    id>``) give token ids ``x`` int64 [n, max_length] from the federation's tokenizer
    (``tokenizer``: a local folder, default the packaged MiniLM's), at most
    ``num_examples`` examples (see :func:`load_text_source`).

    ``digits`` is scikit-learn's 1,797 8x8 handwritten digits (shipped with
    scikit-learn, offline), scaled to [0, 1]. ``synthetic`` is generated offline from
    ``synthetic`` (a :class:`SyntheticSpec`, default ``SyntheticSpec()``; its own seed, not
    ``seed``): see :func:`synthetic_source`. Other names (``mnist``, ``cifar10``, or any
    Hugging Face image-classification dataset id) are read from ``path`` when given (a
    CSV file, an ``x``/``y`` ``.npz`` file or a ``save_to_disk`` folder, with the label and
    feature columns named or detected: :func:`fedkd.data.own.read_own_data`), else through
    ``datasets`` from the hub, which needs network access. ``file`` names your own data at
    ``path``. An import path ``package.module:load`` is a dataset plugin (:mod:`fedkd.plugins`),
    called as ``load(path=path, seed=seed)`` for ``(x, y)`` or ``(x, y, num_classes)``.
    """
    if is_plugin_path(name):
        return _load_plugin_source(name, path=path, seed=seed)
    if is_text_dataset(name):
        return load_text_source(
            name, path=path, max_length=max_length, tokenizer=tokenizer, num_examples=num_examples
        )
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.data / 16.0).astype(np.float32)
        return x, bunch.target.astype(np.int64), 10
    if name == SYNTHETIC:
        return synthetic_source(spec=synthetic or SyntheticSpec())
    hub_id, image_column = _HF_NAMES.get(name, (name, "image"))
    if path:
        if name != OWN_DATA and not Path(path).expanduser().exists():  # 'file': read_own_data says it
            raise DataUnavailableError(
                f"could not load dataset '{name}' from '{path}': no such file or folder. "
                f"Save it once elsewhere with datasets.load_dataset('{hub_id}').save_to_disk(DIR), "
                "copy DIR here and set data.path = DIR.")
        return read_own_data(path, label_column=label_column, feature_columns=feature_columns,
                             image_column=image_column)
    if name == OWN_DATA:
        raise DataUnavailableError("data.dataset 'file' reads your own data: set data.path")
    return _load_hf_images(name, hub_id=hub_id, image_column=image_column, label_column=label_column,
                           feature_columns=feature_columns)


OWN_DATA = "file"
"""``data.dataset = "file"``: your own data at ``data.path`` (CSV, ``.npz`` or a folder)."""

SYNTHETIC = "synthetic"
"""``data.dataset = "synthetic"``: the generated classification data of :func:`synthetic_source`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticSpec:
    """What :func:`synthetic_source` generates (the ``data.synthetic-*`` keys).

    ``examples`` rows, ``classes`` balanced classes, ``features`` features of which
    ``informative`` carry the class (the rest are noise), class clusters ``separation``
    apart (scikit-learn's ``class_sep``: larger is easier), ``shape`` the per-example shape
    (``()`` = flat ``[features]``; e.g. ``(8, 8)`` or ``(1, 8, 8)``, whose product must be
    ``features``), drawn from ``seed``."""

    examples: int = 6000
    classes: int = 10
    features: int = 64
    informative: int = 16
    separation: float = 2.0
    shape: tuple[int, ...] = ()
    seed: int = 0

    @classmethod
    def from_config(cls, data_config) -> SyntheticSpec:  # noqa: ANN001 (DataConfig)
        """The spec of a :class:`fedkd.config.DataConfig`'s ``synthetic_*`` fields."""
        return cls(
            examples=data_config.synthetic_examples, classes=data_config.synthetic_classes,
            features=data_config.synthetic_features, informative=data_config.synthetic_informative,
            separation=data_config.synthetic_separation, shape=parse_shape(data_config.synthetic_shape),
            seed=data_config.synthetic_seed,
        )


CLUSTERS_PER_CLASS = 2
"""Gaussian clusters per class in :func:`synthetic_source` (scikit-learn's default): a class
is not one blob, so a linear model does not solve it (see :func:`synthetic_source`)."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x8x8"`` -> ``(1, 8, 8)``; ``""`` -> ``()`` (flat). Raises ValueError on anything
    else (a part that is not a positive integer, more than three parts)."""
    if not text.strip():
        return ()
    parts = tuple(int(part) for part in text.lower().split("x"))
    if len(parts) > 3 or min(parts) < 1:
        raise ValueError(text)
    return parts


def synthetic_source(*, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, int]:
    """``(x float32 [examples, *shape or features], y int64 [examples], classes)``, generated.

    Why: digits holds ~990 private examples, so a federation of 1,000 sites leaves most
    with none; this source has as many examples as asked for, offline and seeded, so
    federations of 1,000 to 10,000 sites with enough data each can be simulated.

    What: scikit-learn's ``make_classification`` (Guyon 2003, the Madelon design) with
    ``n_informative = spec.informative`` features whose :data:`CLUSTERS_PER_CLASS` Gaussian
    clusters per class sit on hypercube vertices ``2 * spec.separation`` apart, no
    redundant or repeated features, ``features - informative`` pure-noise features, no
    label noise (``flip_y = 0``), equal class sizes and shuffled rows, all from
    ``random_state = spec.seed``. Each feature is then standardised (mean 0, std 1 over
    the generated rows): the affine map is part of the generator, a function of the seed
    like the data, not fitted on any split of it, so no test statistics reach training.
    ``spec.shape`` reshapes each row (an image-shaped variant for ``cnn-small``; the
    pixels carry no spatial structure). Same spec, same arrays (bit for bit on one
    scikit-learn/NumPy version); the split cache's key includes the library versions.

    With the defaults (64 features, 16 informative, separation 2, 10 classes) scikit-learn's
    ``MLPClassifier((32,))`` reached 0.84 test accuracy trained on 4,000 examples and 0.30
    on 200 (measured once, seed 0): a site alone does poorly, the federation has much to gain.
    """
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=spec.examples, n_features=spec.features, n_informative=spec.informative,
        n_redundant=0, n_repeated=0, n_classes=spec.classes, n_clusters_per_class=CLUSTERS_PER_CLASS,
        class_sep=spec.separation, flip_y=0.0, shuffle=True, random_state=spec.seed,
    )
    std = x.std(axis=0)
    x = ((x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)).astype(np.float32)
    if spec.shape:
        x = x.reshape(len(x), *spec.shape)
    return x, y.astype(np.int64), spec.classes


def _load_plugin_source(name: str, *, path: str, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    from fedkd.plugins import PluginError, load_plugin

    loaded = load_plugin(name, kind="dataset")(path=path, seed=seed)
    if not isinstance(loaded, tuple) or len(loaded) not in (2, 3):
        raise PluginError(f"dataset plugin '{name}' must return (x, y) or (x, y, num_classes); "
                          f"got {type(loaded).__name__}")
    x, labels = np.asarray(loaded[0]), np.asarray(loaded[1])
    if x.ndim < 2 or labels.shape != (len(x),):
        raise PluginError(f"dataset plugin '{name}': x must be [n, ...] and y [n]; got x {x.shape}, y {labels.shape}")
    y, num_classes = encode_labels(labels)
    if len(loaded) == 3:
        num_classes = int(loaded[2])
    return scale_features(x), y, num_classes


def _load_hf_images(name: str, *, hub_id: str, image_column: str, label_column: str,
                    feature_columns: str) -> tuple[np.ndarray, np.ndarray, int]:
    import datasets

    try:
        loaded = datasets.load_dataset(hub_id)
    except Exception as err:  # offline, unknown id: one clear message
        raise DataUnavailableError(
            f"could not load dataset '{name}' '{hub_id}' from the Hugging Face hub ({type(err).__name__}). "
            "Without network access, save it once elsewhere with "
            f"datasets.load_dataset('{hub_id}').save_to_disk(DIR), copy DIR here and set "
            "data.path = DIR; or use the embedded default data.dataset = 'digits'."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.concatenate_datasets(list(loaded.values()))
    x, labels = dataset_arrays(loaded, label_column=label_column,
                               features=[c.strip() for c in feature_columns.split(",") if c.strip()],
                               image_column=image_column, where=hub_id)
    y, num_classes = encode_labels(labels)
    return scale_features(x), y, num_classes


def load_text_corpus(
    name: str, *, path: str = "", num_examples: int, seed: int = 0
) -> tuple[list[str], np.ndarray, int]:
    """``(texts, labels, num_classes)`` of text source ``name`` (see
    :func:`fedkd.data.text.is_text_dataset`).

    ``topics`` is generated (``num_examples`` sentences); named corpora are read through
    ``datasets`` from ``path`` (a ``save_to_disk`` folder) or from the hub, and reduced to
    at most ``num_examples`` examples by a seeded draw (all splits pooled). Offline and
    without a local copy, a :class:`fedkd.data.DataUnavailableError` says how to provide one.
    """
    if name == "topics":
        texts, labels = topic_corpus(num_examples=num_examples, seed=seed)
        return texts, labels, len(TOPICS)
    import datasets

    hub_id = _HF_TEXT_NAMES.get(name, name.removeprefix("text:"))
    try:
        loaded = datasets.load_from_disk(path) if path else datasets.load_dataset(hub_id)
    except Exception as err:  # offline, missing path, unknown id: one clear message
        where = f"from '{path}'" if path else f"'{hub_id}' from the Hugging Face hub"
        raise DataUnavailableError(
            f"could not load text dataset '{name}' {where} ({type(err).__name__}). "
            "Without network access, save it once elsewhere with "
            f"datasets.load_dataset('{hub_id}').save_to_disk(DIR), copy DIR here and set "
            "data.path = DIR; or use the embedded text corpus data.dataset = 'topics'."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.concatenate_datasets(list(loaded.values()))
    columns = loaded.column_names
    text_column = "text" if "text" in columns else next(
        c for c in columns if loaded.features[c].dtype == "string"
    )
    label_column = "label" if "label" in columns else columns[-1]
    if len(loaded) > num_examples:
        keep = np.sort(np.random.default_rng(seed).choice(len(loaded), num_examples, replace=False))
        loaded = loaded.select(keep)
    labels = np.asarray(loaded[label_column], dtype=np.int64)
    return list(loaded[text_column]), labels, int(labels.max()) + 1


def load_text_source(
    name: str, *, path: str = "", max_length: int, tokenizer: str = "", num_examples: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(token ids int64 [n, max_length], labels, num_classes)``: the corpus, tokenised once."""
    texts, labels, num_classes = load_text_corpus(name, path=path, num_examples=num_examples, seed=seed)
    return tokenize(texts, max_length=max_length, tokenizer=tokenizer), labels, num_classes



@functools.lru_cache(maxsize=4)
def load_federation(data_config, seed: int) -> FederatedSplit:  # noqa: ANN001 (DataConfig)
    """The federation's split for a :class:`fedkd.config.DataConfig`, cached per process
    and, for the embedded datasets, on disk (:func:`split_cache_path`)."""
    cache = split_cache_path(data_config, seed)
    split = _read_split(cache) if cache is not None else None
    if split is None:
        x, y, num_classes = load_source(
            data_config.dataset, path=data_config.path, max_length=data_config.max_length,
            tokenizer=data_config.tokenizer, num_examples=data_config.text_examples,
            label_column=data_config.label_column, feature_columns=data_config.feature_columns, seed=seed,
            synthetic=SyntheticSpec.from_config(data_config) if data_config.dataset == SYNTHETIC else None,
        )  # text: tokenised here, once per process (this function is cached), never per round
        split = split_federation(
            x,
            y,
            num_classes=num_classes,
            num_clients=data_config.num_clients,
            partitioner=data_config.partitioner,
            alpha=data_config.alpha,
            classes_per_client=data_config.classes_per_client,
            min_partition_size=data_config.min_partition_size,
            public_fraction=data_config.public_fraction,
            test_fraction=data_config.test_fraction,
            val_fraction=data_config.val_fraction,
            local_test_fraction=data_config.local_test_fraction,
            seed=seed,
        )
        if cache is not None:
            _write_split(cache, split)
    split = dataclasses.replace(split, public=transfer_set(split.public, data_config, seed))  # after the cache
    if data_config.standardize != "none":  # after the cache: the cache keeps the split as read
        split = standardize_split(split, fit_on=data_config.standardize)
    if is_text_dataset(data_config.dataset):
        split = dataclasses.replace(split, text=vocab_info(data_config.tokenizer))
    return split


def transfer_set(public: ArrayDataset, data_config, seed: int) -> ArrayDataset:  # noqa: ANN001 (DataConfig)
    """The public set the federation distils on: ``public`` with its PII-like spans redacted
    (``data.public-redact``, :func:`redact_public`) and ``data.public-copies`` jittered copies
    of it (:func:`fedkd.data.splits.augment_public`, ``data.public-jitter``, the run's
    ``seed``). Applied to the raw public inputs, before standardisation, by every process
    (the simulation's split, a site reading the public file), so all agree."""
    if data_config.public_redact == "pii":
        public = ArrayDataset(redact_public(public.x, data_config), public.y, public.ids)
    return augment_public(public, copies=data_config.public_copies, jitter=data_config.public_jitter, seed=seed)


def redact_public(ids: np.ndarray, data_config) -> np.ndarray:  # noqa: ANN001 (DataConfig)
    """Token ids ``[N, L]`` of public texts with every PII-like span replaced
    (:func:`fedkd.shielding.redact_pii`; ``data.public-redact = "pii"``): the rows with a
    match are decoded, redacted and tokenized again (``data.max-length``, ``data.tokenizer``),
    the others keep their ids. Also what an audit applies to probes placed in the public set."""
    from fedkd.shielding import pii_rows, redact_pii

    ids = np.asarray(ids)
    texts = detokenize(ids, tokenizer=data_config.tokenizer)
    rows = np.flatnonzero(pii_rows(texts))
    if len(rows) == 0:
        return ids
    out = ids.copy()
    out[rows] = tokenize([redact_pii(texts[r]) for r in rows], max_length=ids.shape[1],
                         tokenizer=data_config.tokenizer).astype(ids.dtype)
    return out


# ------------------------------------------------------------------ split cache

SPLIT_CACHE_ENV = "FEDKD_CACHE_DIR"
"""Environment variable: the split cache's folder; empty disables the cache."""

_CACHEABLE = ("digits", "synthetic", "topics")  # embedded: their content is fixed by the code that makes them
_SPLIT_CODE = ("splits.py", "sources.py", "text.py")  # the code that makes a split: part of the cache key


def split_cache_path(data_config, seed: int) -> Path | None:  # noqa: ANN001 (DataConfig)
    """Where the split of ``data_config`` and ``seed`` is kept on disk, or None.

    Only the embedded datasets with the packaged tokenizer are cached (a user's files or a
    hub download can change behind the key). The key hashes every data setting, the seed,
    the source of the modules that make the split and the versions of the libraries they
    call (numpy, scikit-learn, flwr-datasets, datasets), so a change to any of them makes
    a new entry instead of reading a stale one. Folder: ``$FEDKD_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/fedkd``, else ``~/.cache/fedkd``; ``FEDKD_CACHE_DIR=""`` disables it.
    """
    if data_config.dataset not in _CACHEABLE or data_config.path or data_config.tokenizer:
        return None
    root = os.environ.get(SPLIT_CACHE_ENV)
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fedkd")
    if not root:
        return None
    key = json.dumps([dataclasses.asdict(data_config), seed, _split_code_version()], sort_keys=True)
    return Path(root) / "splits" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


@functools.lru_cache(maxsize=1)
def _split_code_version() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    here = Path(__file__).parent
    parts = [hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _SPLIT_CODE]
    for package in ("numpy", "scikit-learn", "flwr-datasets", "datasets"):
        try:
            parts.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} missing")
    return parts


def _split_arrays(split: FederatedSplit) -> dict[str, np.ndarray]:
    """The split as a few arrays: each site part concatenated over the sites with the sites'
    sizes beside it (``clients_train_x`` + ``clients_train_sizes``), so that a 10,000-site
    split is a dozen arrays in the file, not 90,000 (reading that many members of a zip
    file took 21 s)."""
    arrays = {"num_classes": np.int64(split.num_classes), "input_shape": np.asarray(split.input_shape, np.int64)}
    parts = {"public": split.public, "test": split.test}
    for name in SPLIT_PARTS:
        pieces = [getattr(client, name) for client in split.clients]
        arrays[f"clients_{name}_sizes"] = np.asarray([len(piece) for piece in pieces], np.int64)
        parts[f"clients_{name}"] = ArrayDataset(*(
            np.concatenate([getattr(piece, field) for piece in pieces]) for field in ("x", "y", "ids")))
    for name, data in parts.items():
        arrays.update({f"{name}_x": data.x, f"{name}_y": data.y, f"{name}_ids": data.ids})
    return arrays


def _write_split(path: Path, split: FederatedSplit) -> None:
    """Save atomically (a reader never sees half a file); a cache that cannot be written
    (read-only home, full disk) is skipped, not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            np.savez(tmp, **_split_arrays(split))
        os.replace(tmp.name, path)
    except OSError:
        pass


def _read_split(path: Path) -> FederatedSplit | None:
    """The cached split, or None when absent or unreadable (then it is rebuilt and rewritten)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = dict(f)

        def part(name: str) -> ArrayDataset:
            return ArrayDataset(arrays[f"{name}_x"], arrays[f"{name}_y"], arrays[f"{name}_ids"])

        pieces = {}
        for name in SPLIT_PARTS:
            whole, ends = part(f"clients_{name}"), np.cumsum(arrays[f"clients_{name}_sizes"])
            pieces[name] = [ArrayDataset(whole.x[end - size:end], whole.y[end - size:end], whole.ids[end - size:end])
                            for end, size in zip(ends.tolist(), arrays[f"clients_{name}_sizes"].tolist())]
        return FederatedSplit(
            public=part("public"),
            test=part("test"),
            clients=tuple(
                ClientData(**{name: pieces[name][i] for name in SPLIT_PARTS})
                for i in range(len(arrays["clients_train_sizes"]))
            ),
            num_classes=int(arrays["num_classes"]),
            input_shape=tuple(int(v) for v in arrays["input_shape"]),
        )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
