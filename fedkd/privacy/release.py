"""A release mechanism with a guarantee: k-ary randomized response on each released label.

Shielding by temperature and logit noise (:mod:`fedkd.shielding`) keeps the top class, so
label-only attacks (Choquette-Choo et al., ICML 2021, "Label-Only Membership Inference
Attacks") see through it. Here the site releases, for each public example x of the round,
only a label drawn by *k-ary randomized response* from its own top-1 prediction
y(x) = argmax_c K(x)_c over K classes (Warner 1965, "Randomized Response: A Survey
Technique for Eliminating Evasive Answer Bias", JASA 60; the k-ary form of Kairouz, Oh,
Viswanath 2016, "Extremal Mechanisms for Local Differential Privacy"; applied to released
knowledge as in PrivateKT, Qi et al., Nat. Commun. 2023)::

    P[out = y(x)]       = e^eps / (e^eps + K - 1)
    P[out = c], c != y  = 1     / (e^eps + K - 1)      (uniform over the other K - 1 classes)

and the released knowledge row is the one-hot of ``out``, optionally smoothed:
(1 - s) onehot(out) + s / K (post-processing, free).

Guarantee. For any two values y, y' of the site's top-1 prediction on x and every output
o, P[o | y] / P[o | y'] <= (e^eps / (e^eps+K-1)) / (1 / (e^eps+K-1)) = e^eps, with
equality for o = y: the released label is eps-DP (pure, delta 0) with respect to the
site's prediction on x. Said precisely, the neighbouring relation is *label-level* on the
released prediction: two states of the site (any private data, any model) are neighbours
for x when they differ only in the top-1 label they would release on x. It holds whatever
the private data and without DP-SGD, so it bounds what any attacker (label-only or not)
learns from a released row about that prediction. It is not record-level DP on its own:
one private record may change the site's predictions on many public examples, and the
guarantee for that record is then eps times the number of rows it changed (group
privacy). Record-level protection comes from DP-SGD (:mod:`fedkd.privacy.accounting`).

Composition over rounds. A public example released in R rounds (fresh randomness each
round) is R * eps-DP by basic composition of pure DP (Dwork & Roth 2014, Thm 3.14); the
ledger charges R * eps, R = rounds released (an upper bound for a round that releases a
subset). Advanced composition would give about eps sqrt(2 R ln(1/delta')) + R eps (e^eps - 1)
at an extra delta', smaller only for many rounds of small eps; fedkd keeps the pure bound.

Composition with DP-SGD. Where both are on, the release reads the DP-trained model only,
so at record level it is post-processing: the record-level epsilon stays DP-SGD's. The
ledger also reports the sequential composition of the two mechanisms, eps_dp + eps_release
with delta_dp + 0 (:func:`combined_epsilon`), the bound one would state if the release read
the private data directly as in PATE (Papernot et al. 2018, "Scalable Private Learning with
PATE", which releases noisy vote histograms' argmax): sums of epsilons with deltas added are
always sound (Dwork & Roth 2014, Thm 3.16) and never below either part.

Pure functions on arrays; no Flower imports.
"""

from __future__ import annotations

import math

import numpy as np

RELEASES = ("none", "label-rr", "withhold")
"""Values of ``shield.release``: ``none`` (release the shielded probabilities),
``label-rr`` (k-ary randomized response on each row's top-1 label) or ``withhold`` (release
nothing on the chosen rows: the uniform row, which fusion reads as no evidence; eps = 0
there; needs ``shield.release-rows = "pii"``, since withholding every row releases nothing)."""

RELEASE_ROWS = ("all", "pii")
"""Values of ``shield.release-rows``, the rows the release mechanism acts on: ``all`` (every released
row) or ``pii`` (only rows whose public input has a PII-like match,
:func:`fedkd.shielding.pii_rows`, text data; the others are released as shielded
probabilities, with no guarantee). Targeted release. The choice of rows is a function of
the public inputs alone, so it reveals nothing about the site's data, and each chosen row
keeps the full eps-DP guarantee below; rows not chosen have none. It protects secrets that
look like personal data (numbers, digit runs, e-mail addresses, names after "this is" or
"my name is": the Secret Sharer's canaries are of this kind), the Swing Distillation idea
(Li et al. 2023: protect the examples that carry private information) with a guarantee
in place of a temperature; a secret the patterns miss is released as without label-rr."""


