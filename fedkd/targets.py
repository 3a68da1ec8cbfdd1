"""A site's choice of distillation target: its own knowledge, the fused knowledge, or a blend.

Fused knowledge F_i is only worth distilling when it helps site i *on its own data*: under
strong label skew the federation's view can pull a site away from the classes it sees
(docs/benchmarks.md: local training beat every fusion method at Dirichlet alpha <= 0.1).
So each round a site with ``train.target-choice = "validated"`` tries candidate targets

    T_lambda(x) = (1 - lambda) K_i(x) + lambda F_i(x),    lambda in ``train.blend-candidates``

(K_i: its own model's softmax on the public positions F_i covers, before this round's
training; lambda = 0 means no distillation at all, i.e. local training only) and, with
``fusion.consensus``, the federation's consensus G (DS-FL's sharpened mean of every site's
knowledge, sent beside F_i: the strongest target when labels are mixed) or its unsharpened
mean M (``mean``: recovered on the site from G, :func:`unsharpen`; what fusion method
``mean`` sends, the stronger target where the sites' models are weak), trains one
copy of its model per candidate from the same start and seed, scores each on its private
validation split by the negative log-likelihood, and keeps the candidate whose score
*pooled over the rounds so far* is lowest (validation splits are 4-54 examples here, so one
round's score is noisy: pooling compares candidates on every round's paired runs). Ties go to
the larger lambda (``train.target-margin`` > 0: the best candidate must also beat G by a
paired test on the per-example NLLs, :func:`margin_choice`). This is the validated mixing of APFL / FedALA / FedFomo, reduced to a
small grid and a paired, pooled score. Since ALMA averages the sites and each site can fall
back to lambda = 0, a validated site should not lose to local training on average.

The functions here are pure; :func:`fedkd.federation.site.local_round` runs the candidates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedkd.data import ArrayDataset
from fedkd.distillation import as_input_tensor
from fedkd.fusion import simplex_projection

TARGET_CHOICES = ("fused", "validated")


def blend(own: np.ndarray, fused: np.ndarray, lam: float) -> np.ndarray:
    """T_lambda = (1 - lambda) own + lambda fused, rows of probabilities [P, C]."""
    return (1.0 - lam) * np.asarray(own, dtype=np.float64) + lam * np.asarray(fused, dtype=np.float64)


def validation_nlls(model: nn.Module, data: ArrayDataset) -> np.ndarray:
    """Each example's negative log-likelihood -log p(y | x) under ``model``, ``[len(data)]``."""
    if len(data) == 0:
        return np.zeros(0)
    return _cross_entropy(model, data, reduction="none").double().numpy()


def validation_nll(model: nn.Module, data: ArrayDataset) -> float:
    """Mean negative log-likelihood -log p(y | x) of ``model`` on ``data`` (nan when empty)."""
    if len(data) == 0:
        return float("nan")
    return float(_cross_entropy(model, data, reduction="mean"))


