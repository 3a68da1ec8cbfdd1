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

Attacks are looked up by name in :data:`ATTACKS` (``loss``, ``lira-offline``,
``lira-online``); each takes keyword arguments ``logits``, ``labels`` and, for LiRA,
``reference_logits`` [R, n, C] and ``in_mask`` [R, n].
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


def score(
    name: str, *, logits: np.ndarray, labels: np.ndarray,
    reference_logits: np.ndarray | None = None, in_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Scores of attack ``name`` (one of :data:`ATTACKS`)."""
    return ATTACKS.get(name)(logits=logits, labels=labels, reference_logits=reference_logits, in_mask=in_mask)
