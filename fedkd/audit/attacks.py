"""Membership-inference attacks: a score per candidate example (higher = "member").

All attacks read a model's logits z(x) [n, C] on the candidates and their labels y [n].

* **LOSS** (Yeom et al. 2018): score = -CE(z(x), y) = log softmax(z(x))_y. Training
  examples have lower loss; the threshold is swept by the ROC.
* **Logit-scaled confidence** (Carlini et al. 2022, Sec. IV-C): with p = softmax(z)_y,
  phi = log(p / (1 - p)) = z_y - logsumexp_{c != y} z_c (computed in that stable form).
  phi is close to Gaussian across training runs, which LiRA relies on.
* **LiRA** (Carlini et al. 2022, "Membership Inference Attacks From First Principles",
  Alg. 1). Reference models are trained on random halves of a population pool that holds
  the candidates (:func:`reference_masks`), so each candidate is IN for about half of them.
  For candidate x with target confidence phi:

  - *online*: fit N(mu_in, s_in^2) to phi over reference models that trained on x and
    N(mu_out, s_out^2) over those that did not; score = log N(phi; mu_in, s_in) -
    log N(phi; mu_out, s_out), the log likelihood ratio.
  - *offline*: OUT models only; score = log Phi((phi - mu_out) / s_out), i.e. the
    one-sided test "phi is larger than an OUT model would give" (Carlini's offline LiRA).

  With few reference models per-example variances are unreliable; ``fixed_variance=True``
  (Carlini's recommendation below 64 models) uses one variance per side pooled over all
  candidates. A candidate with no IN (or no OUT) reference falls back on the pooled mean
  shift mu_in - mu_out.

* **RMIA** (Zarifzadeh, Liu, Cheng, Shokri, "Low-Cost High-Power Membership Inference
  Attacks", ICML 2024, Eq. 3-4 and Sec. 3; ML Privacy Meter's default attack). With
  p(x|theta) = softmax(z(x))_y the target model's probability of the label and p(x) its
  average over models trained on population data, the likelihood ratio of x against a
  population sample z is LR(x, z) = (p(x|theta) / p(x)) / (p(z|theta) / p(z)), and

      score(x) = Pr_z[ LR(x, z) >= gamma ]      over population samples z (default gamma 1).

  The population z is data neither the target nor any reference trained on (``fedkd
  audit``: the federation's global test split). p(x) comes from the same reference models
  LiRA uses:

  - *offline* (``rmia``): OUT references only, p(x) = 1/2 ((1 + a) p_OUT(x) + (1 - a)),
    the paper's linear correction for the missing IN models (Sec. 3, "offline"); a =
    ``offline_a``, 0.3 by default (the value ML Privacy Meter's RMIA examples use; the
    paper tunes a per dataset on a reference model). The z are OUT of every reference,
    so p(z) gets the same correction.
  - *online* (``rmia-online``): p(x) = 1/2 (p_IN(x) + p_OUT(x)); p(z) = p_OUT(z) (z is
    never IN; as ML Privacy Meter's ``run_rmia``).

  Cost: nothing beyond the references' and the target's predictions on the candidates and
  the population. With a fixed gamma the score is the population CDF of the ratio
  r(x) = p(x|theta)/p(x) evaluated at r(x)/gamma, so it ranks candidates by r(x); the
  population sets the resolution (candidates beyond every population ratio tie).
  Candidates without OUT (or IN) references fall back on the pooled mean shift, as LiRA.

* **Trained attack** (``trained-rf``, ``trained-gb``; the black-box classifier attack of
  Shokri et al. 2017 as IBM ART's ``MembershipInferenceBlackBox`` runs it with a random
  forest): a classifier learns membership from the target model's output on the
  candidates. Features per candidate (:func:`output_features`): the log-probabilities
  sorted in decreasing order (C values), phi, the rank of the label among the classes and
  the entropy of the prediction. The attacker is assumed to know the membership of part
  of the candidates (a stronger threat model than LOSS, LiRA and RMIA, which know none):
  cross-fitting over ``folds`` stratified folds (2: train on one half, score the other,
  swap) gives every candidate an out-of-fold score, P[member | features] from a classifier
  that never saw that candidate. Cost: ``folds`` fits of a 300-tree forest (or gradient
  boosting) on a few hundred rows; no reference models.

Attacks are looked up by name in :data:`ATTACKS` (``loss``, ``lira-offline``,
``lira-online``, ``rmia``, ``rmia-online``, ``trained-rf``, ``trained-gb``); each takes
keyword arguments ``logits``, ``labels`` and, for LiRA and RMIA, ``reference_logits``
[R, n, C] and ``in_mask`` [R, n]; RMIA also ``population_logits`` [m, C],
``population_labels`` [m] and ``population_reference_logits`` [R, m, C]; the trained
attacks ``membership`` [n] (the known inclusion bits they learn from) and ``seed``.
:data:`NEEDS` says which attack needs which.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import logsumexp
from scipy.stats import norm

from fedkd.registry import Registry

EPS_VAR = 1e-6
"""Floor of a fitted variance (a confidence that never changes would give a zero variance)."""

Attack = Callable[..., np.ndarray]
ATTACKS: Registry[Attack] = Registry("membership attack")


def _logits_labels(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim < 2 or logits.shape[-2] != labels.shape[-1]:
        raise ValueError(f"logits [.., n, C] and labels [n] do not match: {logits.shape} vs {labels.shape}")
    return logits, labels


def log_prob_of_label(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log softmax(z)_y per example; ``logits`` [..., n, C] -> [..., n]."""
    logits, labels = _logits_labels(logits, labels)
    picked = np.take_along_axis(logits, np.broadcast_to(labels[..., None], logits.shape[:-1] + (1,)), -1)[..., 0]
    return picked - logsumexp(logits, axis=-1)


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi = z_y - logsumexp_{c != y} z_c = log(p_y / (1 - p_y)); [..., n, C] -> [..., n]."""
    logits, labels = _logits_labels(logits, labels)
    idx = np.broadcast_to(labels[..., None], logits.shape[:-1] + (1,))
    picked = np.take_along_axis(logits, idx, -1)[..., 0]
    others = logits.copy()
    np.put_along_axis(others, idx, -np.inf, -1)
    return picked - logsumexp(others, axis=-1)


@ATTACKS.register("loss")
def loss_attack(*, logits: np.ndarray, labels: np.ndarray, **_: object) -> np.ndarray:
    """score = -CE(z, y) (LOSS threshold attack)."""
    return log_prob_of_label(logits, labels)


def _fit(conf: np.ndarray, mask: np.ndarray, fixed_variance: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-candidate mean and std of ``conf`` [R, n] over the references where ``mask``;
    also the count per candidate."""
    count = mask.sum(axis=0)
    total = np.where(mask, conf, 0.0).sum(axis=0)
    mean = np.divide(total, count, out=np.full(conf.shape[1], np.nan), where=count > 0)
    dev = np.where(mask, conf - mean[None, :], 0.0)
    if fixed_variance:
        pooled = (dev**2).sum() / max(int(count.sum()) - 1, 1)
        std = np.full(conf.shape[1], np.sqrt(max(pooled, EPS_VAR)))
    else:
        var = np.divide((dev**2).sum(axis=0), np.maximum(count - 1, 1))
        std = np.sqrt(np.maximum(var, EPS_VAR))
    return mean, std, count


