"""Data: the embedded default, named datasets, and the federated split.

A federation's data is split once, from the seed, into

* the *public transfer set* P (inputs shared by every site and the server; its labels
  are kept only for audits and benchmarks and never reach fusion),
* a *global test set* (for the optional global student),
* the private *client pool*, partitioned across clients with a ``flwr_datasets``
  partitioner (Dirichlet label skew, pathological k-classes-per-client, or IID); each
  client's share is split into train / validation / local test, stratified where the
  share allows it, so a local test set follows the client's own label mix.

Every process (server, each client) rebuilds the same split from the same config, so
nothing but knowledge ever crosses the network. On one machine (a simulation: the driver
and every Ray actor; a study's many runs) the split of an embedded dataset is also kept
on disk (:func:`split_cache_path`), so the processes after the first load a few arrays
instead of importing scikit-learn and ``datasets`` and partitioning again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np


if TYPE_CHECKING:
    from fedkd.text import TextVocab


class DataUnavailableError(RuntimeError):
    """A named dataset could not be loaded (usually: offline, no local copy)."""


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs ``x`` [n, *input_shape] (float32 features, or int64 token ids [n, L] for text;
    attention mask = ids != pad id), labels ``y`` [n] (int64), global ``ids`` [n]."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, positions: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.x[positions], self.y[positions], self.ids[positions])


@dataclass(frozen=True)
class ClientData:
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset


@dataclass(frozen=True)
class FederatedSplit:
    public: ArrayDataset
    test: ArrayDataset
    clients: tuple[ClientData, ...]
    num_classes: int
    input_shape: tuple[int, ...]
    text: TextVocab | None = None
    """Text federations: the shared tokenizer's vocabulary size and pad id (None for images)."""

    @property
    def model_options(self) -> dict[str, int]:
        """Extra arguments of :func:`fedkd.models.build_model` for this data: text models
        size their embeddings to the federation's tokenizer."""
        if self.text is None:
            return {}
        return {"vocab_size": self.text.vocab_size, "pad_id": self.text.pad_id}

    @property
    def public_fingerprint(self) -> str:
        """sha256 of the ordered public example ids: sites must agree on it."""
        return public_fingerprint(self.public.ids)


def public_fingerprint(ids: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


# ---------------------------------------------------------------------------- sources

_HF_NAMES = {"mnist": ("ylecun/mnist", "image"), "cifar10": ("uoft-cs/cifar10", "img")}


def load_source(
    name: str, *, path: str = "", max_length: int = 32, tokenizer: str = "", num_examples: int = 3000
) -> tuple[np.ndarray, np.ndarray, int]:
    """Return ``(x, y, num_classes)`` for dataset ``name``.

    Text sources (``topics``, the embedded generated corpus; ``ag_news``; ``text:<hub
    id>``) give token ids ``x`` int64 [n, max_length] from the federation's tokenizer
    (``tokenizer``: a local folder, default the packaged MiniLM's), at most
    ``num_examples`` examples (see :func:`fedkd.text.load_text_source`).

    ``digits`` is scikit-learn's 1,797 8x8 handwritten digits (shipped with
    scikit-learn, offline), scaled to [0, 1]. Other names (``mnist``, ``cifar10``, or any
    Hugging Face image-classification dataset id) are read through ``datasets``: from
    ``path`` (a ``save_to_disk`` folder) when given, else from the hub, which needs
    network access.
    """
    from fedkd.text import is_text_dataset, load_text_source

    if is_text_dataset(name):
        return load_text_source(
            name, path=path, max_length=max_length, tokenizer=tokenizer, num_examples=num_examples
        )
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.data / 16.0).astype(np.float32)
        return x, bunch.target.astype(np.int64), 10
    return _load_hf_images(name, path)


