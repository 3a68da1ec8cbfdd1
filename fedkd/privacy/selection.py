"""DP model selection: report-noisy-max on a site's private validation split.

A DP site may choose what it keeps after a round (its private model alone, or the private
model distilled on the fused knowledge or on the consensus) by how each candidate does on
its *private* validation split. Reading that split is a use of private data that DP-SGD
does not cover, so the choice itself must be DP. fedkd uses **report-noisy-max** (Dwork &
Roth 2014, "The Algorithmic Foundations of Differential Privacy", Claim 3.9)::

    choice = argmax_k ( u_k(D_val) + Lap(1 / eps_d) ),   u_k = mean over the rounds so far of
                                                         candidate k's correct validation answers

Each u_k is a mean of counts: adding one validation example raises every round's count of
every candidate by 0 or 1, so u_k rises by a number in [0, 1] (and removing one lowers it
likewise): the queries are monotone with sensitivity 1, the condition of Claim 3.9, and the
released index is eps_d-DP for the validation records. Candidates are trained from the
model as it stood after the round's DP-SGD step, on public data only, so for a training
record the choice is post-processing of DP-SGD. Only the index leaves the site (the counts,
noisy or not, never do).

Budget. The run's selection budget eps_sel (``privacy.selection-epsilon``) is split evenly
over the ``privacy.selection-rounds`` decisions (:func:`decision_rounds`): eps_d = eps_sel / k,
and the k decisions compose to eps_sel by basic composition of pure DP (Dwork & Roth 2014,
Thm 3.14). Between decisions the site keeps its last choice (no data read, nothing spent).
The ledger charges eps_sel beside DP-SGD's epsilon and composes the two like the label
release (:func:`fedkd.privacy.release.combined_epsilon`: sums of epsilons, deltas added;
always sound, never below either part); the privacy plan calibrates DP-SGD's noise for
target - eps_sel (:func:`dp_sgd_target`) so that the composition ends at or under the target.

Pure functions; no Flower imports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SELECTIONS = ("off", "noisy-max")
"""Values of ``privacy.selection``."""


def _check_epsilon(epsilon: float) -> None:
    if not (isinstance(epsilon, (int, float, np.integer, np.floating)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"selection epsilon must be a finite number > 0; got {epsilon!r}")


def report_noisy_max(scores: Sequence[float], *, epsilon: float, rng: np.random.Generator) -> int:
    """argmax_k (scores[k] + Lap(1 / ``epsilon``)), each noise drawn independently; scores of
    sensitivity 1 and monotone (module doc): epsilon-DP."""
    _check_epsilon(epsilon)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0 or not np.isfinite(scores).all():
        raise ValueError(f"scores must be a non-empty vector of finite numbers; got {scores!r}")
    return int(np.argmax(scores + rng.laplace(0.0, 1.0 / epsilon, size=scores.shape)))


def decision_rounds(*, rounds: int, decisions: int) -> tuple[int, ...]:
    """The rounds (1-based) at which a site decides: ``decisions`` rounds spread evenly over
    rounds 2..``rounds`` (round 1 has no fused knowledge), the last one the final round:
    round 1 + ceil(m (rounds - 1) / decisions) for m = 1..decisions (fewer if rounds are fewer)."""
    if not (isinstance(rounds, (int, np.integer)) and rounds >= 1):
        raise ValueError(f"rounds must be an integer >= 1; got {rounds!r}")
    if not (isinstance(decisions, (int, np.integer)) and decisions >= 1):
        raise ValueError(f"privacy.selection-rounds must be an integer >= 1; got {decisions!r}")
    return tuple(sorted({1 + math.ceil(m * (rounds - 1) / decisions) for m in range(1, decisions + 1)} - {1}))


def decision_epsilon(*, selection_epsilon: float, rounds: int, decisions: int) -> float:
    """eps_d = eps_sel / (number of decision rounds): the k decisions compose to eps_sel."""
    _check_epsilon(selection_epsilon)
    count = len(decision_rounds(rounds=rounds, decisions=decisions))
    return float(selection_epsilon) / max(count, 1)


def dp_sgd_target(*, target_epsilon: float, selection_epsilon: float) -> float:
    """DP-SGD's share of the site's budget, target - eps_sel (> 0, else ValueError naming the keys)."""
    if not selection_epsilon < target_epsilon:
        raise ValueError(f"privacy.selection-epsilon must be below privacy.target-epsilon ({target_epsilon:g}); "
                         f"got {selection_epsilon:g}")
    return float(target_epsilon) - float(selection_epsilon)


def selection_ledger(*, previous: dict | None, selection_epsilon: float, site_claim: float | None = None) -> dict:
    """The selection fields of a site's ledger row, kept by the server: ``selection`` and
    ``selection-epsilon`` = max(eps_sel, the site's claim, the previous row's), i.e. the whole
    run's selection budget charged from the first round on (an upper bound on what the
    decisions so far spent, and what they will have spent at the end), ``selection-delta`` 0."""
    prev = dict(previous or {})
    spent = max(float(selection_epsilon), float(site_claim or 0.0), float(prev.get("selection-epsilon", 0.0)))
    return {"selection": "noisy-max", "selection-epsilon": spent, "selection-delta": 0.0}
