"""Site-local data files: what a site host of a deployment reads instead of the split.

In a deployment each site keeps its own data on its own host. Two small .npz files
carry what a site needs, so a site host never holds the other sites' data:

* the public transfer set  (``x`` [P, *input_shape], ``ids`` [P], ``num_classes``), the
  same file on every host; its fingerprint (ordered ids) must equal the server's;
* the site's private data  (``train_x/y/ids``, ``val_x/y/ids``, ``test_x/y/ids``, as
  ``fedkd deploy export-partitions`` writes them from the embedded split, or just
  ``x`` and ``y`` of the site's own records, which are then split into train /
  validation / local test with the run's ``data.*-fraction`` settings).

:func:`site_view` turns what a site read into the :class:`FederatedSplit` a site runs on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedkd.data.splits import SPLIT_PARTS, ArrayDataset, ClientData, FederatedSplit, SiteDataError, _split

if TYPE_CHECKING:
    from fedkd.data.text import TextVocab


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
    """A site's private data from ``path`` (see the module docstring for the two layouts),
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
