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
  d_ij from :func:`effectiveness_matrix` (divergence squared Hellinger, JS or KL); N(i) = {i} plus the clients with
  d_ij <= tau_i (tau_i = median of row i by default), capped at ``max_neighbours``
  members (self included) by smallest d_ij; w_ij = exp(-beta d_ij) / sum_{l in N(i)}
  exp(-beta d_il); F_i(x) = sum_{j in N(i)} w_ij K_j(x).
* ``expert`` -- class-expert, prior-corrected fusion (:func:`class_expert_fusion`), each
  class holder weighted by the receiver's check of it (:func:`verified_trust`; or, with
  ``trust = "claimed"``, by the check of the classes the holder claims by the receiver and
  the senders it has verified, :func:`claimed_trust`), with a per-receiver consensus over
  the senders it trusts (:func:`trusted_consensus`).

Every method drops ineffective rows first: where K_j(x) has entropy above
``uniform_entropy * log C`` it is left out of F_i(x) (and the remaining weights are
renormalised). ``sharpen_temperature > 0`` applies softmax(F / T) afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedkd.plugins import is_plugin_path, load_plugin
from fedkd.registry import Registry

_EPS = 1e-12
_ROW_BLOCK = 256  # rows of an [N, N, ...] computation held in memory at once
_PAIR_BLOCK = 2**20  # elements of one [clients, S, C] block in the agreement measure (JS)
_SPARSE_NEIGHBOURS = 64  # weighted fusion batches receivers with at most this many neighbours
_FUSION_BLOCK = 2**18  # elements of [receivers, neighbours, P, C] per block of weighted fusion


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


def hellinger_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """Squared Hellinger distance h^2 = (1/2) sum (sqrt p - sqrt q)^2, in [0, 1].

    On probability vectors ln(2) h^2 <= JS <= h^2 (element by element: JS and h^2 are both
    sums of b f(a/b) terms whose ratio lies in [ln 2, 1]), so it ranks neighbours much as JS
    does. Unlike JS it splits into h^2 = (sum p + sum q)/2 - sum sqrt(p) sqrt(q): for many
    pairs at once the only pairwise term is a matrix product (see the ``agreement`` measure).
    """
    root_p, root_q = np.sqrt(np.clip(p, 0.0, None)), np.sqrt(np.clip(q, 0.0, None))
    return 0.5 * ((root_p - root_q) ** 2).sum(axis=axis)


DIVERGENCES: dict[str, Callable[..., np.ndarray]] = {
    "js": js_divergence,
    "kl": kl_divergence,
    "hellinger": hellinger_divergence,
}


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(p / T) row-wise, as DS-FL's ERA (T < 1 lowers the entropy)."""
    return softmax(probs / temperature, axis=-1)


