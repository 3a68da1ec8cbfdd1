"""Your own data: CSV files, ``x``/``y`` ``.npz`` files and ``datasets.save_to_disk`` folders.

``data.path`` names the file or folder; :func:`read_own_data` reads it by its kind:

* ``*.csv``: a header row, then one example a row. The label column is
  ``data.label-column`` (default: the first of ``label``, ``target``, ``class``, ``y``, else
  the last column); the features are ``data.feature-columns`` (default: every other
  column), which must be numeric.
* ``*.npz``: arrays ``x`` ``[n, ...]`` and ``y`` ``[n]`` (what ``fedkd deploy
  export-partitions`` writes for a site, and ``np.savez(path, x=x, y=y)``).
* a folder: a ``datasets.save_to_disk`` copy (a ``Dataset`` or a ``DatasetDict``, whose
  splits are pooled). Label as for CSV; features: ``data.feature-columns``, else an image
  column (``image``, ``img``, ``pixel_values``), else every other numeric column.

Labels that are non-negative integers are kept (``num_classes = max + 1``); any other labels
(strings, floats) are numbered in sorted order. Features are float32; they are divided by
255 only when they are images (:func:`scale_features`). Tabular features can be
standardised on the federation's split (``data.standardize``, :func:`standardize_split`),
never fitted on test data.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.data.splits import SPLIT_PARTS, ArrayDataset, ClientData, DataUnavailableError, FederatedSplit

LABEL_NAMES = ("label", "labels", "target", "class", "y")
IMAGE_NAMES = ("image", "img", "pixel_values")


def read_own_data(
    path: str, *, label_column: str = "", feature_columns: str = "", image_column: str = ""
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(x float32 [n, ...], y int64 [n], num_classes)`` from the file or folder at ``path``
    (see the module doc). ``image_column``: a named dataset's image column, tried first."""
    where = Path(path).expanduser()
    if not where.exists():
        raise DataUnavailableError(
            f"data.path: no file or folder at '{path}' (data.dataset 'file' reads a .csv file, an .npz "
            "file with arrays x and y, or a datasets.save_to_disk folder)")
    features = [c.strip() for c in feature_columns.split(",") if c.strip()]
    if where.is_dir():
        x, labels = _read_saved_dataset(where, label_column=label_column, features=features,
                                        image_column=image_column)
    elif where.suffix.lower() == ".csv":
        x, labels = _read_csv(where, label_column=label_column, features=features)
    elif where.suffix.lower() == ".npz":
        x, labels = _read_npz(where)
    else:
        raise DataUnavailableError(
            f"data.path: '{path}' is neither a .csv file, an .npz file nor a datasets.save_to_disk folder")
    if len(x) != len(labels) or len(x) == 0:
        raise DataUnavailableError(f"data.path '{path}': {len(x)} examples and {len(labels)} labels")
    y, num_classes = encode_labels(labels)
    x = scale_features(x)
    if not np.isfinite(x).all():
        raise DataUnavailableError(f"data.path '{path}': the features hold missing or non-finite values")
    return x, y, num_classes


def encode_labels(labels: Any) -> tuple[np.ndarray, int]:
    """Labels as int64 class ids and the number of classes: non-negative integers are kept
    (``max + 1`` classes); anything else (strings, floats) is numbered in sorted order.

    >>> encode_labels(np.array([2, 0, 2]))[0].tolist(), encode_labels(["b", "a", "b"])
    ([2, 0, 2], (array([1, 0, 1]), 2))
    """
    values = np.asarray(labels)
    if values.dtype.kind in "iu" and (values.size == 0 or values.min() >= 0):
        y = values.astype(np.int64)
        return y, int(y.max()) + 1 if y.size else 0
    if values.dtype.kind == "f" and np.isfinite(values).all() and (values == np.round(values)).all() \
            and values.min() >= 0:
        y = values.astype(np.int64)
        return y, int(y.max()) + 1
    classes, y = np.unique(values.astype(str), return_inverse=True)
    return y.astype(np.int64), len(classes)


def is_image_like(x: np.ndarray) -> bool:
    """uint8 features, or features with more than one axis per example ([n, H, W], [n, C, H, W])."""
    return x.dtype == np.uint8 or x.ndim >= 3


def scale_features(x: np.ndarray) -> np.ndarray:
    """float32 features; images (:func:`is_image_like`) with values above 1 are divided by 255,
    tabular features are left as they are (standardise them with ``data.standardize``).

    >>> scale_features(np.array([[0, 255]], dtype=np.uint8)).tolist(), scale_features(np.array([[300.0]])).tolist()
    ([[0.0, 1.0]], [[300.0]])
    """
    image = is_image_like(x)
    x = np.asarray(x, dtype=np.float32)
    if image and x.size and x.max() > 1.0:
        x = x / 255.0
    return x


def _label_name(columns: list[str], label_column: str, where: Path) -> str:
    if label_column:
        if label_column not in columns:
            raise DataUnavailableError(
                f"data.label-column: '{label_column}' is not a column of {where}; columns: {', '.join(columns)}")
        return label_column
    lowered = {c.lower(): c for c in columns}
    return next((lowered[n] for n in LABEL_NAMES if n in lowered), columns[-1])


