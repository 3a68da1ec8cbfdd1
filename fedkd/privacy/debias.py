"""Server-side debiasing and pooling of label-rr releases (``fusion.release-debias``).

Each site releases, per public example x, the one-hot e_o of a label o drawn by k-ary
randomized response from its top-1 prediction y (:mod:`fedkd.privacy.release`)::

    P[o = y] = p = e^eps / (e^eps + C - 1),    P[o = c] = q = 1 / (e^eps + C - 1), c != y.

Unbiased estimate (Warner 1965, "Randomized Response", JASA 60; the k-ary frequency
estimator of Wang, Blocki, Li, Jha 2017, "Locally Differentially Private Protocols for
Frequency Estimation", USENIX Security, "direct encoding"). Coordinate c of the released
one-hot has E[e_o(c)] = p if c = y, else q, i.e. E[e_o] = q 1 + (p - q) e_y. Hence

    d = (e_o - q) / (p - q)                                                    (1)

has E[d] = e_y exactly: it is an unbiased estimate of the sender's own one-hot. Its
coordinates take the values (1 - q) / (p - q) or -q / (p - q) (outside [0, 1]), and
Var[d(c)] = P[o = c] (1 - P[o = c]) / (p - q)^2: large at small eps (at eps 1, C 4:
p = 0.475, q = 0.175, variance 2.77 on y and 1.60 elsewhere).

Pooling. Averaging (1) over the N senders of a round gives an unbiased estimate of the
senders' vote histogram h(x) = (1/N) sum_j e_{y_j(x)} with variance down by N; averaging
also over the R rounds in which x was released (each round's releases are accounted by the
ledger, R * eps per example, and use fresh randomness) gives an unbiased estimate of the
histogram pooled over senders and rounds, variance down by N R. The estimate is then
projected onto the probability simplex (Euclidean projection; Duchi, Shalev-Shwartz,
Singer, Chandra 2008, "Efficient Projections onto the l1-Ball", ICML, Fig. 1), the standard
post-processing of frequency oracles (Wang et al. 2020, "Locally Differentially Private
Frequency Estimation with Consistency", NDSS): the nearest distribution in l2, which
clips the negative coordinates to 0 and keeps the ordering of the others.

Privacy. Everything here reads the released rows only (plus public constants eps, C): it
is post-processing of the eps-RR releases and costs nothing beyond the ledger's R * eps per
example. The released messages, hence what any attacker of the releases sees, are the same
with and without this treatment.

Pure functions on arrays; no Flower imports.
"""

from __future__ import annotations

import numpy as np

from fedkd.fusion import simplex_projection
from fedkd.privacy.release import keep_probability

RELEASE_DEBIAS = ("off", "senders", "rounds")
"""Values of ``fusion.release-debias``: ``off`` (fuse the released one-hots as they are),
``senders`` (debias and pool over the round's senders), ``rounds`` (also pool over every
round in which the public example was released)."""


def rr_rates(*, epsilon: float, num_classes: int) -> tuple[float, float]:
    """(p, q): P[out = y] = e^eps / (e^eps + C - 1) and P[out = c != y] = 1 / (e^eps + C - 1)."""
    p = keep_probability(epsilon=epsilon, num_classes=num_classes)
    return p, (1.0 - p) / (num_classes - 1)


def released_onehots(rows: np.ndarray) -> np.ndarray:
    """The one-hot e_o of each released row [..., C]: its argmax. Undoes ``shield.release-smoothing``
    ((1 - s) e_o + s / C has the same argmax for s < 1) and the wire's rounding."""
    rows = np.asarray(rows, dtype=np.float64)
    out = np.zeros(rows.shape)
    np.put_along_axis(out, rows.argmax(axis=-1)[..., None], 1.0, axis=-1)
    return out


def debias(onehots: np.ndarray, *, epsilon: float) -> np.ndarray:
    """d = (e_o - q) / (p - q) for every one-hot row [..., C] (equation (1) of the module doc):
    E[d] = e_y, the sender's true one-hot."""
    onehots = np.asarray(onehots, dtype=np.float64)
    p, q = rr_rates(epsilon=epsilon, num_classes=onehots.shape[-1])
    return (onehots - q) / (p - q)


def pooled_estimate(knowledge: np.ndarray, *, epsilon: float, previous_sum: np.ndarray | None = None,
                    previous_count: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fused, sum, count)`` from the released rows ``knowledge`` [N, P, C] of N senders:
    sum = previous_sum + sum_j d_j [P, C], count = previous_count + N [P] (the running totals
    over rounds; None = this round alone) and fused = simplex_projection(sum / count) [P, C], the
    projected unbiased estimate of the vote histogram pooled over senders and rounds."""
    knowledge = np.asarray(knowledge, dtype=np.float64)
    if knowledge.ndim != 3 or knowledge.shape[0] == 0:
        raise ValueError(f"knowledge must have shape [N>0, P, C]; got {knowledge.shape}")
    total = debias(released_onehots(knowledge), epsilon=epsilon).sum(axis=0)
    count = np.full(knowledge.shape[1], float(knowledge.shape[0]))
    if previous_sum is not None:
        total = total + np.asarray(previous_sum, dtype=np.float64)
        count = count + np.asarray(previous_count, dtype=np.float64)
    return simplex_projection(total / count[:, None]), total, count