def _lira_inputs(logits, labels, reference_logits, in_mask):  # noqa: ANN001, ANN202
    if reference_logits is None or in_mask is None:
        raise ValueError("LiRA needs reference_logits [R, n, C] and in_mask [R, n]")
    target = logit_confidence(logits, labels)
    conf = logit_confidence(reference_logits, labels)
    in_mask = np.asarray(in_mask, dtype=bool)
    if conf.shape != in_mask.shape or conf.shape[1] != target.shape[0]:
        raise ValueError(f"reference confidences {conf.shape}, in_mask {in_mask.shape} and "
                         f"{target.shape[0]} candidates do not match")
    return target, conf, in_mask


@ATTACKS.register("lira-offline")
def lira_offline(
    *, logits: np.ndarray, labels: np.ndarray, reference_logits: np.ndarray | None = None,
    in_mask: np.ndarray | None = None, fixed_variance: bool = True, **_: object,
) -> np.ndarray:
    """score = log Phi((phi - mu_out) / s_out) from OUT references only (module doc)."""
    target, conf, in_mask = _lira_inputs(logits, labels, reference_logits, in_mask)
    mu_out, s_out, n_out = _fit(conf, ~in_mask, fixed_variance)
    mu_out = np.where(n_out > 0, mu_out, np.nanmean(mu_out))
    return norm.logcdf((target - mu_out) / s_out)


@ATTACKS.register("lira-online")
def lira_online(
    *, logits: np.ndarray, labels: np.ndarray, reference_logits: np.ndarray | None = None,
    in_mask: np.ndarray | None = None, fixed_variance: bool = True, **_: object,
) -> np.ndarray:
    """score = log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out) (module doc)."""
    target, conf, in_mask = _lira_inputs(logits, labels, reference_logits, in_mask)
    mu_in, s_in, n_in = _fit(conf, in_mask, fixed_variance)
    mu_out, s_out, n_out = _fit(conf, ~in_mask, fixed_variance)
    both = (n_in > 0) & (n_out > 0)
    shift = float(np.mean(mu_in[both] - mu_out[both])) if both.any() else 0.0
    mu_in = np.where(n_in > 0, mu_in, mu_out + shift)
    mu_out = np.where(n_out > 0, mu_out, mu_in - shift)
    return norm.logpdf(target, mu_in, s_in) - norm.logpdf(target, mu_out, s_out)