def simplex_projection(values: np.ndarray) -> np.ndarray:
    """Each row of ``values`` [..., C] projected (Euclidean) onto the probability simplex:
    max(v - theta, 0) with theta the one shift that makes the row sum to 1 (Duchi et al. 2008).
    A row v + k (any k) whose entries would all stay positive becomes exactly v + k', sum 1."""
    v = np.asarray(values, dtype=np.float64)
    u = -np.sort(-v, axis=-1)
    cumulative = np.cumsum(u, axis=-1) - 1.0
    index = np.arange(1, v.shape[-1] + 1)
    support = (u - cumulative / index > 0).sum(axis=-1, keepdims=True)  # rho >= 1 always
    theta = np.take_along_axis(cumulative, support - 1, axis=-1) / support
    return np.maximum(v - theta, 0.0)


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
    divergence: str = "hellinger",
    confident_fraction: float = 0.5,
) -> np.ndarray:
    """Divergence d_ij >= 0 of client j from client i (small = effective for i), ``[N, N]``.

    D is ``divergence``: the squared Hellinger distance h^2 (the default), JS or KL(i || j).

    * ``epd``: d_ij = D(EPD_i, EPD_j): neighbours by label mix.
    * ``agreement``: d_ij = mean_{x in S_i} D(K_i(x), K_j(x)), S_i = the
      ``confident_fraction`` of P where client i's max probability is highest: j is
      effective for i when it agrees with i where i knows the answer. With JS this costs
      O(N^2 |S_i| C) logarithms; with KL or h^2 the pairwise part is one matrix product
      (BLAS), which is what lets ``agreement`` fuse thousands of sites in a second.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{divergence}'; choose one of: {', '.join(DIVERGENCES)}")
    if measure == "epd":
        return _epd_divergences(estimated_distribution(knowledge), divergence)
    if measure == "agreement":
        if divergence == "js":
            return _agreement_divergences(knowledge, confident_fraction)
        return _agreement_by_products(knowledge, confident_fraction, divergence)
    raise ValueError(f"unknown effectiveness measure '{measure}'; choose one of: agreement, epd")


def _confident_sets(knowledge: np.ndarray, confident_fraction: float) -> np.ndarray:
    """S_i as indices ``[N, |S|]``: the positions of P with client i's highest max
    probability, most confident first (ties by position)."""
    keep = max(1, int(round(confident_fraction * knowledge.shape[1])))
    confidence = knowledge.max(axis=-1)  # [N, P]
    return np.argsort(-confidence, axis=1, kind="stable")[:, :keep]


def _agreement_by_products(knowledge: np.ndarray, confident_fraction: float, divergence: str) -> np.ndarray:
    """The ``agreement`` measure for KL and h^2, whose pairwise part is a matrix product.

    With M_i(x) = 1 on S_i and p = K_i(x), q = K_j(x) (clipped at 0):

    * h^2: sum_x M_i(x) h^2(p, q) = sum_x M_i (sum p)/2 + sum_x M_i (sum q)/2
      - <M_i sqrt K_i, sqrt K_j>, the inner product over all (x, c);
    * KL: sum_x M_i(x) KL(p || q) = sum_x M_i sum_c p log p - <M_i K_i, log K_j>
      (log of max(q, eps), as :func:`kl_divergence`).

    Equal to the row-by-row definition up to floating-point rounding (tests/test_fusion.py
    checks 1e-12); d_ii is exactly 0 and rounding below 0 is clipped.
    """
    n, p, c = knowledge.shape
    sets = _confident_sets(knowledge, confident_fraction)
    on_s = np.zeros((n, p))
    np.put_along_axis(on_s, sets, 1.0, axis=1)
    clipped = np.clip(knowledge, 0.0, None)
    if divergence == "hellinger":
        roots = np.sqrt(clipped)
        sums = clipped.sum(axis=-1)  # [N, P]
        own = 0.5 * (on_s * sums).sum(axis=1)  # [N]
        others = 0.5 * (on_s @ sums.T)  # [N, N]: sum over S_i of client j's row sums
        cross = (on_s[:, :, None] * roots).reshape(n, -1) @ roots.reshape(n, -1).T
        total = own[:, None] + others - cross
    else:  # kl
        logs = np.log(np.clip(clipped, _EPS, None))
        own = (on_s * (clipped * logs).sum(axis=-1)).sum(axis=1)
        cross = (on_s[:, :, None] * clipped).reshape(n, -1) @ logs.reshape(n, -1).T
        total = own[:, None] - cross
    d = np.maximum(total / sets.shape[1], 0.0)
    np.fill_diagonal(d, 0.0)
    return d


def _epd_divergences(epd: np.ndarray, divergence: str) -> np.ndarray:
    """D(EPD_i, EPD_j) for all pairs, ``[N, C] -> [N, N]``: :func:`js_divergence` or
    :func:`kl_divergence` on ``epd[:, None]`` and ``epd[None]``, in blocks of rows (bounded
    memory) with each log(max(EPD_j, eps)) taken once; the same floating-point operations
    per element, so the same numbers bit for bit. h^2 goes through a matrix product (equal
    up to rounding)."""
    n = len(epd)
    if divergence == "hellinger":
        sums = np.clip(epd, 0.0, None).sum(axis=-1)
        roots = np.sqrt(np.clip(epd, 0.0, None))
        d = np.maximum(0.5 * (sums[:, None] + sums[None]) - roots @ roots.T, 0.0)
        np.fill_diagonal(d, 0.0)
        return d
    clipped = np.clip(epd, 0.0, None)
    logs = np.log(np.clip(clipped, _EPS, None))
    d = np.empty((n, n))
    for start in range(0, n, _ROW_BLOCK):
        stop = min(n, start + _ROW_BLOCK)
        p_clipped, p_log = clipped[start:stop, None], logs[start:stop, None]  # [b, 1, C]
        if divergence == "kl":
            d[start:stop] = (p_clipped * (p_log - logs[None])).sum(axis=-1)
            continue
        # JS is symmetric, bit for bit: m = (p + q) / 2 is the same sum either way round and
        # 0.5 a + 0.5 b = 0.5 b + 0.5 a, so columns >= start suffice; the rest is mirrored
        m = 0.5 * (epd[start:stop, None] + epd[None, start:])  # [b, N - start, C]
        log_m = np.log(np.clip(m, _EPS, None))
        kl_pm = (p_clipped * (p_log - log_m)).sum(axis=-1)
        kl_qm = (clipped[None, start:] * (logs[None, start:] - log_m)).sum(axis=-1)
        d[start:stop, start:] = 0.5 * kl_pm + 0.5 * kl_qm
        d[start:, start:stop] = d[start:stop, start:].T
    return d


def _agreement_divergences(knowledge: np.ndarray, confident_fraction: float) -> np.ndarray:
    """The ``agreement`` measure, d_ij = mean_{x in S_i} JS(K_i(x), K_j(x)).

    Vectorised over j in cache-sized blocks, with log(max(K, eps)) computed once for all
    clients instead of once per pair, so each pair costs one log per (x, c) (that of the
    mixture m) instead of four. Every element goes through the same floating-point
    operations as :func:`js_divergence` applied row by row, so the result is identical,
    bit for bit (tests/test_fusion.py checks it). The cost stays O(N^2 |S_i| C): the
    mixture's log has no shortcut (``divergence="hellinger"`` is the fast alternative).
    """
    n, p, c = knowledge.shape
    order = _confident_sets(knowledge, confident_fraction)
    keep = order.shape[1]
    clipped = np.clip(knowledge, 0.0, None)
    logs = np.log(np.clip(clipped, _EPS, None))
    block = max(1, _PAIR_BLOCK // (keep * c))
    d = np.empty((n, n))
    for i in range(n):
        s = order[i]
        own, own_clipped, own_log = knowledge[i, s][None], clipped[i, s][None], logs[i, s][None]
        for start in range(0, n, block):
            stop = min(n, start + block)
            q = knowledge[start:stop, s]  # [b, S, C]
            m = 0.5 * (own + q)
            log_m = np.log(np.clip(m, _EPS, None))
            kl_pm = (own_clipped * (own_log - log_m)).sum(axis=-1)
            kl_qm = (clipped[start:stop, s] * (logs[start:stop, s] - log_m)).sum(axis=-1)
            d[i, start:stop] = (0.5 * kl_pm + 0.5 * kl_qm).mean(axis=-1)
    return d


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
    if n == 1:
        weights[0, 0] = 1.0
        return weights
    cap = max_neighbours - 1  # neighbours besides i itself
    for start in range(0, n, _ROW_BLOCK):  # selection vectorised over a block of rows
        rows = np.arange(start, min(n, start + _ROW_BLOCK))
        off = np.ones((len(rows), n), dtype=bool)
        off[np.arange(len(rows)), rows] = False
        others = np.broadcast_to(np.arange(n), off.shape)[off].reshape(len(rows), n - 1)
        d_others = divergences[rows][off].reshape(len(rows), n - 1)
        tau = np.median(d_others, axis=1) if threshold == "median" else np.full(len(rows), threshold)
        chosen = d_others <= tau[:, None]
        if cap < n - 1:  # keep the cap smallest d_ij, ties by index (a stable sort's order)
            key = np.where(chosen, d_others, np.inf)
            if cap == 0:
                chosen[:] = False
            else:
                kth = np.partition(key, cap - 1, axis=1)[:, cap - 1]
                below = key < kth[:, None]
                tie = chosen & (key == kth[:, None])
                room = cap - below.sum(axis=1)
                chosen = below | (tie & (np.cumsum(tie, axis=1) <= room[:, None]))
        for row, i in enumerate(rows):
            candidates = others[row, chosen[row]]
            candidates = candidates[np.argsort(divergences[i, candidates], kind="stable")]
            members = np.concatenate([[i], candidates])
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
    if weights.shape[0] > 1 and (weights == weights[0]).all():
        # every receiver gets the same mix (mean, era): fuse once, share the row (read-only view)
        return np.broadcast_to(_fuse_row(knowledge, weights[0], mask), (weights.shape[0], p, c))
    fused = np.empty((weights.shape[0], p, c), dtype=np.float64)
    members, w_members = _padded_members(weights)
    k = members.shape[1]
    if k > _SPARSE_NEIGHBOURS:  # dense rows (small federations, no cap): row by row
        for i in range(weights.shape[0]):
            fused[i] = _fuse_row(knowledge, weights[i], mask)
        return fused
    # sparse rows (knfu's capped neighbour sets): blocks of receivers at once; members in
    # index order, padded with weight 0 (adding exact zeros changes no sum), accumulated
    # member by member as einsum does, so each F_i equals _fuse_row's bit for bit
    block = max(1, _FUSION_BLOCK // (k * p * c))  # receivers per block: stay in cache
    for start in range(0, weights.shape[0], block):
        stop = min(weights.shape[0], start + block)
        idx, wv = members[start:stop], w_members[start:stop]
        w = wv[:, :, None] * mask[idx]  # [b, k, P]
        total = w.sum(axis=1)  # [b, P]
        empty = total <= 0
        if empty.any():
            w = np.where(empty[:, None, :], wv[:, :, None], w)
            total = w.sum(axis=1)
        share = w / total[:, None, :]
        out = fused[start:stop]
        np.multiply(share[:, 0, :, None], knowledge[idx[:, 0]], out=out)
        term = np.empty_like(out)
        for j in range(1, k):
            np.multiply(share[:, j, :, None], knowledge[idx[:, j]], out=term)
            out += term
    return fused


def _fuse_row(knowledge: np.ndarray, row: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """F(x) for one receiver with weights ``row`` [N] (see :func:`weighted_fusion`)."""
    members = np.flatnonzero(row)
    w = row[members][:, None] * mask[members]  # [k, P]
    total = w.sum(axis=0)  # [P]
    empty = total <= 0
    if empty.any():
        w[:, empty] = row[members][:, None]
        total = w.sum(axis=0)
    return np.einsum("kp,kpc->pc", w / total, knowledge[members])


# ----------------------------------------------------------------- methods


@dataclass(frozen=True)
class FusionResult:
    """``fused`` [N, P, C] (None for ``none``) and ``weights`` [N, N]; methods that build
    their own consensus (``expert`` with verified trust) also return it, one per receiver:
    ``consensus`` [N, P, C] and its sender shares ``consensus_weights`` [N, N]. Methods with a
    receiver prior term (``expert``) also return ``evidence`` [N, P, C]: F_i with that term off
    (gamma = 0), the senders' evidence alone, which DP-aware abstention reads
    (:func:`fedkd.dp_knowledge.evidence_abstention`) without fusing a second time."""

    fused: np.ndarray | None
    weights: np.ndarray
    consensus: np.ndarray | None = None
    consensus_weights: np.ndarray | None = None
    evidence: np.ndarray | None = None


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
    row = sharpen(result.fused[:1], era_temperature)  # every row is the same: sharpen one
    return FusionResult(np.broadcast_to(row, result.fused.shape), result.weights)


@FUSION_METHODS.register("knfu")
def _fuse_knfu(
    knowledge: np.ndarray,
    mask: np.ndarray,
    *,
    measure: str = "agreement",
    divergence: str = "hellinger",
    confident_fraction: float = 0.5,
    beta: float = 10.0,
    threshold: float | str = "median",
    max_neighbours: int = 10,
    **_: Any,
) -> FusionResult:
    weights = knfu_weights(knowledge, measure=measure, divergence=divergence, confident_fraction=confident_fraction,
                           beta=beta, threshold=threshold, max_neighbours=max_neighbours)
    return FusionResult(weighted_fusion(knowledge, weights, mask), weights)


def knfu_weights(knowledge: np.ndarray, *, measure: str, divergence: str, confident_fraction: float, beta: float,
                 threshold: float | str, max_neighbours: int) -> np.ndarray:
    """knfu's neighbour weights [N, N]: :func:`effectiveness_matrix`, then
    :func:`neighbour_weights` (nonzero exactly on each receiver's effective neighbours)."""
    d = effectiveness_matrix(knowledge, measure=measure, divergence=divergence, confident_fraction=confident_fraction)
    return neighbour_weights(d, beta=beta, threshold=threshold, max_neighbours=max_neighbours)


def confident_calls(knowledge: np.ndarray, *, confidence: float) -> np.ndarray:
    """``[N, P, C]`` boolean: M_k(x, c) = 1 where client k *calls* x a c, i.e.
    argmax_c' K_k(x, c') = c and K_k(x, c) >= ``confidence`` (ties to the lower class)."""
    n, p, c = knowledge.shape
    top = knowledge.argmax(axis=-1)  # [N, P]
    calls = np.zeros((n, p, c), dtype=bool)
    np.put_along_axis(calls, top[..., None], True, axis=-1)
    return calls & (knowledge >= confidence)


def class_recall(knowledge: np.ndarray, calls: np.ndarray) -> np.ndarray:
    """r_kj(c) = mean_{x in S_k(c)} K_j(x, c), ``[N, N, C]`` (verifier k, sender j, class c):
    the probability sender j gives class c where verifier k confidently calls x a c
    (S_k(c) = {x : M_k(x, c)}, :func:`confident_calls`). NaN where S_k(c) is empty (k
    verifies nothing of c). One [N, P] x [P, N] product per class: O(N^2 P C)."""
    return _masked_class_means(knowledge, calls)


def class_false_calls(knowledge: np.ndarray, calls: np.ndarray) -> np.ndarray:
    """f_kj(c) = mean_{x in S_k \\ S_k(c)} K_j(x, c), ``[N, N, C]``: the probability sender j
    gives class c where verifier k confidently calls x something else (S_k = every x k
    calls). NaN where k calls no x anything but c. Same cost as :func:`class_recall`."""
    return _masked_class_means(knowledge, calls.any(axis=2, keepdims=True) & ~calls)


def _masked_class_means(knowledge: np.ndarray, where: np.ndarray) -> np.ndarray:
    """mean over {x : where[k, x, c]} of K_j(x, c) for every (k, j, c); NaN on empty sets."""
    n, p, c = knowledge.shape
    counts = where.sum(axis=1).astype(np.float64)  # [N, C]
    means = np.empty((n, n, c))
    for cls in range(c):
        means[:, :, cls] = where[:, :, cls].astype(np.float64) @ knowledge[:, :, cls].T
    with np.errstate(invalid="ignore", divide="ignore"):
        means /= counts[:, None, :]
    means[np.broadcast_to(counts[:, None, :] == 0, means.shape)] = np.nan
    return means


def verified_trust(knowledge: np.ndarray, *, beta: float = 10.0,
                   confidence: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Trust checked on the receiver's own confident calls: ``(t [N, N, C], s [N, N])``.

    Receiver i checks sender j as a detector of class c on the public examples i
    confidently calls (:func:`confident_calls`): how much j gives c where i calls c
    (:func:`class_recall`, r_ij(c)) minus how much it gives c where i calls something else
    (:func:`class_false_calls`, f_ij(c); 0 when i calls nothing else), a soft Youden's J
    (sensitivity + specificity - 1, Youden 1950):

        J_ij(c) = max(0, r_ij(c) - f_ij(c))
        v_ij(c) = exp(-beta (1 - J_ij(c)))                    (1: j detects c as i does; e^-beta: not at all)
        s_ij    = sum_{c in C_i} pi_i(c) v_ij(c) / sum_{c in C_i} pi_i(c)
                                                              (C_i: the classes i calls at all; pi_i = EPD_i)
        t_ij(c) = v_ij(c) for c in C_i,  s_ij for the classes i never calls

    ``t`` is the class-expert trust (:func:`class_expert_fusion`), ``s`` the sender trust of
    the consensus (:func:`trusted_consensus`). A receiver that calls nothing (C_i empty)
    can check nobody and trusts only itself (s_ii = 1, s_ij = 0).

    Only the receiver's own view is used: its knowledge comes from its private data, which
    no other site can fake, so senders cannot vouch for each other (label-flippers of the
    same classes agree with each other and would outvote an honest holder in a vote among
    senders). A uniform-random sender gives c about 1/C everywhere (J ~ 0); a label-flipper
    gives c what its model gave the class before it: little where i calls c, unless its
    model says one class for everything, which the false calls f cancel (recall alone
    would trust a sender that calls everything c). An honest holder of c gets J near 1, an
    honest site without c about 0 (it is not an expert for c either: pi_j(c) is small). On the classes i never calls, j counts as far as it
    agreed with i where i could check (EigenTrust's one step, Kamvar et al. 2003, with the
    receiver as the pre-trusted peer; the agreement test itself is knfu's, Seyedmohammadi et
    al. 2024, made class by class).
    """
    n, p, c = knowledge.shape
    calls = confident_calls(knowledge, confidence=confidence)
    recall = class_recall(knowledge, calls)  # [i, j, c]
    false = np.nan_to_num(class_false_calls(knowledge, calls), nan=0.0)
    called = calls.any(axis=1)  # [i, c]
    youden = np.clip(np.nan_to_num(recall, nan=0.0) - false, 0.0, 1.0)
    checks = np.where(called[:, None, :], np.exp(-beta * (1.0 - youden)), 0.0)
    mass = knowledge.mean(axis=1) * called  # pi_i(c) on the called classes
    total = mass.sum(axis=1)  # [i]
    senders = np.einsum("ic,ijc->ij", mass, checks)
    senders = np.divide(senders, total[:, None], out=np.eye(n), where=total[:, None] > 0)
    trust = np.where(called[:, None, :], checks, senders[:, :, None])
    return trust, senders


def claimed_trust(knowledge: np.ndarray, *, beta: float = 10.0, confidence: float = 0.5,
                  steps: int = 3, gate: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Trust checked on the classes each *sender claims*, by the receiver and the senders it
    has already verified: ``(t [N, N, C], s [N, N])``.

    :func:`verified_trust` checks sender j only on the classes receiver i itself calls, so an
    honest holder of classes i lacks fails like a random sender. Here j is checked on every
    class it claims (its label prior pi_j = EPD_j), each by the verifiers that call that
    class, and the verifier set grows from the receiver outwards (EigenTrust, Kamvar et al.
    2003, with the receiver as the only pre-trusted peer, ``steps`` rounds). With M_k the
    confident calls (:func:`confident_calls`), r / f the recall and false calls
    (:func:`class_recall`, :func:`class_false_calls`), n_k(c) the number of public examples
    k calls c and sigma(z) = 1 / (1 + e^-z):

        J_kj(c)    = max(0, r_kj(c) - f_kj(c))        (k's soft Youden check of j on c; 0 if k never calls c)
        v^0_ik     = 1[k = i]                          (step 0: the receiver alone vouches)
        Jbar_ij(c) = sum_{k != j} v_ik n_k(c) J_kj(c) / sum_{k != j} v_ik n_k(c)
                                                       (checked(i, j, c): the denominator > 0)
        Jhat_ij    = sum_{c checked} pi_j(c) Jbar_ij(c) / sum_{c checked} pi_j(c)   (j's claims, as checked)
        s_ij       = sigma(2 beta (Jhat_ij - gate)),    0 if no claim of j is checked
        v^{t+1}_ik = 1 for k = i;  s_ik if s_ik >= 1/2 (Jhat >= gate), else 0

    and at the end t_ij(c) = sigma(2 beta (Jbar_ij(c) - gate)) where checked, s_ij where not;
    t_ii = s_ii = 1. The verdict is a soft step (about 1 for J well above ``gate``, e^{-2 beta
    gate} ~ 0.0025 at J = 0 with the defaults), not a grade: an honest site of few classes has
    a high false-call rate f on the classes it never saw (it calls a 0-digit a 1 if it only knows
    1 and 2) and so a modest J ~ 0.5, yet it must count as much as the receiver in the
    consensus G_i (:func:`trusted_consensus`), or a one- or two-class site's G_i is its own
    knowledge. The checks are averaged before the step, so one trusted dissenting checker of c
    cuts j's trust in c even when another agrees.

    Why it separates: an honest holder of a class i lacks is checked by another honest holder
    of it, itself verified by i on the classes they share (or via further steps); a
    uniform-random sender claims every class evenly and detects none (J ~ 0 with every
    checker); a label-flipper claims the shifted classes (c -> c+1), and their honest holders
    see it give c+1 where they call c+1 only as often as the true c+1 rate of class c (J ~ 0).
    Flippers of the same classes agree with each other, but a sender vouches only after
    passing the trusted checkers (v is seeded by the receiver alone and gated at s >= 1/2),
    and no sender checks itself (k != j). Limits: a sender whose claims no trusted site
    can check gets s = 0 (an honest site holding only classes nobody else holds is lost); a
    one-class receiver alone cannot refute a sender that says its class everywhere (f is
    undefined for it), only other verified sites' false calls f can; a sender honest on the
    checked classes and lying on the unchecked ones passes on its sender trust. Cost: the
    checks are O(N^2 P C) (one [N, P] x [P, N] product per class), each step one [N, N] x
    [N, N] product per class, O(steps N^3 C): comparable at N ~ P.
    """
    n, p, c = knowledge.shape
    calls = confident_calls(knowledge, confidence=confidence)
    recall = np.nan_to_num(class_recall(knowledge, calls), nan=0.0)  # [k, j, c]
    false = np.nan_to_num(class_false_calls(knowledge, calls), nan=0.0)
    counts = calls.sum(axis=1).astype(np.float64)  # n_k(c) [k, c]
    youden = np.clip(recall - false, 0.0, 1.0) * (counts[:, None, :] > 0)  # J_kj(c)
    diagonal = np.arange(n)
    claims = knowledge.mean(axis=1)  # pi_j(c) [j, c]
    claims = claims / np.clip(claims.sum(axis=1, keepdims=True), _EPS, None)

    def step(z: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-2.0 * beta * (z - gate)))

    vouch = np.eye(n)  # v_ik
    checked = np.zeros((n, n, c), dtype=bool)
    mean_check = np.zeros((n, n, c))  # Jbar_ij(c)
    senders = np.eye(n)
    for _ in range(max(1, steps)):
        for cls in range(c):
            weight = vouch * counts[None, :, cls]  # [i, k]: v_ik n_k(c)
            # sums over k != j: the full product minus k = j's own term
            numerator = weight @ youden[:, :, cls] - weight * youden[diagonal, diagonal, cls][None, :]
            denominator = weight.sum(axis=1, keepdims=True) - weight  # [i, j]
            ok = denominator > 1e-9
            checked[:, :, cls] = ok
            mean_check[:, :, cls] = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=ok)
        mass = checked * claims[None, :, :]  # pi_j(c) on j's checked classes
        total = mass.sum(axis=2)
        overall = np.divide((mass * mean_check).sum(axis=2), total, out=np.zeros_like(total), where=total > 0)
        senders = np.where(total > 0, step(overall), 0.0)
        senders[diagonal, diagonal] = 1.0
        vouch = np.where(senders >= 0.5, senders, 0.0)
        vouch[diagonal, diagonal] = 1.0
    trust = np.where(checked, step(mean_check), senders[:, :, None])
    trust[diagonal, diagonal, :] = 1.0
    return trust, senders

def trusted_consensus(knowledge: np.ndarray, mask: np.ndarray, weights: np.ndarray, *,
                      temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Each receiver's consensus over the senders it trusts: ``(G [N, P, C], shares [N, N])``.

        G_i(x) = softmax( sum_j g_ij(x) K_j(x) / T ),  g_ij(x) = s_ij m_j(x) / sum_l s_il m_l(x)

    DS-FL's ERA (Itahara et al. 2021: the sharpened mean, T = ``temperature``) with sender
    j weighted by receiver i's trust s_ij (``weights`` [R, N] for R receivers, e.g.
    :func:`verified_trust`)
    instead of 1/N; m_j is the informative-row mask. With every s_ij = 1 it is ERA exactly.
    Where no sender i trusts is informative at x, they are averaged unmasked. Computed as two
    matrix products per block of receivers (s @ (m K) and s @ m): O(N^2 P C).
    ``shares[i, j]`` = mean_x g_ij(x): sender j's share of G_i (rows sum to 1).
    """
    n, p, c = knowledge.shape
    s = np.asarray(weights, dtype=np.float64)
    s = np.where(s.sum(axis=1, keepdims=True) > 0, s, 1.0)  # a row trusting nobody: the plain mean
    masked = (mask[:, :, None] * knowledge).reshape(n, p * c)
    receivers = s.shape[0]
    consensus = np.empty((receivers, p, c))
    shares = np.empty((receivers, n))
    for start in range(0, receivers, _ROW_BLOCK):
        rows = slice(start, min(receivers, start + _ROW_BLOCK))
        total = s[rows] @ mask  # [b, P]
        numerator = (s[rows] @ masked).reshape(-1, p, c)
        empty = total <= 0
        if empty.any():  # nobody trusted is informative at x: their unmasked mean
            plain = (s[rows] @ knowledge.reshape(n, p * c)).reshape(-1, p, c)
            numerator = np.where(empty[:, :, None], plain, numerator)
            total = np.where(empty, s[rows].sum(axis=1, keepdims=True), total)
        consensus[rows] = sharpen(numerator / total[:, :, None], temperature)
        inverse = 1.0 / total  # [b, P]; mean_x m_j(x) / total_i(x), m_j = 1 where x is empty
        per_sender = (inverse * ~empty) @ mask.T + (inverse * empty).sum(axis=1, keepdims=True)
        shares[rows] = s[rows] * per_sender / p
    return consensus, shares


def class_expert_fusion(
    knowledge: np.ndarray,
    members: np.ndarray,
    mask: np.ndarray,
    *,
    prior_weight: float = 1.0,
    prior_floor: float = 1e-3,
    null_weight: float = 0.0,
    with_evidence: bool = False,
) -> tuple[np.ndarray, ...]:
    """Class-expert, prior-corrected fusion: only the (trusted) holders of class c speak for c.

    With sender j's label prior pi_j = EPD_j (its mean knowledge on P), floored at
    ``prior_floor`` and renormalised, and ``members`` the trust t_ij(c) >= 0 receiver i puts
    in sender j for class c (``[N, N, C]``, e.g. :func:`class_trust`; or ``[N, N]``, one
    trust for every class, e.g. 0/1 for knfu's neighbour sets N(i)):

        a_j(x, c) = t_ij(c) pi_j(c) m_j(x) / (kappa + sum_l t_il(c) pi_l(c) m_l(x))   (m: informative row)
        L_j(x, c) = log K_j(x, c) - log pi_j(c)                               (prior removed)
        F_i(x)    = softmax_c( sum_j a_j(x, c) L_j(x, c) + gamma log pi_i(c) )

    i.e. a product of experts of the senders' likelihoods p(x | c) ~ K_j(x, c) / pi_j(c),
    each class weighted by how much of it a sender holds (and how far that claim is
    verified), put back under the receiver's own label prior (gamma = ``prior_weight``): the
    posterior the receiver's local test split follows. PFLlib's FD, FedProto and FedCache
    likewise average a class over its holders; the prior correction is Bayes' rule (as in
    logit adjustment, Menon et al. 2021). kappa = ``null_weight`` >= 0 is a null expert with
    no evidence (L = 0): the share 1 - sum_j a_j(x, c) it keeps is evidence nobody
    trusted gave, so a class only distrusted senders claim stays near the receiver's prior
    instead of going to them. Where no trusted sender is informative at (x, c), F_i's logit
    for c is the receiver's prior alone.

    Returns ``(fused [N, P, C], weights [N, N])`` with w_ij = mean_{x, c} a_j(x, c) /
    sum_l mean_{x, c} a_l(x, c): sender j's share of the senders' evidence in F_i, every
    (x, c) counted alike (the null expert's share left out, so rows sum to 1). With
    ``with_evidence``, also softmax_c(sum_j a_j(x, c) L_j(x, c)) [N, P, C], F_i at gamma = 0,
    from the same sums: ``(fused, weights, evidence)``.
    """
    n, p, c = knowledge.shape
    prior = np.clip(knowledge.mean(axis=1), prior_floor, None)
    prior /= prior.sum(axis=1, keepdims=True)
    log_prior = np.log(prior)
    likelihood = np.log(np.clip(knowledge, _EPS, None)) - log_prior[:, None, :]  # [N, P, C]
    trust = np.asarray(members, dtype=np.float64)
    informative = mask.astype(np.float64)  # [N, P]
    if trust.ndim == 2:  # one trust for every class: all classes in one pass
        evidence, held = _class_expert_shared_trust(trust, prior, informative, likelihood, null_weight)
    else:
        evidence = np.empty((n, p, c))  # sum_j a_j(x, c) L_j(x, c) for every receiver
        held = np.zeros((n, n))  # sum over (x, c) of a_j(x, c)
        for cls in range(c):  # per class, two [N, N] x [N, P] products: O(N^2 P C) in BLAS
            claim = trust[:, :, cls] * prior[None, :, cls]  # [i, j]: t_ij(c) pi_j(c)
            total = claim @ informative + null_weight  # [i, x]
            inverse = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
            evidence[:, :, cls] = (claim @ (informative * likelihood[:, :, cls])) * inverse
            held += claim * (inverse @ informative.T)  # sum_x a_ij(x, c)
    fused = softmax(evidence + prior_weight * log_prior[:, None, :], axis=-1)
    sums = held.sum(axis=1, keepdims=True)
    weights = np.divide(held, sums, out=np.zeros_like(held), where=sums > 0)
    if with_evidence:
        return fused, weights, softmax(evidence, axis=-1)
    return fused, weights


def _class_expert_shared_trust(trust: np.ndarray, prior: np.ndarray, informative: np.ndarray,
                               likelihood: np.ndarray, null_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`class_expert_fusion`'s sums for a trust t_ij shared by every class ``[N, N]``:
    ``(evidence [N, P, C], held [N, N])``.

    With A_j(x, c) = pi_j(c) m_j(x) (a sender's claim on (x, c)), every class at once:
    total_i = kappa + sum_j t_ij A_j, evidence_i = sum_j t_ij A_j L_j / total_i and
    held_ij = t_ij <A_j, 1 / total_i> over (x, c). Where every receiver has at most
    ``_SPARSE_NEIGHBOURS`` senders (knfu's capped neighbour sets) only those are gathered,
    O(N k P C) instead of O(N^2 P C); otherwise three matrix products. Equal to the
    class-by-class loop up to the order of the sums (tests/test_fusion.py)."""
    n, p, c = likelihood.shape
    claims = (informative[:, :, None] * prior[:, None, :]).reshape(n, p * c)  # A_j
    weighted = claims * likelihood.reshape(n, p * c)  # A_j L_j
    members, w_members = _padded_members(trust)
    k = members.shape[1]
    if k > _SPARSE_NEIGHBOURS:
        total = trust @ claims + null_weight  # [i, (x, c)]
        inverse = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
        evidence = (trust @ weighted) * inverse
        return evidence.reshape(n, p, c), trust * (inverse @ claims.T)
    evidence = np.empty((n, p * c))
    held = np.zeros((n, n))
    block = max(1, _FUSION_BLOCK // max(1, k * p * c))  # receivers per block
    for start in range(0, n, block):
        stop = min(n, start + block)
        idx, wv = members[start:stop], w_members[start:stop, None, :]  # [b, k], [b, 1, k]
        gathered = claims[idx]  # [b, k, (x, c)]
        total = (wv @ gathered)[:, 0] + null_weight  # [b, (x, c)]
        inverse = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
        evidence[start:stop] = (wv @ weighted[idx])[:, 0] * inverse
        shares = (gathered @ inverse[:, :, None])[:, :, 0] * wv[:, 0]  # [b, k]
        np.add.at(held, (np.repeat(np.arange(start, stop), k), idx.ravel()), shares.ravel())
    return evidence.reshape(n, p, c), held


def _padded_members(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nonzero columns in index order, padded with column 0 and weight 0:
    ``(members [R, k], weights [R, k])``, k the largest row count."""
    rows, cols = np.nonzero(weights)
    counts = np.bincount(rows, minlength=weights.shape[0])
    k = int(counts.max()) if len(counts) else 0
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    members = np.zeros((weights.shape[0], k), dtype=np.int64)
    members[rows, slot] = cols
    w_members = np.zeros((weights.shape[0], k))
    w_members[rows, slot] = weights[rows, cols]
    return members, w_members


TRUST_MODES = ("verified", "claimed", "off")


@FUSION_METHODS.register("expert")
def _fuse_expert(
    knowledge: np.ndarray,
    mask: np.ndarray,
    *,
    measure: str = "agreement",
    divergence: str = "hellinger",
    confident_fraction: float = 0.5,
    beta: float = 10.0,
    threshold: float | str = "median",
    max_neighbours: int = 10,
    prior_weight: float = 1.0,
    prior_floor: float = 1e-3,
    neighbours: str = "all",
    trust: str = "verified",
    trust_beta: float = 10.0,
    trust_confidence: float = 0.5,
    trust_null: float = 1.0,
    era_temperature: float = 0.1,
    **_: Any,
) -> FusionResult:
    """:func:`class_expert_fusion` over every sender (``neighbours = "all"``) or each
    receiver's effective neighbours (knfu's neighbour sets, ``"effective"``).

    ``trust = "verified"``: each holder's class weight is scaled by the receiver's check of
    it, t_ij(c) (:func:`verified_trust`, sharpness ``trust_beta``, calls at probability
    >= ``trust_confidence``), with a null expert kappa = ``trust_null`` e^{-trust_beta / 2} / C
    (evidence nobody trusted gave stays out), and each receiver gets its own consensus
    G_i over the senders it trusts (:func:`trusted_consensus`, ERA's ``era_temperature``).
    ``trust = "claimed"``: the same, with each sender checked on the classes it claims by the
    receiver and the senders it has verified (:func:`claimed_trust`).
    ``trust = "off"``: every member counts by its label prior alone, and the consensus is
    left to the caller (the server's G, ERA over every sender).
    """
    n, _, c = knowledge.shape
    if trust not in TRUST_MODES:
        raise ValueError(f"fusion trust must be one of {', '.join(TRUST_MODES)}; got {trust!r}")
    if neighbours == "all":
        members = np.ones((n, n), dtype=bool)
    else:
        members = knfu_weights(knowledge, measure=measure, divergence=divergence,
                               confident_fraction=confident_fraction, beta=beta, threshold=threshold,
                               max_neighbours=max_neighbours) > 0
    if trust == "off":
        fused, weights, evidence = class_expert_fusion(knowledge, members, mask, prior_weight=prior_weight,
                                                       prior_floor=prior_floor, with_evidence=True)
        return FusionResult(fused, weights, evidence=evidence)
    check = verified_trust if trust == "verified" else claimed_trust
    class_trust, sender_trust = check(knowledge, beta=trust_beta, confidence=trust_confidence)
    fused, weights, evidence = class_expert_fusion(knowledge, class_trust * members[:, :, None], mask,
                                                   prior_weight=prior_weight, prior_floor=prior_floor,
                                                   null_weight=trust_null * np.exp(-trust_beta / 2) / c,
                                                   with_evidence=True)
    consensus, shares = trusted_consensus(knowledge, mask, sender_trust * members, temperature=era_temperature)
    return FusionResult(fused, weights, consensus, shares, evidence)


def consensus(*, knowledge: np.ndarray, uniform_entropy: float = 0.95,
              temperature: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The federation's consensus G = ERA over every sender, ``(G [P, C], shares [N])``:
    :func:`trusted_consensus` with every weight 1 (each sender's share of G is
    mean_x m_j(x) / sum_l m_l(x), 1/N when every row is informative)."""
    knowledge = np.asarray(knowledge, dtype=np.float64)
    mask = informative_rows(knowledge, uniform_entropy)
    g, shares = trusted_consensus(knowledge, mask, np.ones((1, knowledge.shape[0])), temperature=temperature)
    return g[0], shares[0]


FUSION_PARAMETERS = frozenset(
    {"measure", "divergence", "confident_fraction", "beta", "threshold", "max_neighbours", "era_temperature",
     "prior_weight", "prior_floor", "neighbours", "trust", "trust_beta", "trust_confidence", "trust_null"}
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
    ``method`` may be a fusion rule's import path ``package.module:rule`` (a plugin,
    :mod:`fedkd.plugins`), called as ``rule(knowledge, mask, **params)``; what it returns is
    checked (:func:`_plugin_result`).
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
    if method not in FUSION_METHODS and is_plugin_path(method):
        result = _plugin_result(method, load_plugin(method, kind="fusion")(knowledge, mask, **params),
                                shape=knowledge.shape)
    else:
        result = FUSION_METHODS.get(method)(knowledge, mask, **params)
    if result.fused is not None and sharpen_temperature > 0:  # F_i and its gamma = 0 form alike
        result = replace(result, fused=sharpen(result.fused, sharpen_temperature),
                         evidence=None if result.evidence is None else sharpen(result.evidence, sharpen_temperature))
    return result


def _plugin_result(method: str, result: Any, *, shape: tuple[int, ...]) -> FusionResult:
    """A fusion plugin's return value as a :class:`FusionResult`, checked: fused ``[N, P, C]``
    rows that are probability vectors (or None: no fused knowledge), weights ``[N, N]``."""
    from fedkd.plugins import PluginError

    if not isinstance(result, FusionResult):
        if not isinstance(result, tuple) or len(result) != 2:
            raise PluginError(f"fusion plugin '{method}' must return a FusionResult or (fused, weights); "
                              f"got {type(result).__name__}")
        result = FusionResult(None if result[0] is None else np.asarray(result[0], np.float64),
                              np.asarray(result[1], np.float64))
    n = shape[0]
    if np.shape(result.weights) != (n, n):
        raise PluginError(f"fusion plugin '{method}': weights must be [{n}, {n}]; got {np.shape(result.weights)}")
    if result.fused is not None:
        fused = np.asarray(result.fused, np.float64)
        if fused.shape != tuple(shape):
            raise PluginError(f"fusion plugin '{method}': fused must be {list(shape)}; got {list(fused.shape)}")
        if not np.isfinite(fused).all() or (fused < 0).any() or not np.allclose(fused.sum(axis=-1), 1.0, atol=1e-4):
            raise PluginError(f"fusion plugin '{method}': fused rows must be probability vectors")
        result = FusionResult(fused, np.asarray(result.weights, np.float64))
    return result
