"""Membership-inference metrics from attack scores (higher score = "member").

For scores s_i and membership labels b_i in {0, 1}:

* ROC: for every threshold t, TPR(t) = P[s > t | b = 1] and FPR(t) = P[s > t | b = 0]
  (scikit-learn's ``roc_curve``); AUC = P[s_member > s_nonmember] + 1/2 P[tie]
  (``roc_auc_score``).
* TPR at FPR alpha: the largest TPR over thresholds whose FPR <= alpha (Carlini et al.
  2022, "Membership Inference Attacks From First Principles", argue for this low-FPR view;
  with n non-members an FPR below 1/n cannot be resolved, so TPR@0.1% needs > 1,000
  non-members to mean what it says; :func:`attack_metrics` reports n beside it).
* Attacker advantage (Yeom et al. 2018): max_t TPR(t) - FPR(t), the best membership
  accuracy above chance, times 2 (= 2 * accuracy - 1 for a balanced guess).

Confidence intervals: percentile bootstrap, resampling members and non-members separately
(stratified, so every replicate has both classes), ``num_bootstrap`` replicates
(:data:`DEFAULT_BOOTSTRAP`), seeded. Replicates are computed together
(:func:`bootstrap_draws`): a replicate only reweights the examples (multinomial counts
c_i), so with the scores sorted once into G distinct values, the weighted counts of
members TP_g and non-members FP_g at or above the g-th value give every threshold's ROC
point, and per replicate

    AUC = sum_g dFP_g (TP_{g-1} + dTP_g / 2) / (n_1 n_0)        (Mann-Whitney, ties 1/2)
    TPR@alpha = TP_g* / n_1, g* the last g with FP_g <= alpha n_0
    advantage = max(0, max_g TP_g / n_1 - FP_g / n_0)

in O(B n) array operations. The percentile ends' Monte Carlo error falls as 1/sqrt(B):
200 replicates moved the ends of TPR@1%FPR intervals by 0.02-0.04 between seeds, 10,000
keep them within 0.01 on 100 members / 100 non-members (tests/test_audit.py). No exact
(Clopper-Pearson) interval is used for TPR@alpha: its threshold is itself estimated from
the non-members, so the TPR is not a binomial proportion at a fixed threshold.

>>> import numpy as np
>>> m = attack_metrics(scores=np.array([3.0, 2.0, 1.0, 0.0]), labels=np.array([1, 1, 0, 0]),
...                    num_bootstrap=50)
>>> (m.auc, m.advantage)
(1.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

LOW_FPRS = (0.01, 0.001)
"""The false-positive rates at which TPR is reported."""

DEFAULT_BOOTSTRAP = 10_000
"""Bootstrap replicates of the intervals (``audit.bootstrap``'s default)."""

_CHUNK = 2_000_000
"""Replicates x examples handled per array block (bounds memory at ~50 MB)."""


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.shape[0]} vs {labels.shape[0]}")
    if labels.all() or not labels.any():
        raise ValueError("need both members (label 1) and non-members (label 0) to score an attack")
    if not np.isfinite(scores).all():
        raise ValueError("attack scores must be finite")
    return scores, labels


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """max TPR over ROC points with FPR <= ``target`` (0 if none)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def _point_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    fpr, tpr, _ = roc_curve(labels, scores)
    out = {"auc": float(roc_auc_score(labels, scores)), "advantage": float(np.max(tpr - fpr))}
    for alpha in LOW_FPRS:
        out[f"tpr@{alpha:g}"] = tpr_at_fpr(fpr, tpr, alpha)
    return out


@dataclass(frozen=True)
class AttackMetrics:
    """Point estimates and 95% bootstrap intervals ``(low, high)`` of one attack."""

    auc: float
    auc_ci: tuple[float, float]
    tpr_at_1pct: float
    tpr_at_1pct_ci: tuple[float, float]
    tpr_at_01pct: float
    tpr_at_01pct_ci: tuple[float, float]
    advantage: float
    advantage_ci: tuple[float, float]
    members: int
    non_members: int

    def to_dict(self) -> dict:
        return asdict(self)


def attack_metrics(
    *,
    scores: np.ndarray,
    labels: np.ndarray,
    num_bootstrap: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
) -> AttackMetrics:
    """AUC, TPR at 1% and 0.1% FPR and advantage of ``scores`` [n] against ``labels`` [n]
    (1 = member), each with a percentile-bootstrap interval at ``confidence``."""
    scores, labels = _check(scores, labels)
    point = _point_metrics(scores, labels)
    draws = bootstrap_draws(scores=scores, labels=labels, num_bootstrap=num_bootstrap, seed=seed)
    tail = (1 - confidence) / 2 * 100

    def ci(key: str) -> tuple[float, float]:
        if num_bootstrap == 0:
            return (point[key], point[key])
        low, high = np.percentile(draws[key], [tail, 100 - tail])
        return (float(low), float(high))

    return AttackMetrics(
        auc=point["auc"], auc_ci=ci("auc"),
        tpr_at_1pct=point["tpr@0.01"], tpr_at_1pct_ci=ci("tpr@0.01"),
        tpr_at_01pct=point["tpr@0.001"], tpr_at_01pct_ci=ci("tpr@0.001"),
        advantage=point["advantage"], advantage_ci=ci("advantage"),
        members=int(labels.sum()), non_members=int((~labels).sum()),
    )


def _sorted_groups(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, is_member)`` in descending score order: ``starts`` [G] the first position
    of each distinct score, ``is_member`` [n] the labels in that order."""
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    return np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]]), labels[order]


