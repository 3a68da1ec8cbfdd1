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
(stratified, so every replicate has both classes), ``num_bootstrap`` replicates, seeded.

>>> import numpy as np
>>> m = attack_metrics(scores=np.array([3.0, 2.0, 1.0, 0.0]), labels=np.array([1, 1, 0, 0]),
...                    num_bootstrap=50)
>>> (m.auc, m.advantage)
(1.0, 1.0)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

LOW_FPRS = (0.01, 0.001)
"""The false-positive rates at which TPR is reported."""


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


def _point_metrics(scores: np.ndarray, labels: np.ndarray, *, exact: bool = True) -> dict[str, float]:
    fpr, tpr, _ = roc_curve(labels, scores)
    # the area under roc_curve's points equals roc_auc_score (ties included); bootstrap
    # replicates use it and skip a second pass over the data
    auc = roc_auc_score(labels, scores) if exact else np.trapezoid(tpr, fpr)
    out = {"auc": float(auc), "advantage": float(np.max(tpr - fpr))}
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
    num_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> AttackMetrics:
    """AUC, TPR at 1% and 0.1% FPR and advantage of ``scores`` [n] against ``labels`` [n]
    (1 = member), each with a percentile-bootstrap interval at ``confidence``."""
    scores, labels = _check(scores, labels)
    point = _point_metrics(scores, labels)
    members, others = np.flatnonzero(labels), np.flatnonzero(~labels)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(num_bootstrap):
        idx = np.concatenate([rng.choice(members, len(members)), rng.choice(others, len(others))])
        for key, value in _point_metrics(scores[idx], labels[idx], exact=False).items():
            draws[key].append(value)
    tail = (1 - confidence) / 2 * 100

    def ci(key: str) -> tuple[float, float]:
        if not draws[key]:
            return (point[key], point[key])
        low, high = np.percentile(draws[key], [tail, 100 - tail])
        return (float(low), float(high))

    return AttackMetrics(
        auc=point["auc"], auc_ci=ci("auc"),
        tpr_at_1pct=point["tpr@0.01"], tpr_at_1pct_ci=ci("tpr@0.01"),
        tpr_at_01pct=point["tpr@0.001"], tpr_at_01pct_ci=ci("tpr@0.001"),
        advantage=point["advantage"], advantage_ci=ci("advantage"),
        members=int(len(members)), non_members=int(len(others)),
    )


def roc_points(*, scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the ROC curve (for plots)."""
    scores, labels = _check(scores, labels)
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr
