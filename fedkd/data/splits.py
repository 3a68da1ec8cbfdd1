"""The federated split: datasets as arrays, the partition over clients, the public set.

A federation's data is split once, from the seed, into

* the *public transfer set* P (inputs shared by every site and the server; its labels
  are kept only for audits and benchmarks and never reach fusion),
* a *global test set* (for the optional global student),
* the private *client pool*, partitioned across clients with a ``flwr_datasets``
  partitioner (Dirichlet label skew, pathological k-classes-per-client, or IID); each
  client's share is split into train / validation / local test, stratified where the
  share allows it, so a local test set follows the client's own label mix.

Every process (server, each client) rebuilds the same split from the same config, so
nothing but knowledge ever crosses the network. This module holds the split's types
(:class:`ArrayDataset`, :class:`ClientData`, :class:`FederatedSplit`), the partitioning
(:func:`partition_indices`, :func:`split_federation`), the public set's fingerprint and
the data errors; where the arrays come from is :mod:`fedkd.data.sources`.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np


if TYPE_CHECKING:
    from fedkd.data.text import TextVocab


class DataUnavailableError(RuntimeError):
    """A named dataset could not be loaded (usually: offline, no local copy)."""


class SiteDataError(ValueError):
    """A site's local data file is missing, unreadable or does not fit the federation."""


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


SPLIT_PARTS = ("train", "val", "test")


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
        """sha256 of the ordered public example ids and their inputs: sites must agree on it."""
        return public_fingerprint(self.public.ids, self.public.x)


def public_fingerprint(ids: np.ndarray, x: np.ndarray | None = None) -> str:
    """sha256 of the ordered public ids (int64 bytes) and, given ``x``, of the inputs too:
    their shape and their bytes as float32 (features) or int64 (token ids), the dtypes every
    site loads them as. Ids alone would let a public set with the right ids but NaN, zeroed
    or altered inputs pass the check. Without ``x``: the ids only (older fingerprints)."""
    digest = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes())
    if x is not None:
        x = np.asarray(x)
        x = np.ascontiguousarray(x.astype(np.float32 if x.dtype.kind == "f" else np.int64, copy=False))
        digest.update(repr(tuple(int(n) for n in x.shape)).encode())
        digest.update(x.tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------- the transfer set

TRANSFER_COPY_ID = -(2**40)
"""Jittered public copies (:func:`augment_public`) carry ids at and below this one, so they
collide neither with dataset ids (>= 0) nor with the audit's inserted secrets (small negatives)."""


def augment_public(public: ArrayDataset, *, copies: int, jitter: float, seed: int) -> ArrayDataset:
    """The transfer set: the public set followed by ``copies`` jittered copies of it,
    copy m of example j being x_j + ``jitter`` * s * z_{m,j}, z ~ N(0, I), with s the
    per-feature standard deviation of the public set (features of std 0 are copied as
    they are); labels are the source's (kept for audits and benchmarks only, as the public
    labels are) and ids count down from :data:`TRANSFER_COPY_ID`.

    Why: a site's knowledge reaches the others only through the transfer points, so a
    small public set caps what distillation can carry (on a 20-class
    ``make_classification`` file, 600 public examples labelled *correctly* plus a site's
    own 200 train an MLP to 0.46, against 0.61-0.70 for 2,000-3,000 pooled examples:
    docs/benchmarks.md). Augmenting the transfer set is common practice in distillation
    (Wang et al., "What makes a 'good' data augmentation in knowledge distillation - a
    statistical perspective", NeurIPS 2022); Gaussian jitter is the augmentation that needs
    no knowledge of the inputs' structure (tabular or image). They are built from public inputs
    alone, so they cost no privacy; every process draws the same copies from the run's
    ``seed`` (float32 inputs in, float32 out, so sites reading the public set from a file
    and the server agree bit for bit, which the public fingerprint checks)."""
    if copies < 0 or not np.isfinite(jitter) or jitter < 0:
        raise ValueError(f"data.public-copies must be >= 0 and data.public-jitter >= 0; got {copies}, {jitter}")
    if copies == 0 or len(public) == 0:
        return public
    if np.asarray(public.x).dtype.kind != "f":
        raise ValueError(f"data.public-copies: jittered copies need float features; the public set holds "
                         f"{np.asarray(public.x).dtype} inputs (token ids?); set data.public-copies = 0")
    x = np.asarray(public.x, dtype=np.float32).astype(np.float64)
    n = len(x)
    flat = x.reshape(n, -1)
    scale = jitter * flat.std(axis=0)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7472616E]))  # "tran"
    noise = rng.standard_normal((copies, n, flat.shape[1])) * scale
    jittered = (flat[None] + noise).reshape(copies * n, *x.shape[1:])
    return ArrayDataset(
        x=np.concatenate([x, jittered]).astype(np.float32),
        y=np.concatenate([np.asarray(public.y)] * (copies + 1)),
        ids=np.concatenate([np.asarray(public.ids, dtype=np.int64),
                            TRANSFER_COPY_ID - np.arange(copies * n, dtype=np.int64)]),
    )


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