def _read_csv(path: Path, *, label_column: str, features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise DataUnavailableError(f"data.path '{path}': a CSV file needs a header row and at least one example")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    label = _label_name(header, label_column, path)
    missing = [c for c in features if c not in header]
    if missing:
        raise DataUnavailableError(
            f"data.feature-columns: {', '.join(missing)} not in {path}; columns: {', '.join(header)}")
    chosen = features or [c for c in header if c != label]
    columns = {name: i for i, name in enumerate(header)}
    x = np.empty((len(body), len(chosen)), dtype=np.float32)
    for r, row in enumerate(body):
        if len(row) != len(header):
            raise DataUnavailableError(f"data.path '{path}': row {r + 2} has {len(row)} fields, the header {len(header)}")
        for j, name in enumerate(chosen):
            try:
                x[r, j] = float(row[columns[name]])
            except ValueError:
                raise DataUnavailableError(
                    f"data.path '{path}': column '{name}' is not numeric (row {r + 2}: {row[columns[name]]!r}); "
                    "name the feature columns with data.feature-columns") from None
    labels = [row[columns[label]].strip() for row in body]
    try:
        numeric = np.asarray([float(v) for v in labels])
        labels_out: Any = numeric.astype(np.int64) if (numeric == np.round(numeric)).all() else np.asarray(labels)
    except ValueError:
        labels_out = np.asarray(labels)
    return x, labels_out


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as err:  # noqa: BLE001  zip/format errors: one clear message
        raise DataUnavailableError(f"data.path '{path}' is not a readable .npz archive ({err})") from None
    if "x" in arrays and "y" in arrays:
        return arrays["x"], arrays["y"]
    parts = [p for p in SPLIT_PARTS if f"{p}_x" in arrays and f"{p}_y" in arrays]
    if parts:  # a site file of `fedkd deploy export-partitions`: its parts pooled
        return (np.concatenate([arrays[f"{p}_x"] for p in parts]),
                np.concatenate([arrays[f"{p}_y"] for p in parts]))
    raise DataUnavailableError(
        f"data.path '{path}': an .npz file needs arrays x and y; it has {', '.join(sorted(arrays)) or 'none'}")


def _read_saved_dataset(path: Path, *, label_column: str, features: list[str],
                        image_column: str) -> tuple[np.ndarray, np.ndarray]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001  not a save_to_disk folder: one clear message
        raise DataUnavailableError(
            f"data.path '{path}' is a folder but not a datasets.save_to_disk copy ({type(err).__name__})") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.concatenate_datasets(list(loaded.values()))
    return dataset_arrays(loaded, label_column=label_column, features=features, image_column=image_column,
                          where=path)


def dataset_arrays(loaded: Any, *, label_column: str = "", features: list[str] | None = None,
                   image_column: str = "", where: Any = "the dataset") -> tuple[np.ndarray, np.ndarray]:
    """``(x, labels)`` of a ``datasets.Dataset``: the label column and the feature columns
    as the module doc says (one image/array column, or numeric scalar columns side by side)."""
    columns = list(loaded.column_names)
    label = _label_name(columns, label_column, where)
    features = list(features or [])
    missing = [c for c in features if c not in columns]
    if missing:
        raise DataUnavailableError(
            f"data.feature-columns: {', '.join(missing)} not in {where}; columns: {', '.join(columns)}")
    if not features:
        images = [c for c in (image_column, *IMAGE_NAMES) if c and c in columns]
        features = images[:1] or [c for c in columns if c != label and _is_numeric_scalar(loaded, c)]
    if not features:
        raise DataUnavailableError(
            f"{where}: no numeric feature columns; name them with data.feature-columns (columns: {', '.join(columns)})")
    if len(features) == 1 and not _is_numeric_scalar(loaded, features[0]):
        x = np.stack([np.asarray(v) for v in loaded[features[0]]])
        if x.ndim == 4 and x.shape[-1] in (1, 3, 4):  # HWC -> CHW
            x = x.transpose(0, 3, 1, 2)
    else:
        x = np.stack([np.asarray(loaded[c], dtype=np.float32) for c in features], axis=1)
    return x, np.asarray(loaded[label])


def _is_numeric_scalar(loaded: Any, column: str) -> bool:
    feature = loaded.features[column]
    dtype = getattr(feature, "dtype", "")
    return type(feature).__name__ in ("Value", "ClassLabel") and (
        dtype.startswith(("int", "uint", "float", "bool")) or type(feature).__name__ == "ClassLabel")


# ------------------------------------------------------------------ standardisation


def standardize_split(split: FederatedSplit, *, fit_on: str) -> FederatedSplit:
    """Every part of ``split`` with each feature centred and scaled: x' = (x - mean) / std,
    the mean and std fitted on the public set (``fit_on="public"``: labels hidden, shared by
    everyone) or on the private training parts the split holds, pooled (``"private"``:
    every site's in a simulation; on a site that reads its own files
    (:func:`fedkd.data.site_view`), its own only), never on a test or validation part.
    Features with std 0 are only centred."""
    clients = split.clients
    held = list(clients.values()) if isinstance(clients, dict) else list(clients)
    if fit_on == "public":
        fit = split.public.x
    elif fit_on == "private":
        fit = np.concatenate([client.train.x for client in held])
    else:
        raise ValueError(f"data.standardize: must be one of none, public, private; got {fit_on!r}")
    flat = fit.reshape(len(fit), -1).astype(np.float64)
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    std[std == 0] = 1.0

    def scaled(part: ArrayDataset) -> ArrayDataset:
        if len(part.x) == 0:
            return dataclasses.replace(part, x=part.x.astype(np.float32))
        x = ((part.x.reshape(len(part.x), -1) - mean) / std).astype(np.float32).reshape(part.x.shape)
        return dataclasses.replace(part, x=x)

    def scaled_client(client: ClientData) -> ClientData:
        return dataclasses.replace(client, **{name: scaled(getattr(client, name)) for name in SPLIT_PARTS})

    if isinstance(clients, dict):
        new_clients = {key: scaled_client(client) for key, client in clients.items()}
    else:
        new_clients = tuple(scaled_client(client) for client in clients)
    return dataclasses.replace(split, public=scaled(split.public), test=scaled(split.test), clients=new_clients)