def _load_hf_images(name: str, path: str) -> tuple[np.ndarray, np.ndarray, int]:
    import datasets

    hub_id, image_column = _HF_NAMES.get(name, (name, "image"))
    try:
        if path:
            loaded = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(hub_id)
    except Exception as err:  # offline, missing path, unknown id: one clear message
        where = f"from '{path}'" if path else f"'{hub_id}' from the Hugging Face hub"
        raise DataUnavailableError(
            f"could not load dataset '{name}' {where} ({type(err).__name__}). "
            "Without network access, save it once elsewhere with "
            f"datasets.load_dataset('{hub_id}').save_to_disk(DIR), copy DIR here and set "
            "data.path = DIR; or use the embedded default data.dataset = 'digits'."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.concatenate_datasets(list(loaded.values()))
    columns = loaded.column_names
    image_column = image_column if image_column in columns else columns[0]
    label_column = "label" if "label" in columns else columns[-1]
    x = np.stack([np.asarray(img, dtype=np.float32) / 255.0 for img in loaded[image_column]])
    if x.ndim == 4:  # HWC -> CHW
        x = x.transpose(0, 3, 1, 2)
    y = np.asarray(loaded[label_column], dtype=np.int64)
    return x, y, int(y.max()) + 1


# ---------------------------------------------------------------------- partitioning


def partition_indices(
    labels: np.ndarray,
    *,
    num_partitions: int,
    partitioner: str = "dirichlet",
    alpha: float = 0.1,
    classes_per_client: int = 2,
    min_partition_size: int = 10,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split positions ``0..len(labels)-1`` into ``num_partitions`` disjoint sets.

    Uses ``flwr_datasets`` partitioners on an in-memory ``datasets.Dataset``:
    ``dirichlet`` draws each class's split over clients from Dir(alpha) (alpha 0.05 is
    extreme skew, 100 is close to IID); ``pathological`` gives each client
    ``classes_per_client`` classes; ``iid`` shuffles evenly.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if num_partitions > len(labels):
        raise ValueError(
            f"cannot split {len(labels)} examples over {num_partitions} clients"
        )
    if partitioner == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            seed=seed,
        )
    elif partitioner == "pathological":
        part = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="deterministic",
            seed=seed,
        )
    elif partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    else:
        raise ValueError(
            f"unknown partitioner '{partitioner}'; choose one of: dirichlet, iid, pathological"
        )
    part.dataset = Dataset.from_dict(
        {"label": np.asarray(labels).tolist(), "position": list(range(len(labels)))}
    )
    try:
        with warnings.catch_warnings():
            # the Dirichlet partitioner warns on every redraw below min_partition_size;
            # redraws are expected at strong skew, and a failure still raises below
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            return [
                np.asarray(part.load_partition(i)["position"], dtype=np.int64)
                for i in range(num_partitions)
            ]
    except ValueError as err:
        raise ValueError(
            f"{partitioner} partitioning of {len(labels)} examples over {num_partitions} "
            f"clients failed: {err}"
        ) from None