def _cross_entropy(model: nn.Module, data: ArrayDataset, *, reduction: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits = model(as_input_tensor(data.x))
        return torch.nn.functional.cross_entropy(logits, torch.as_tensor(data.y, dtype=torch.long), reduction=reduction)


CONSENSUS = "consensus"
"""The candidate that distils the federation's consensus G (``fusion.consensus``) instead of F_i."""

LOCAL_CONSENSUS = "consensus-local"
"""The consensus under the site's own label prior: G(x, c) pi_i(c) / sum_c' G(x, c') pi_i(c')
(Bayes' rule for a label shift; pi_i from the site's own training labels, add-one smoothed)."""

MEAN = "mean"
"""The consensus before sharpening, M with G = softmax(M / T) (the masked mean of every site's
knowledge, what fusion method ``mean`` sends): recovered on the site from G (:func:`unsharpen`),
so it costs no wire bytes."""

LOCAL_MEAN = "mean-local"
"""M under the site's own label prior, as ``consensus-local`` is for G."""

NAMED_CANDIDATES = (CONSENSUS, LOCAL_CONSENSUS, MEAN, LOCAL_MEAN)

Candidate = float | str

UNSHARPEN_FLOOR = 1e-300
"""Probabilities below this (zeros of the wire's rounding) count as this in :func:`unsharpen`."""


def unsharpen(probs: np.ndarray, temperature: float | None) -> np.ndarray:
    """The rows M [P, C] that ``fusion.sharpen`` took to ``probs`` = G = softmax(M / T):
    M = T log G + k, k the shift that makes each row sum to 1, i.e. the simplex projection of
    T log G (:func:`simplex_projection`). Exact for exact G: every probability row M has
    log G = M / T - const. On the wire's rounding: float16 (relative 2^-11) moves M by about
    T 2^-11; uint8 rounds G's small entries to 0 (floored at :data:`UNSHARPEN_FLOOR`), and the
    projection sets those classes of M to 0 (an approximation). ``temperature`` None: ``probs``
    were never sharpened (the DP votes consensus) and come back as they are."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature is None:
        return probs
    if not temperature > 0:
        raise ValueError(f"unsharpen temperature must be > 0 or None; got {temperature!r}")
    return simplex_projection(temperature * np.log(np.maximum(probs, UNSHARPEN_FLOOR)))


def local_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """pi_i(c) = (n_c + 1) / (n + C): the site's label frequencies, add-one smoothed."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return (counts + 1.0) / (counts.sum() + num_classes)


def under_prior(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Rows p(c) pi(c) / sum_c' p(c') pi(c') [P, C] (a label-shift correction)."""
    shifted = np.asarray(probs, dtype=np.float64) * prior[None, :]
    return shifted / shifted.sum(axis=1, keepdims=True)


def parse_candidates(text: str) -> tuple[Candidate, ...]:
    """``"0,0.5,1,consensus"`` -> (0.0, 0.5, 1.0, "consensus"): blend weights in [0, 1] and
    optionally the named candidates (:data:`NAMED_CANDIDATES`: the consensus, the unsharpened
    mean, each also under the local prior); no repeats, at least one."""
    values: list[Candidate] = []
    for word in (w.strip() for w in str(text).split(",")):
        if not word:
            continue
        values.append(word if word in NAMED_CANDIDATES else float(word))
    numbers = [v for v in values if not isinstance(v, str)]
    if not values or any(not 0.0 <= v <= 1.0 for v in numbers) or len(set(values)) != len(values):
        raise ValueError("blend candidates must be distinct numbers in [0, 1] or one of "
                         f"{', '.join(NAMED_CANDIDATES)}; got {text!r}")
    return tuple(values)


def pooled_choice(scores: Mapping[str, Sequence[float]], candidates: Sequence[Candidate], *,
                  by: Sequence[str] = ("",)) -> Candidate:
    """The candidate with the lowest mean score over the rounds recorded in ``scores``
    (score key -> [sum of scores, rounds]); ties (and candidates never scored) go to the
    one listed last (e.g. the largest lambda of ``0,0.5,1``).

    ``by`` lists score families as key prefixes, compared in order: the default ``("",)``
    is the validation NLL alone (keys ``"0"``, ``"1"``, ``"consensus"``...); ``(ERROR, "")``
    compares the pooled validation error first (keys ``"error:0"``...) and breaks its ties
    (frequent on splits of 4-54 examples) by the pooled NLL."""
    def mean(prefix: str, lam: Candidate) -> float:
        total, count = scores.get(prefix + _key(lam), (0.0, 0))
        return total / count if count else math.inf

    best, best_means = None, None
    for lam in reversed(list(candidates)):
        means = [mean(prefix, lam) for prefix in by]
        if best is None or _lexically_lower(means, best_means):
            best, best_means = lam, means
    return best


def _lexically_lower(a: Sequence[float], b: Sequence[float]) -> bool:
    """a < b comparing element by element, equal within 1e-12 moving on to the next."""
    for x, y in zip(a, b):
        if x < y - 1e-12:
            return True
        if x > y + 1e-12:
            return False
    return False


def reference_candidate(candidates: Sequence[Candidate]) -> Candidate:
    """The federation's own target among ``candidates``, the one a margin choice keeps unless
    another beats it (:func:`margin_choice`): the consensus G where it is a candidate, else
    the largest lambda (F_i at lambda = 1)."""
    if CONSENSUS in candidates:
        return CONSENSUS
    numbers = [c for c in candidates if not isinstance(c, str)]
    return max(numbers) if numbers else candidates[-1]


EXAMPLES = "x:"
"""Key prefix of a candidate's per-example validation NLL summed over rounds,
``[rounds, s_1, ..., s_n]`` (:func:`record_example_scores`, ``train.target-margin`` > 0)."""


def record_example_scores(scores: Mapping[str, Sequence[float]],
                          round_nlls: Mapping[Candidate, np.ndarray]) -> dict[str, list[float]]:
    """``scores`` with this round's per-example NLLs of each candidate added under
    :data:`EXAMPLES` + candidate (a record whose length no longer matches, e.g. a validation
    split that changed, starts again; a round with a non-finite NLL is not recorded)."""
    out = {k: list(v) for k, v in scores.items()}
    for lam, values in round_nlls.items():
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0 or not np.all(np.isfinite(values)):
            continue
        record = out.get(EXAMPLES + _key(lam))
        if record is None or len(record) != values.size + 1:
            record = [0.0] * (values.size + 1)
        out[EXAMPLES + _key(lam)] = [record[0] + 1.0, *(np.asarray(record[1:]) + values).tolist()]
    return out


def margin_choice(scores: Mapping[str, Sequence[float]], candidates: Sequence[Candidate], *,
                  margin: float) -> Candidate:
    """Keep the federation's target unless the best candidate beats it with confidence.

    With r = :func:`reference_candidate` and, from :func:`record_example_scores`, each
    validation example's NLL under candidate c averaged over the rounds c was scored,
    nll_c(x), the paired differences d_c(x) = nll_c(x) - nll_r(x) over the n validation
    examples give their mean m_c (m_r = 0) and standard error se_c = sd(d_c) / sqrt(n)
    (sample sd). The best candidate b = argmin_c m_c (the lowest pooled NLL, as
    :func:`pooled_choice` ranks them) is kept only if

        m_b + margin se_b < 0,    else r

    i.e. a site leaves the federation's target only when the upper confidence bound of the
    best candidate's NLL change is an improvement (a one-sided paired z-test at ``margin``
    standard errors; it shrinks the choice towards r rather than re-ranking by the bound,
    which would favour low-variance candidates over good ones). At margin 0 it is the lowest pooled NLL with ties to r. Validation splits of
    4-54 examples rank candidates a few test examples apart by chance (docs/benchmarks.md);
    the margin makes chance favour the federation's target, while at strong skew a local
    candidate's gain is large enough to pass. Falls back to :func:`pooled_choice` where the
    reference has no record."""
    reference = reference_candidate(candidates)
    ref = scores.get(EXAMPLES + _key(reference))
    if ref is None or ref[0] <= 0:
        return pooled_choice(scores, candidates)
    ref_mean = np.asarray(ref[1:]) / ref[0]
    best, best_mean, best_se = reference, 0.0, 0.0
    for lam in candidates:
        record = scores.get(EXAMPLES + _key(lam))
        if lam == reference or record is None or record[0] <= 0 or len(record) != len(ref):
            continue
        d = np.asarray(record[1:]) / record[0] - ref_mean
        if float(d.mean()) < best_mean - 1e-12:
            best, best_mean = lam, float(d.mean())
            best_se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    return best if best_mean + margin * best_se < 0 else reference


ERROR = "error:"
"""Key prefix of the pooled validation error rate (``train.target-score = "error"``)."""


def record_scores(scores: Mapping[str, Sequence[float]], round_scores: Mapping[Candidate, float], *,
                  prefix: str = "") -> dict[str, list[float]]:
    """``scores`` with this round's (finite) score of each candidate added (under keys
    ``prefix + candidate``: ``""`` for the NLL, :data:`ERROR` for the error rate)."""
    out = {k: list(v) for k, v in scores.items()}
    for lam, value in round_scores.items():
        if math.isfinite(value):
            total, count = out.get(prefix + _key(lam), [0.0, 0])
            out[prefix + _key(lam)] = [float(total) + value, int(count) + 1]
    return out


def _key(lam: Candidate) -> str:
    return lam if isinstance(lam, str) else f"{lam:g}"