def _weighted_curve(starts: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray) -> dict[str, np.ndarray]:
    """The module doc's per-replicate formulas; ``w_pos`` / ``w_neg`` [B, n] are the
    members' / non-members' weights in descending score order, ``starts`` the first
    position of each distinct score."""
    n_pos, n_neg = w_pos[0].sum(), w_neg[0].sum()
    d_tp = np.add.reduceat(w_pos, starts, axis=1)
    d_fp = np.add.reduceat(w_neg, starts, axis=1)
    tp, fp = np.cumsum(d_tp, axis=1), np.cumsum(d_fp, axis=1)
    out = {"auc": ((tp - d_tp / 2) * d_fp).sum(axis=1) / (n_pos * n_neg),
           "advantage": np.maximum(0.0, (tp / n_pos - fp / n_neg).max(axis=1))}
    for alpha in LOW_FPRS:
        ok = fp / n_neg <= alpha + 1e-12
        out[f"tpr@{alpha:g}"] = np.where(ok, tp, 0.0).max(axis=1) / n_pos
    return out


def bootstrap_draws(
    *, scores: np.ndarray, labels: np.ndarray, num_bootstrap: int, seed: int = 0,
) -> dict[str, np.ndarray]:
    """``{"auc", "advantage", "tpr@0.01", "tpr@0.001"}`` -> [num_bootstrap] values over
    stratified bootstrap replicates (members and non-members each resampled with
    replacement to their own count), all replicates at once (module doc).

    With every count 1 (no resampling) the formulas give the point metrics exactly:
    ``curve_metrics`` is that case."""
    scores, labels = _check(scores, labels)
    starts, pos = _sorted_groups(scores, labels)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    rng = np.random.default_rng(seed)
    keys = ["auc", "advantage", *(f"tpr@{a:g}" for a in LOW_FPRS)]
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    block = max(1, _CHUNK // len(scores))
    for first in range(0, num_bootstrap, block):
        b = min(block, num_bootstrap - first)
        w_pos = np.zeros((b, len(scores)))
        w_neg = np.zeros((b, len(scores)))
        w_pos[:, pos] = rng.multinomial(n_pos, np.full(n_pos, 1.0 / n_pos), size=b)
        w_neg[:, ~pos] = rng.multinomial(n_neg, np.full(n_neg, 1.0 / n_neg), size=b)
        for key, value in _weighted_curve(starts, w_pos, w_neg).items():
            out[key].append(value)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def curve_metrics(*, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The point metrics by the replicate formulas with unit weights (checked against
    scikit-learn's ``roc_auc_score`` / ``roc_curve`` in the tests)."""
    scores, labels = _check(scores, labels)
    starts, pos = _sorted_groups(scores, labels)
    w_pos, w_neg = pos[None, :].astype(float), (~pos)[None, :].astype(float)
    return {k: float(v[0]) for k, v in _weighted_curve(starts, w_pos, w_neg).items()}


def roc_points(*, scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the ROC curve (for plots)."""
    scores, labels = _check(scores, labels)
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


STRONGEST_RULE = (
    "the attack with the highest lower confidence bound of TPR@1%FPR; ties broken by the "
    "higher lower bound of AUC, then the higher AUC, then the name"
)
"""How :func:`strongest_attack` chooses (stated in every report)."""


def strongest_attack(*, attacks: Mapping[str, Mapping[str, Any]]) -> str:
    """The name of the strongest of ``attacks`` (name -> :meth:`AttackMetrics.to_dict`)
    by :data:`STRONGEST_RULE`. A lower bound rewards an attack only for what its interval
    shows (a high point estimate resting on one or two non-members does not win); the
    choice is still a maximum over attacks, hence optimistic: its own interval is
    re-computed at the Bonferroni level 1 - (1 - confidence) / k for k attacks
    (:func:`simultaneous_confidence`), which holds for the chosen one whichever wins.

    >>> strongest_attack(attacks={"a": {"tpr_at_1pct_ci": (0.0, 0.1), "auc_ci": (0.5, 0.7), "auc": 0.6},
    ...                           "b": {"tpr_at_1pct_ci": (0.02, 0.3), "auc_ci": (0.4, 0.6), "auc": 0.5}})
    'b'
    """
    if not attacks:
        raise ValueError("attacks: need at least one attack's metrics; got none")
    return max(attacks, key=lambda n: (attacks[n]["tpr_at_1pct_ci"][0], attacks[n]["auc_ci"][0],
                                       attacks[n]["auc"], [-ord(c) for c in n]))


def simultaneous_confidence(*, confidence: float, num_attacks: int) -> float:
    """1 - (1 - confidence) / k: the per-interval confidence at which k intervals hold
    together with probability >= ``confidence`` (Bonferroni)."""
    if num_attacks < 1:
        raise ValueError(f"num_attacks: must be >= 1; got {num_attacks}")
    return 1 - (1 - confidence) / num_attacks