def _split(
    positions: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``positions`` into (rest, held-out fraction), stratified where possible."""
    if fraction <= 0 or len(positions) < 2:
        return positions, positions[:0]
    from sklearn.model_selection import train_test_split  # lazy: sites reading site files skip it

    try:
        rest, held = train_test_split(
            positions, test_size=fraction, random_state=seed, stratify=labels[positions]
        )
    except ValueError:  # a class with one example, or fewer held-out slots than classes
        rest, held = train_test_split(positions, test_size=fraction, random_state=seed)
    return np.sort(rest), np.sort(held)


def split_federation(
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    num_clients: int,
    partitioner: str = "dirichlet",
    alpha: float = 0.1,
    classes_per_client: int = 2,
    min_partition_size: int = 10,
    public_fraction: float = 0.3,
    test_fraction: float = 0.15,
    val_fraction: float = 0.1,
    local_test_fraction: float = 0.2,
    seed: int = 0,
) -> FederatedSplit:
    """Split ``(x, y)`` into public set, global test set and client shares (see module doc)."""
    everything = ArrayDataset(x, y, np.arange(len(y)))
    all_positions = np.arange(len(y))
    pool, public = _split(all_positions, y, public_fraction, seed)
    pool, test = _split(pool, y, test_fraction / (1 - public_fraction), seed + 1)
    shares = partition_indices(
        y[pool],
        num_partitions=num_clients,
        partitioner=partitioner,
        alpha=alpha,
        classes_per_client=classes_per_client,
        min_partition_size=min_partition_size,
        seed=seed,
    )
    clients = []
    for i, share in enumerate(shares):
        own = pool[share]
        own, local_test = _split(own, y, local_test_fraction, seed + 10 + i)
        train, val = _split(own, y, val_fraction / (1 - local_test_fraction), seed + 10 + i)
        clients.append(
            ClientData(everything.subset(train), everything.subset(val), everything.subset(local_test))
        )
    return FederatedSplit(
        public=everything.subset(public),
        test=everything.subset(test),
        clients=tuple(clients),
        num_classes=num_classes,
        input_shape=tuple(x.shape[1:]),
    )


@functools.lru_cache(maxsize=4)
def load_federation(data_config, seed: int) -> FederatedSplit:  # noqa: ANN001 (DataConfig)
    """The federation's split for a :class:`fedkd.config.DataConfig`, cached per process
    and, for the embedded datasets, on disk (:func:`split_cache_path`)."""
    from fedkd.text import is_text_dataset, vocab_info

    cache = split_cache_path(data_config, seed)
    split = _read_split(cache) if cache is not None else None
    if split is None:
        x, y, num_classes = load_source(
            data_config.dataset, path=data_config.path, max_length=data_config.max_length,
            tokenizer=data_config.tokenizer, num_examples=data_config.text_examples,
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
    if is_text_dataset(data_config.dataset):
        split = dataclasses.replace(split, text=vocab_info(data_config.tokenizer))
    return split


# ------------------------------------------------------------------ split cache

SPLIT_CACHE_ENV = "FEDKD_CACHE_DIR"
"""Environment variable: the split cache's folder; empty disables the cache."""

_CACHEABLE = ("digits", "topics")  # embedded: their content is fixed by the code that makes them
_SPLIT_CODE = ("data.py", "text.py")  # the code that makes a split: part of the cache key


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
    arrays = {"num_classes": np.int64(split.num_classes), "input_shape": np.asarray(split.input_shape, np.int64)}
    parts = {"public": split.public, "test": split.test}
    for i, client in enumerate(split.clients):
        parts.update({f"client{i}_{name}": getattr(client, name) for name in SPLIT_PARTS})
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

        num_clients = sum(1 for key in arrays if key.endswith("_train_x"))
        return FederatedSplit(
            public=part("public"),
            test=part("test"),
            clients=tuple(
                ClientData(**{name: part(f"client{i}_{name}") for name in SPLIT_PARTS}) for i in range(num_clients)
            ),
            num_classes=int(arrays["num_classes"]),
            input_shape=tuple(int(v) for v in arrays["input_shape"]),
        )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


# ------------------------------------------------------------------ site-local files
#
# In a deployment each site keeps its own data on its own host. Two small .npz files
# carry what a site needs, so a site host never holds the other sites' data:
#
# * the public transfer set  (``x`` [P, *input_shape], ``ids`` [P], ``num_classes``), the
#   same file on every host; its fingerprint (ordered ids) must equal the server's;
# * the site's private data  (``train_x/y/ids``, ``val_x/y/ids``, ``test_x/y/ids``, as
#   ``fedkd deploy export-partitions`` writes them from the embedded split, or just
#   ``x`` and ``y`` of the site's own records, which are then split into train /
#   validation / local test with the run's ``data.*-fraction`` settings).

SPLIT_PARTS = ("train", "val", "test")


class SiteDataError(ValueError):
    """A site's local data file is missing, unreadable or does not fit the federation."""


def save_public_file(path, public: ArrayDataset, *, num_classes: int) -> None:  # noqa: ANN001
    """Write the public transfer set (inputs and ids; its labels stay with the server)."""
    np.savez(path, x=public.x, ids=public.ids, num_classes=np.int64(num_classes))


def save_site_file(path, data: ClientData, *, partition_id: int) -> None:  # noqa: ANN001
    """Write one site's private train / validation / local test split."""
    arrays = {"partition_id": np.int64(partition_id)}
    for part in SPLIT_PARTS:
        ds = getattr(data, part)
        arrays.update({f"{part}_x": ds.x, f"{part}_y": ds.y, f"{part}_ids": ds.ids})
    np.savez(path, **arrays)


def _open_npz(path, what: str) -> dict[str, np.ndarray]:  # noqa: ANN001
    from pathlib import Path

    path = Path(path).expanduser()
    if not path.is_file():
        raise SiteDataError(f"{what} file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except Exception as err:  # noqa: BLE001  zip/format errors: one clear message
        raise SiteDataError(f"{what} file {path} is not a readable .npz archive ({err})") from None


def load_public_file(path) -> tuple[ArrayDataset, int]:  # noqa: ANN001
    """The public transfer set from :func:`save_public_file`: ``(public, num_classes)``
    (labels are unknown on a site: -1)."""
    arrays = _open_npz(path, "public set")
    missing = sorted({"x", "ids", "num_classes"} - set(arrays))
    if missing:
        raise SiteDataError(f"public set file {path} lacks {', '.join(missing)}")
    x, ids = arrays["x"], arrays["ids"].astype(np.int64)
    x = x.astype(np.float32 if x.dtype.kind == "f" else np.int64)  # features | token ids
    if x.ndim < 2 or ids.shape != (len(x),):
        raise SiteDataError(f"public set file {path}: x {x.shape} and ids {ids.shape} do not match")
    return ArrayDataset(x, np.full(len(x), -1, dtype=np.int64), ids), int(arrays["num_classes"])


def load_site_file(
    path,  # noqa: ANN001
    *,
    partition_id: int,
    num_classes: int,
    input_shape: tuple[int, ...],
    val_fraction: float = 0.1,
    local_test_fraction: float = 0.2,
    seed: int = 0,
) -> ClientData:
    """A site's private data from ``path`` (see the section comment for the two layouts),
    checked against the federation: input shape, labels in ``0..num_classes-1`` and, when
    the file says so, the partition id."""
    arrays = _open_npz(path, "site data")
    if "partition_id" in arrays and int(arrays["partition_id"]) != partition_id:
        raise SiteDataError(
            f"site data file {path} holds partition {int(arrays['partition_id'])}, "
            f"but this site's node config says partition-id={partition_id}"
        )
    if all(f"{part}_{k}" in arrays for part in SPLIT_PARTS for k in ("x", "y")):
        parts = {}
        for part in SPLIT_PARTS:
            x, y = arrays[f"{part}_x"], arrays[f"{part}_y"]
            ids = arrays.get(f"{part}_ids", np.arange(len(y)))
            parts[part] = _checked(path, part, x, y, ids, num_classes, input_shape)
        return ClientData(parts["train"], parts["val"], parts["test"])
    if "x" in arrays and "y" in arrays:
        own = _checked(path, "x/y", arrays["x"], arrays["y"], arrays.get("ids", np.arange(len(arrays["y"]))),
                       num_classes, input_shape)
        positions = np.arange(len(own))
        rest, test = _split(positions, own.y, local_test_fraction, seed)
        train, val = _split(rest, own.y, val_fraction / (1 - local_test_fraction), seed)
        return ClientData(own.subset(train), own.subset(val), own.subset(test))
    raise SiteDataError(
        f"site data file {path} must hold x and y (the site's records), or "
        f"train_x/train_y, val_x/val_y, test_x/test_y; it has {', '.join(sorted(arrays)) or 'nothing'}"
    )


def _checked(path, part, x, y, ids, num_classes, input_shape) -> ArrayDataset:  # noqa: ANN001
    where = f"site data file {path} ({part})"
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "iu":
        raise SiteDataError(f"{where}: x must be numeric and y integer; got {x.dtype} and {y.dtype}")
    if tuple(x.shape[1:]) != tuple(input_shape) or y.shape != (len(x),) or len(ids) != len(x):
        raise SiteDataError(
            f"{where}: inputs must have shape [n, {', '.join(map(str, input_shape))}] like the "
            f"public set, with one label and id each; got x {x.shape}, y {y.shape}, ids {np.shape(ids)}"
        )
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise SiteDataError(f"{where}: labels must be in 0..{num_classes - 1}; got {y.min()}..{y.max()}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise SiteDataError(f"{where}: x holds non-finite values")
    x = x.astype(np.float32 if x.dtype.kind == "f" else np.int64, copy=False)  # features | token ids
    return ArrayDataset(x, y.astype(np.int64), np.asarray(ids, np.int64))


def site_view(
    *, public: ArrayDataset, client: int, data: ClientData, num_classes: int, text: TextVocab | None = None
) -> FederatedSplit:
    """What one site holds: the public set and its own share (``clients`` maps only its
    own partition id; there is no global test set on a site)."""
    empty = ArrayDataset(public.x[:0], np.zeros(0, np.int64), np.zeros(0, np.int64))
    return FederatedSplit(
        public=public,
        test=empty,
        clients={client: data},  # type: ignore[arg-type]
        num_classes=num_classes,
        input_shape=tuple(public.x.shape[1:]),
        text=text,
    )
