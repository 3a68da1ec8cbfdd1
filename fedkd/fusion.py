"""Knowledge fusion: personalised (KnFu-style) and the baselines, on arrays.

Shapes: ``knowledge`` is ``[N, P, C]`` (N responding clients, P public examples,
C classes; rows are probability vectors). Results are the fused knowledge
``[N, P, C]`` (row i is F_i, sent to client i only) and the weight matrix ``[N, N]``
(row i: how much of each client's knowledge went into F_i).

Methods (looked up by name in :data:`FUSION_METHODS`):

* ``none``  -- no exchange (local training only); weights are the identity.
* ``mean``  -- FedMD: F_i = (1/N) sum_j K_j for every i.
* ``era``   -- DS-FL entropy reduction aggregation: F_i = softmax(mean_j K_j / T_era).
* ``knfu``  -- effective neighbours (KnFu, Seyedmohammadi et al. 2024):
  d_ij from :func:`effectiveness_matrix`; N(i) = {i} plus the clients with
  d_ij <= tau_i (tau_i = median of row i by default), capped at ``max_neighbours``
  members (self included) by smallest d_ij; w_ij = exp(-beta d_ij) / sum_{l in N(i)}
  exp(-beta d_il); F_i(x) = sum_{j in N(i)} w_ij K_j(x).

Every method drops ineffective rows first: where K_j(x) has entropy above
``uniform_entropy * log C`` it is left out of F_i(x) (and the remaining weights are
renormalised). ``sharpen_temperature > 0`` applies softmax(F / T) afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedkd.registry import Registry

_EPS = 1e-12


# ----------------------------------------------------------------- simplex helpers


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats, H(p) = -sum p log p."""
    return -(p * np.log(np.clip(p, _EPS, None))).sum(axis=axis)


def kl_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """KL(p || q) = sum p log(p / q), in nats (q clipped away from 0)."""
    p = np.clip(p, 0.0, None)
    return (p * (np.log(np.clip(p, _EPS, None)) - np.log(np.clip(q, _EPS, None)))).sum(axis=axis)


def js_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """Jensen-Shannon divergence, JS = KL(p||m)/2 + KL(q||m)/2 with m = (p+q)/2; in [0, ln 2]."""
    m = 0.5 * (p + q)
    return 0.5 * kl_divergence(p, m, axis) + 0.5 * kl_divergence(q, m, axis)


DIVERGENCES: dict[str, Callable[..., np.ndarray]] = {"js": js_divergence, "kl": kl_divergence}


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(p / T) row-wise, as DS-FL's ERA (T < 1 lowers the entropy)."""
    return softmax(probs / temperature, axis=-1)


def estimated_distribution(knowledge: np.ndarray) -> np.ndarray:
    """EPD_j = mean_x K_j(x): ``[N, P, C] -> [N, C]``, what a client's knowledge says about its label mix."""
    return knowledge.mean(axis=-2)


def informative_rows(knowledge: np.ndarray, uniform_entropy: float) -> np.ndarray:
    """``[N, P]`` mask, False where H(K_j(x)) > uniform_entropy * log C (near uniform)."""
    num_classes = knowledge.shape[-1]
    return entropy(knowledge) <= uniform_entropy * np.log(num_classes)


# ----------------------------------------------------------------- effectiveness


def effectiveness_matrix(
    knowledge: np.ndarray,
    *,
    measure: str = "agreement",
    divergence: str = "js",
    confident_fraction: float = 0.5,
) -> np.ndarray:
    """Divergence d_ij >= 0 of client j from client i (small = effective for i), ``[N, N]``.

    * ``epd``: d_ij = D(EPD_i, EPD_j), D = JS or KL (``divergence``): neighbours by label mix.
    * ``agreement``: d_ij = mean_{x in S_i} JS(K_i(x), K_j(x)), S_i = the
      ``confident_fraction`` of P where client i's max probability is highest: j is
      effective for i when it agrees with i where i knows the answer.
    """
    if measure == "epd":
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence '{divergence}'; choose one of: js, kl")
        epd = estimated_distribution(knowledge)
        return DIVERGENCES[divergence](epd[:, None, :], epd[None, :, :])
    if measure == "agreement":
        n, p, _ = knowledge.shape
        keep = max(1, int(round(confident_fraction * p)))
        confidence = knowledge.max(axis=-1)  # [N, P]
        d = np.empty((n, n))
        for i in range(n):
            confident = np.argsort(-confidence[i], kind="stable")[:keep]
            own = knowledge[i, confident]  # [S, C]
            d[i] = js_divergence(own[None], knowledge[:, confident]).mean(axis=-1)
        return d
    raise ValueError(f"unknown effectiveness measure '{measure}'; choose one of: agreement, epd")


