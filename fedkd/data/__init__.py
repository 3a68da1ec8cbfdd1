"""Data: the embedded default, named datasets, and the federated split.

One home per concern, re-exported here (``from fedkd.data import load_federation``):

* :mod:`fedkd.data.splits`: :class:`ArrayDataset`, :class:`ClientData`,
  :class:`FederatedSplit`, :func:`partition_indices`, :func:`split_federation`,
  :func:`public_fingerprint`, and the errors :class:`DataUnavailableError` and
  :class:`SiteDataError`;
* :mod:`fedkd.data.sources`: the embedded and named datasets (:func:`load_source`,
  the generated :func:`synthetic_source` and its :class:`SyntheticSpec`,
  Hugging Face image and text datasets), :func:`load_federation` and the on-disk split
  cache (:func:`split_cache_path`);
* :mod:`fedkd.data.files`: the public / site ``.npz`` files of a deployment
  (:func:`save_public_file`, :func:`save_site_file`, :func:`load_public_file`,
  :func:`load_site_file`, :func:`site_view`);
* :mod:`fedkd.data.text`: the tokenizer (:func:`~fedkd.data.text.tokenize`,
  :func:`~fedkd.data.text.vocab_info`), the generated topic corpus and
  :func:`~fedkd.data.text.is_text_dataset` (import them from there).

Nothing here imports :mod:`fedkd.models`.
"""

from __future__ import annotations

from fedkd.data.files import load_public_file, load_site_file, save_public_file, save_site_file, site_view
from fedkd.data.sources import (
    SPLIT_CACHE_ENV,
    SyntheticSpec,
    load_federation,
    load_source,
    split_cache_path,
    synthetic_source,
    transfer_set,
)
from fedkd.data.splits import (
    SPLIT_PARTS,
    ArrayDataset,
    ClientData,
    DataUnavailableError,
    FederatedSplit,
    SiteDataError,
    augment_public,
    partition_indices,
    public_fingerprint,
    split_federation,
)

__all__ = [
    "SPLIT_CACHE_ENV",
    "SPLIT_PARTS",
    "ArrayDataset",
    "ClientData",
    "DataUnavailableError",
    "FederatedSplit",
    "SiteDataError",
    "SyntheticSpec",
    "augment_public",
    "load_federation",
    "load_public_file",
    "load_site_file",
    "load_source",
    "partition_indices",
    "public_fingerprint",
    "save_public_file",
    "save_site_file",
    "site_view",
    "split_cache_path",
    "split_federation",
    "transfer_set",
    "synthetic_source",
]