def reference_masks(*, num_models: int, pool_size: int, seed: int) -> np.ndarray:
    """``[num_models, pool_size]`` bool: model r trains on a random half of the pool
    (exactly floor(n/2) examples, so every reference model sees as much data)."""
    rng = np.random.default_rng([seed, 7919])
    masks = np.zeros((num_models, pool_size), dtype=bool)
    for r in range(num_models):
        masks[r, rng.permutation(pool_size)[: pool_size // 2]] = True
    return masks


# ------------------------------------------------------------------ RMIA


def _mean_probs(probs: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``probs`` [R, n] over the references where ``mask``, and the count."""
    count = mask.sum(axis=0)
    total = np.where(mask, probs, 0.0).sum(axis=0)
    return np.divide(total, count, out=np.full(probs.shape[1], np.nan), where=count > 0), count


def rmia_scores(
    *, target_probs: np.ndarray, reference_probs: np.ndarray, in_mask: np.ndarray,
    population_target_probs: np.ndarray, population_reference_probs: np.ndarray,
    offline_a: float = 0.3, gamma: float = 1.0, online: bool = False,
) -> np.ndarray:
    """RMIA scores (module doc) from probabilities of the label: ``target_probs`` [n]
    (p(x|theta)), ``reference_probs`` [R, n] with ``in_mask`` [R, n], and the population's
    ``population_target_probs`` [m] and ``population_reference_probs`` [R, m] (every
    reference OUT). Returns score(x) = #{z : r(x) / r(z) >= gamma} / m in [0, 1]."""
    if not 0.0 <= offline_a <= 1.0:
        raise ValueError(f"offline_a: must be in [0, 1]; got {offline_a!r}")
    if not gamma > 0:
        raise ValueError(f"gamma: must be > 0; got {gamma!r}")
    target = np.asarray(target_probs, dtype=np.float64)
    refs = np.asarray(reference_probs, dtype=np.float64)
    in_mask = np.asarray(in_mask, dtype=bool)
    pop_target = np.asarray(population_target_probs, dtype=np.float64)
    pop_refs = np.asarray(population_reference_probs, dtype=np.float64)
    if refs.shape != in_mask.shape or refs.shape[1:] != target.shape:
        raise ValueError(f"reference probabilities {refs.shape}, in_mask {in_mask.shape} and "
                         f"{target.shape[0]} candidates do not match")
    if pop_refs.shape != (refs.shape[0],) + pop_target.shape or pop_target.size == 0:
        raise ValueError(f"population reference probabilities {pop_refs.shape} do not match "
                         f"{refs.shape[0]} references and {pop_target.shape[0]} population samples")
    p_out, n_out = _mean_probs(refs, ~in_mask)
    p_in, n_in = _mean_probs(refs, in_mask)
    both = (n_in > 0) & (n_out > 0)
    shift = float(np.mean(p_in[both] - p_out[both])) if both.any() else 0.0
    p_out = np.clip(np.where(n_out > 0, p_out, p_in - shift), 0.0, 1.0)
    p_in = np.clip(np.where(n_in > 0, p_in, p_out + shift), 0.0, 1.0)
    pop_out = pop_refs.mean(axis=0)
    if online:
        p_x, p_z = (p_in + p_out) / 2, pop_out
    else:
        p_x = ((1 + offline_a) * p_out + (1 - offline_a)) / 2
        p_z = ((1 + offline_a) * pop_out + (1 - offline_a)) / 2
    tiny = np.finfo(np.float64).tiny
    ratio_x = target / np.maximum(p_x, tiny)
    ratio_z = np.sort(np.maximum(pop_target, tiny) / np.maximum(p_z, tiny))
    # r(x) / r(z) >= gamma  <=>  r(z) <= r(x) / gamma  (every r(z) > 0)
    return np.searchsorted(ratio_z, ratio_x / gamma, side="right") / len(ratio_z)


def _rmia(online: bool):  # noqa: ANN202
    def attack(
        *, logits: np.ndarray, labels: np.ndarray, reference_logits: np.ndarray | None = None,
        in_mask: np.ndarray | None = None, population_logits: np.ndarray | None = None,
        population_labels: np.ndarray | None = None, population_reference_logits: np.ndarray | None = None,
        offline_a: float = 0.3, gamma: float = 1.0, **_: object,
    ) -> np.ndarray:
        if reference_logits is None or in_mask is None or population_logits is None \
                or population_labels is None or population_reference_logits is None:
            raise ValueError("RMIA needs reference_logits [R, n, C], in_mask [R, n], population_logits "
                             "[m, C], population_labels [m] and population_reference_logits [R, m, C]")
        _lira_inputs(logits, labels, reference_logits, in_mask)  # shape checks
        return rmia_scores(
            target_probs=np.exp(log_prob_of_label(logits, labels)),
            reference_probs=np.exp(log_prob_of_label(reference_logits, labels)),
            in_mask=in_mask,
            population_target_probs=np.exp(log_prob_of_label(population_logits, population_labels)),
            population_reference_probs=np.exp(log_prob_of_label(population_reference_logits, population_labels)),
            offline_a=offline_a, gamma=gamma, online=online,
        )

    attack.__doc__ = f"RMIA, {'online' if online else 'offline'} (module doc)."
    return attack


ATTACKS.register("rmia")(_rmia(online=False))
ATTACKS.register("rmia-online")(_rmia(online=True))


# ------------------------------------------------------------------ trained attack

CLASSIFIERS = ("random-forest", "gradient-boosting")


def output_features(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Black-box features of the target's output, [n, C + 3]: log softmax sorted in
    decreasing order, phi = log(p_y / (1 - p_y)), the label's rank (0 = top class) and
    the prediction's entropy (nats)."""
    logits, labels = _logits_labels(logits, labels)
    log_p = logits - logsumexp(logits, axis=-1, keepdims=True)
    ranked = -np.sort(-log_p, axis=-1)
    label_logit = np.take_along_axis(logits, labels[:, None], -1)
    rank = (logits > label_logit).sum(axis=-1)
    entropy = -(np.exp(log_p) * log_p).sum(axis=-1)
    return np.column_stack([ranked, logit_confidence(logits, labels), rank, entropy])


def trained_scores(
    *, features: np.ndarray, membership: np.ndarray, folds: int = 2, classifier: str = "random-forest",
    seed: int = 0,
) -> np.ndarray:
    """Out-of-fold P[member] [n] of a classifier trained on ``features`` [n, d] and the
    known ``membership`` [n] (module doc): stratified ``folds``-fold cross-fitting, so
    the score of candidate i comes from a model fitted on the other folds only."""
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.model_selection import StratifiedKFold

    features = np.asarray(features, dtype=np.float64)
    membership = np.asarray(membership).astype(bool)
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier: must be one of {', '.join(CLASSIFIERS)}; got {classifier!r}")
    if features.ndim != 2 or features.shape[0] != membership.shape[0]:
        raise ValueError(f"features [n, d] and membership [n] do not match: {features.shape} vs {membership.shape}")
    smaller = int(min(membership.sum(), (~membership).sum()))
    if not isinstance(folds, int) or folds < 2 or folds > smaller:
        raise ValueError(f"folds: must be an integer from 2 to the smaller class's count ({smaller}); got {folds!r}")
    out = np.full(len(membership), np.nan)
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, membership)
    for k, (fit, held) in enumerate(splits):
        if classifier == "random-forest":
            model = RandomForestClassifier(n_estimators=300, min_samples_leaf=2, random_state=seed + k, n_jobs=1)
        else:
            model = GradientBoostingClassifier(n_estimators=150, max_depth=2, learning_rate=0.05,
                                               subsample=0.8, random_state=seed + k)
        model.fit(features[fit], membership[fit])
        out[held] = model.predict_proba(features[held])[:, list(model.classes_).index(True)]
    return out


def _trained(classifier: str):  # noqa: ANN202
    def attack(*, logits: np.ndarray, labels: np.ndarray, membership: np.ndarray | None = None,
               folds: int = 2, seed: int = 0, **_: object) -> np.ndarray:
        if membership is None:
            raise ValueError("a trained attack needs membership [n]: the known inclusion bits it learns from")
        return trained_scores(features=output_features(logits, labels), membership=membership, folds=folds,
                              classifier=classifier, seed=seed)

    attack.__doc__ = f"Trained black-box attack, {classifier}, out-of-fold (module doc)."
    return attack


ATTACKS.register("trained-rf")(_trained("random-forest"))
ATTACKS.register("trained-gb")(_trained("gradient-boosting"))

NEEDS: dict[str, frozenset[str]] = {
    "loss": frozenset(),
    "lira-offline": frozenset({"references"}),
    "lira-online": frozenset({"references"}),
    "rmia": frozenset({"references", "population"}),
    "rmia-online": frozenset({"references", "population"}),
    "trained-rf": frozenset({"membership"}),
    "trained-gb": frozenset({"membership"}),
}
"""What each attack needs beyond the target's logits: reference models, population data
(with the references' predictions on it), or known membership bits."""


def score(name: str, **inputs: object) -> np.ndarray:
    """Scores of attack ``name`` (one of :data:`ATTACKS`); ``inputs`` as the module doc."""
    return ATTACKS.get(name)(**inputs)
