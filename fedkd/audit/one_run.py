"""Empirical epsilon lower bound from one training run (Steinke, Nasr, Jagielski 2023,
"Privacy Auditing with One (1) Training Run", NeurIPS).

m canary examples are each included in training independently with probability 1/2
(S_i ~ Bernoulli(1/2)). After training, an auditor scores every canary, guesses "in" for
the k+ highest scores, "out" for the k- lowest and abstains on the rest: r = k+ + k-
guesses, v of them correct.

Theorem (their Thm 3.1 / 5.2): if training is (eps, delta)-DP for each example, then

    P[v >= v0] <= P[Binomial(r, q) >= v0] + 2 m delta * alpha,   q = e^eps / (1 + e^eps),
    alpha = max_{1 <= i <= v0} P[v0 > Binomial(r, q) >= v0 - i] / i

(the delta term as in the authors' reference code). So with confidence 1 - beta the
training is *not* (eps, delta)-DP for any eps whose p-value is below beta: the lower bound
is the largest such eps (bisection). It is a valid bound whatever the attack; a better
attack only makes it tighter. A lower bound above the accountant's epsilon means a bug
in the DP implementation or accounting (DESIGN.md section 6).

:func:`one_run_audit` tries a few guess counts k+ = k- = k and splits beta evenly over
them (Bonferroni), so picking the best k does not inflate the confidence.

>>> round(epsilon_lower_bound(m=1000, r=100, v=100, delta=0.0), 2)
3.49
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binom

GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
"""k / m tried by :func:`one_run_audit` (k guesses "in" and k guesses "out")."""


def p_value(*, m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v correct of r guesses] under (eps, delta)-DP (module doc)."""
    if not (0 <= v <= r <= m) or eps < 0 or not (0 <= delta <= 1):
        raise ValueError(f"need 0 <= v <= r <= m, eps >= 0, 0 <= delta <= 1; got {m=}, {r=}, {v=}, {eps=}, {delta=}")
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(binom.sf(v - 1, r, q))
    alpha, total = 0.0, 0.0
    if delta > 0:
        pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v - i], i = 1..v
        totals = np.cumsum(pmf)
        alpha = float(np.max(totals / np.arange(1, v + 1))) if v > 0 else 0.0
    total = beta + alpha * delta * 2 * m
    return min(total, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest eps with :func:`p_value` < 1 - ``confidence`` (0.0 when even eps = 0 passes)."""
    beta = 1.0 - confidence
    if r == 0 or p_value(m=m, r=r, v=v, eps=0.0, delta=delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m=m, r=r, v=v, eps=high, delta=delta) < beta:
        low, high = high, high * 2
        if high > 1e3:
            return float("inf")
    for _ in range(50):
        mid = (low + high) / 2
        if p_value(m=m, r=r, v=v, eps=mid, delta=delta) < beta:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class OneRunAudit:
    """The best bound over the guess counts tried, and how it was reached."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    guesses: int
    correct: int
    tried: tuple[tuple[int, int, float], ...]  # (guesses r, correct v, bound) per k

    def to_dict(self) -> dict:
        return asdict(self)


def one_run_audit(
    *,
    scores: np.ndarray,
    included: np.ndarray,
    delta: float = 0.0,
    confidence: float = 0.95,
    fractions: tuple[float, ...] = GUESS_FRACTIONS,
) -> OneRunAudit:
    """Steinke et al.'s audit from canary ``scores`` [m] (higher = "in") and the true
    inclusion bits ``included`` [m] (module doc). Ties at the cut are broken by index."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if included.shape != (m,):
        raise ValueError(f"scores [{m}] and included {included.shape} differ")
    ks = sorted({k for f in fractions if 1 <= (k := int(round(f * m))) <= m // 2})
    if not ks:
        return OneRunAudit(0.0, confidence, delta, m, 0, 0, ())
    order = np.argsort(-scores, kind="stable")
    split_confidence = 1 - (1 - confidence) / len(ks)  # Bonferroni over the k tried
    tried = []
    for k in ks:
        v = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
        tried.append((2 * k, v, epsilon_lower_bound(m=m, r=2 * k, v=v, delta=delta,
                                                    confidence=split_confidence)))
    r, v, best = max(tried, key=lambda t: t[2])
    return OneRunAudit(best, confidence, delta, m, r, v, tuple(tried))


def epsilon_ceiling(*, m: int, delta: float, confidence: float = 0.95,
                    fractions: tuple[float, ...] = GUESS_FRACTIONS) -> float:
    """The largest bound :func:`one_run_audit` can certify with ``m`` canaries: every guess
    right at the largest guess count it tries (r = 2k, v = r, the same Bonferroni split).
    With delta = 0 that is logit(beta'^(1/r)), from P[Binomial(r, q) >= r] = q^r = beta'.
    A DP run whose accountant epsilon is above it cannot be shown to leak that much by
    this audit, however strong the attack: more canaries raise the ceiling."""
    ks = sorted({k for f in fractions if 1 <= (k := int(round(f * m))) <= m // 2})
    if not ks:
        return 0.0
    split_confidence = 1 - (1 - confidence) / len(ks)
    return epsilon_lower_bound(m=m, r=2 * ks[-1], v=2 * ks[-1], delta=delta, confidence=split_confidence)