def neighbour_weights(
    divergences: np.ndarray,
    *,
    beta: float = 10.0,
    threshold: float | str = "median",
    max_neighbours: int = 10,
) -> np.ndarray:
    """Row-stochastic neighbour weights ``[N, N]`` from divergences d ``[N, N]``.

    N(i) = {i} ∪ {j != i : d_ij <= tau_i}, keeping the ``max_neighbours - 1`` others with
    smallest d_ij (ties by index); tau_i is the median of {d_ij : j != i} when
    ``threshold == "median"``, else the number given. Weights are
    w_ij = exp(-beta d_ij) / sum_{l in N(i)} exp(-beta d_il) on N(i), 0 elsewhere.
    """
    n = divergences.shape[0]
    if isinstance(threshold, str) and threshold != "median":
        raise ValueError(f"threshold must be 'median' or a number; got {threshold!r}")
    if divergences.shape != (n, n):
        raise ValueError(f"divergences must be square; got shape {divergences.shape}")
    if max_neighbours < 1:
        raise ValueError(f"max_neighbours must be >= 1; got {max_neighbours}")
    weights = np.zeros((n, n))
    for i in range(n):
        others = np.delete(np.arange(n), i)
        d_others = divergences[i, others]
        tau = np.median(d_others) if threshold == "median" and n > 1 else threshold
        if n > 1:
            candidates = others[d_others <= tau]
            candidates = candidates[np.argsort(divergences[i, candidates], kind="stable")]
            members = np.concatenate([[i], candidates[: max_neighbours - 1]])
        else:
            members = np.array([i])
        d = divergences[i, members]
        w = np.exp(-beta * (d - d.min()))  # shift for stability; cancels on normalising
        weights[i, members] = w / w.sum()
    return weights


def weighted_fusion(knowledge: np.ndarray, weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """F_i(x) = sum_j w_ij m_j(x) K_j(x) / sum_j w_ij m_j(x), ``[N, P, C]``.

    ``mask`` [N, P] drops ineffective rows; where every neighbour's row at x is dropped,
    F_i(x) falls back to the unmasked weighted mean. Only nonzero weights are touched, so
    the cost is O(N k P C) for neighbour sets of size k.
    """
    n, p, c = knowledge.shape
    fused = np.empty((weights.shape[0], p, c), dtype=np.float64)
    for i in range(weights.shape[0]):
        members = np.flatnonzero(weights[i])
        w = weights[i, members][:, None] * mask[members]  # [k, P]
        total = w.sum(axis=0)  # [P]
        empty = total <= 0
        if empty.any():
            w[:, empty] = weights[i, members][:, None]
            total = w.sum(axis=0)
        fused[i] = np.einsum("kp,kpc->pc", w / total, knowledge[members])
    return fused


# ----------------------------------------------------------------- methods


@dataclass(frozen=True)
class FusionResult:
    """``fused`` [N, P, C] (None for ``none``) and ``weights`` [N, N]."""

    fused: np.ndarray | None
    weights: np.ndarray


FusionMethod = Callable[..., FusionResult]
FUSION_METHODS: Registry[FusionMethod] = Registry("fusion method")


@FUSION_METHODS.register("none")
def _fuse_none(knowledge: np.ndarray, mask: np.ndarray, **_: Any) -> FusionResult:
    return FusionResult(None, np.eye(knowledge.shape[0]))


@FUSION_METHODS.register("mean")
def _fuse_mean(knowledge: np.ndarray, mask: np.ndarray, **_: Any) -> FusionResult:
    n = knowledge.shape[0]
    weights = np.full((n, n), 1.0 / n)
    return FusionResult(weighted_fusion(knowledge, weights, mask), weights)


@FUSION_METHODS.register("era")
def _fuse_era(
    knowledge: np.ndarray, mask: np.ndarray, *, era_temperature: float = 0.1, **_: Any
) -> FusionResult:
    result = _fuse_mean(knowledge, mask)
    return FusionResult(sharpen(result.fused, era_temperature), result.weights)


@FUSION_METHODS.register("knfu")
def _fuse_knfu(
    knowledge: np.ndarray,
    mask: np.ndarray,
    *,
    measure: str = "agreement",
    divergence: str = "js",
    confident_fraction: float = 0.5,
    beta: float = 10.0,
    threshold: float | str = "median",
    max_neighbours: int = 10,
    **_: Any,
) -> FusionResult:
    d = effectiveness_matrix(
        knowledge, measure=measure, divergence=divergence, confident_fraction=confident_fraction
    )
    weights = neighbour_weights(d, beta=beta, threshold=threshold, max_neighbours=max_neighbours)
    return FusionResult(weighted_fusion(knowledge, weights, mask), weights)


FUSION_PARAMETERS = frozenset(
    {"measure", "divergence", "confident_fraction", "beta", "threshold", "max_neighbours", "era_temperature"}
)
"""Method parameters :func:`fuse` passes on (each method reads the ones it uses)."""


def fuse(
    *,
    knowledge: np.ndarray,
    method: str = "knfu",
    uniform_entropy: float = 0.95,
    sharpen_temperature: float = 0.0,
    **params: Any,
) -> FusionResult:
    """Fuse ``knowledge`` [N, P, C] with ``method`` (see module doc for the formulas).

    Extra keyword arguments go to the method (``beta``, ``threshold``, ``measure``, ...).
    """
    unknown = set(params) - FUSION_PARAMETERS
    if unknown:
        raise TypeError(
            f"unknown fusion parameter(s) {sorted(unknown)}; known: {sorted(FUSION_PARAMETERS)}"
        )
    knowledge = np.asarray(knowledge, dtype=np.float64)
    if knowledge.ndim != 3 or knowledge.shape[0] == 0:
        raise ValueError(f"knowledge must have shape [N>0, P, C]; got {knowledge.shape}")
    mask = informative_rows(knowledge, uniform_entropy)
    result = FUSION_METHODS.get(method)(knowledge, mask, **params)
    if result.fused is not None and sharpen_temperature > 0:
        result = FusionResult(sharpen(result.fused, sharpen_temperature), result.weights)
    return result