def _check(*, epsilon: float, num_classes: int) -> None:
    if not (isinstance(epsilon, (int, float, np.integer, np.floating)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"shield.release-epsilon must be a finite number > 0; got {epsilon!r}")
    if not (isinstance(num_classes, (int, np.integer)) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")


def keep_probability(*, epsilon: float, num_classes: int) -> float:
    """P[out = y] = e^eps / (e^eps + K - 1), computed as 1 / (1 + (K - 1) e^-eps) (no overflow)."""
    _check(epsilon=epsilon, num_classes=num_classes)
    return 1.0 / (1.0 + (num_classes - 1) * math.exp(-epsilon))


def response_distribution(*, label: int, epsilon: float, num_classes: int) -> np.ndarray:
    """The output distribution [K] of k-ary randomized response on ``label`` (module doc)."""
    keep = keep_probability(epsilon=epsilon, num_classes=num_classes)
    dist = np.full(num_classes, (1.0 - keep) / (num_classes - 1))
    dist[label] = keep
    return dist


def randomized_response(labels: np.ndarray, *, epsilon: float, num_classes: int,
                        rng: np.random.Generator) -> np.ndarray:
    """Released labels [P] from true labels [P] in 0..K-1: each kept with probability
    :func:`keep_probability`, else replaced by one of the other K - 1 classes uniformly
    (drawn as (y + U) mod K, U uniform on 1..K-1)."""
    _check(epsilon=epsilon, num_classes=num_classes)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"labels must be a vector of classes in 0..{num_classes - 1}")
    keep = rng.random(labels.shape) < keep_probability(epsilon=epsilon, num_classes=num_classes)
    other = (labels + rng.integers(1, num_classes, size=labels.shape)) % num_classes
    return np.where(keep, labels, other)


def label_release(probs: np.ndarray, *, epsilon: float, rng: np.random.Generator,
                  smoothing: float = 0.0, rows: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Released rows [P, K] from probability rows [P, K]: (1 - s) onehot(RR(argmax_c p_c)) + s / K,
    and the fraction of rows whose released label differs from the top-1. Ties in the
    argmax go to the lowest class index. ``rows`` ([P] bool, default all): only these rows
    are randomized; the others are returned as they came (``shield.release-rows``), and the
    randomness drawn does not depend on which rows they are (the same draws for every P)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape [P, K]; got {probs.shape}")
    if not (0.0 <= smoothing < 1.0):
        raise ValueError(f"shield.release-smoothing must be in [0, 1); got {smoothing!r}")
    chosen = np.ones(len(probs), dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    if chosen.shape != (len(probs),):
        raise ValueError(f"rows must be a [P] = [{len(probs)}] boolean mask; got shape {chosen.shape}")
    num_classes = probs.shape[1]
    top = probs.argmax(axis=1)
    released = randomized_response(top, epsilon=epsilon, num_classes=num_classes, rng=rng)
    onehots = np.full(probs.shape, smoothing / num_classes)
    onehots[np.arange(len(onehots)), released] += 1.0 - smoothing
    out = np.where(chosen[:, None], onehots, probs)
    flipped = chosen & (released != top)
    return out, float(np.mean(flipped)) if len(top) else 0.0


def withhold_rows(probs: np.ndarray, *, rows: np.ndarray) -> np.ndarray:
    """``probs`` [P, K] with the ``rows`` ([P] bool) replaced by the uniform row 1/K: nothing
    is released there (``shield.release = "withhold"``). The output on a chosen row is the
    same whatever the site's data, so it is 0-DP there; fusion marks a uniform row as not
    informative (:func:`fedkd.fusion.informative_rows`), and the sites skip such rows when
    they distil (:func:`fedkd.federation.site.local_round`)."""
    probs = np.asarray(probs, dtype=np.float64)
    chosen = np.asarray(rows, dtype=bool)
    if probs.ndim != 2 or chosen.shape != (len(probs),):
        raise ValueError(f"need probs [P, K] and a [P] boolean mask; got {probs.shape} and {chosen.shape}")
    return np.where(chosen[:, None], 1.0 / probs.shape[1], probs)


def epsilon_per_round(*, release: str, epsilon: float) -> float:
    """The epsilon one round's release costs on each row it acts on: ``epsilon`` for
    ``label-rr``, 0 for ``withhold`` (nothing released there) and for ``none`` (no release
    mechanism, no guarantee)."""
    if release not in RELEASES:
        raise ValueError(f"shield.release must be one of {', '.join(RELEASES)}; got {release!r}")
    return float(epsilon) if release == "label-rr" else 0.0


def mechanism_epsilon(*, epsilon: float, num_classes: int) -> float:
    """The mechanism's epsilon from its output distributions: max over outputs o and label
    pairs (y, y') of ln P[o | y] / P[o | y'] (= ``epsilon``, module doc)."""
    dists = np.stack([response_distribution(label=y, epsilon=epsilon, num_classes=num_classes)
                      for y in range(num_classes)])
    return float(np.max(np.log(dists.max(axis=0)) - np.log(dists.min(axis=0))))


def composed_release_epsilon(*, epsilon_per_round: float, rounds: int) -> float:
    """Basic composition of pure eps-DP over ``rounds`` releases: rounds * eps (module doc)."""
    if not (isinstance(rounds, (int, np.integer)) and rounds >= 0):
        raise ValueError(f"rounds must be an integer >= 0; got {rounds!r}")
    return float(rounds) * float(epsilon_per_round)


def combined_epsilon(*, dp_epsilon: float, dp_delta: float, release_epsilon: float) -> tuple[float, float]:
    """Sequential composition of DP-SGD's (eps_dp, delta_dp) and the release's (eps_r, 0):
    (eps_dp + eps_r, delta_dp), always sound and never below either part (module doc)."""
    for name, value in (("dp_epsilon", dp_epsilon), ("dp_delta", dp_delta), ("release_epsilon", release_epsilon)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(dp_epsilon) + float(release_epsilon), float(dp_delta)


def release_ledger(*, previous: dict | None, epsilon_per_round: float, site_claim: float | None = None,
                   rows: str = "all", release: str = "label-rr") -> dict:
    """The release fields of a site's ledger row after one more accepted round: ``release``,
    ``release-epsilon-round``, ``release-rounds`` (the server's own count), ``release-epsilon``
    = max(rounds * eps, the site's claim, the previous row's), ``release-delta`` 0, ``release``
    the mechanism (:data:`RELEASES`), and
    ``release-rows`` (the rows the epsilon covers, :data:`RELEASE_ROWS`). Never
    decreases. :func:`with_combined` adds the composition with DP-SGD."""
    if rows not in RELEASE_ROWS:
        raise ValueError(f"shield.release-rows must be one of {', '.join(RELEASE_ROWS)}; got {rows!r}")
    prev = dict(previous or {})
    rounds = int(prev.get("release-rounds", 0)) + 1
    spent = max(composed_release_epsilon(epsilon_per_round=epsilon_per_round, rounds=rounds),
                float(site_claim or 0.0), float(prev.get("release-epsilon", 0.0)))
    if release not in RELEASES[1:]:
        raise ValueError(f"a release ledger needs a release mechanism ({', '.join(RELEASES[1:])}); got {release!r}")
    return {"release": release, "release-epsilon-round": float(epsilon_per_round),
            "release-rounds": rounds, "release-epsilon": spent, "release-delta": 0.0, "release-rows": rows}


def with_combined(row: dict) -> dict:
    """``row`` with ``combined-epsilon`` / ``combined-delta`` when it holds DP-SGD
    (``epsilon-spent``, ``delta``) figures and pure-DP ones beside them: the release's
    (``release-epsilon``) and DP model selection's (``selection-epsilon``,
    :mod:`fedkd.privacy.selection`), whose sum is their own basic composition."""
    pure = [row[key] for key in ("release-epsilon", "selection-epsilon") if key in row]
    if "epsilon-spent" in row and pure:
        eps, delta = combined_epsilon(dp_epsilon=row["epsilon-spent"], dp_delta=row["delta"],
                                      release_epsilon=float(sum(pure)))
        row = {**row, "combined-epsilon": eps, "combined-delta": delta}
    return row
