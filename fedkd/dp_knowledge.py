"""DP-aware knowledge: what DP-trained sites release is noisy and under-confident.

A site trained with DP-SGD (one noisy epoch a round on 20-300 examples) releases rows that
are close to uniform: on digits at epsilon 4 the mean entropy of a released row is 2.1-2.3
nats against log 10 = 2.30 at alpha 1 and 100 (0.3-1.0 at alpha 0.05-0.1, where a site
knows its one to three classes). The class-expert fusion of such rows,
F_i(x) = softmax_c(sum_j a_j(x, c) L_j(x, c) + gamma log pi_i(c)) (:func:`fedkd.fusion.class_expert_fusion`),
is then the receiver's own label prior pi_i plus a little evidence: nearly the same row for
every public input. Distilling it for five epochs a round overwrites the site's one private
epoch (measured at epsilon 4, 20 rounds, seed 0: ALMA 0.100, chance, at alpha 100, against
0.244 for local-only training; docs/privacy.md "DP-aware knowledge").

``fusion.dp-knowledge`` (DP only) chooses what the server does about it:

* ``evidence`` (the default for ``expert``, :func:`evidence_abstention`): the server also
  reads F_i at gamma = 0, i.e. the senders' evidence alone, softmax_c(sum_j a_j L_j) (``expert``
  returns it from the same sums, ``FusionResult.evidence``; another rule is fused again), and
  abstains (sends the uniform row) wherever that row's entropy is above
  ``fusion.evidence-entropy`` * log C: F_i speaks only where the senders' evidence is strong,
  never where it would be the receiver's prior alone. Where it abstains everywhere, the
  DP site is exactly a local-only site (tests/test_federation_site.py).
* ``votes``: each sender's row becomes the smoothed one-hot of its top-1 label
  (:func:`hard_votes`), the run's fusion runs on those votes, the consensus G is their
  *unsharpened* mean (:func:`vote_consensus`), and rows whose top probability is below
  ``fusion.vote-threshold`` abstain (:func:`abstain`): PATE's Confident-GNMax (Papernot et al.
  2018, "Scalable Private Learning with PATE", ICLR, Alg. 1) without its Gaussian noise,
  since each site is already DP-trained and anything computed from its release is
  post-processing. Measured worse than ``evidence`` (docs/privacy.md).
* ``soft``: the released rows as without DP.

Whatever the server sends, a DP site distils only target rows that are not near-uniform
(:func:`distillable_rows`), so abstained rows leave its model alone.

Pure functions on arrays; no Flower imports.
"""

from __future__ import annotations

import numpy as np

from fedkd.fusion import entropy

def hard_votes(knowledge: np.ndarray, *, smoothing: float) -> np.ndarray:
    """V(x) = (1 - s) onehot(argmax_c K(x, c)) + s / C for every row of ``knowledge`` [..., C]
    (ties go to the lowest class index); rows stay probability vectors."""
    knowledge = np.asarray(knowledge, dtype=np.float64)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"fusion.vote-smoothing must be in [0, 1); got {smoothing!r}")
    num_classes = knowledge.shape[-1]
    votes = np.full(knowledge.shape, smoothing / num_classes)
    top = knowledge.argmax(axis=-1)
    np.put_along_axis(votes, top[..., None], 1.0 - smoothing + smoothing / num_classes, axis=-1)
    return votes


def vote_consensus(votes: np.ndarray) -> np.ndarray:
    """G(x) = (1/N) sum_j V_j(x): the unsharpened mean of the senders' votes ``[N, P, C] -> [P, C]``
    (the vote histogram, smoothed, as a probability row)."""
    votes = np.asarray(votes, dtype=np.float64)
    if votes.ndim != 3 or votes.shape[0] == 0:
        raise ValueError(f"votes must have shape [N>0, P, C]; got {votes.shape}")
    return votes.mean(axis=0)


def abstain(fused: np.ndarray, *, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, answered)``: each row of ``fused`` [..., C] whose top probability is at least
    ``threshold`` kept, every other row replaced by the uniform row 1/C (the federation
    abstains there); ``answered`` [...] marks the kept rows."""
    fused = np.asarray(fused, dtype=np.float64)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"fusion.vote-threshold must be in [0, 1]; got {threshold!r}")
    answered = fused.max(axis=-1) >= threshold
    rows = np.where(answered[..., None], fused, 1.0 / fused.shape[-1])
    return rows, answered


def distillable_rows(targets: np.ndarray, *, uniform_entropy: float) -> np.ndarray:
    """Mask [P] of the target rows a DP site distils: entropy H(T(x)) <= ``uniform_entropy`` *
    log C (abstained rows, exactly uniform, and near-uniform rows are left out)."""
    targets = np.asarray(targets, dtype=np.float64)
    return entropy(targets) <= uniform_entropy * np.log(targets.shape[-1])



def evidence_abstention(fused: np.ndarray, evidence: np.ndarray, *, entropy_cut: float) -> np.ndarray:
    """``fused`` [..., C] with every row replaced by the uniform row 1/C where the matching
    ``evidence`` row (the same fusion without the receiver's prior) has entropy above
    ``entropy_cut`` * log C."""
    answered = distillable_rows(evidence, uniform_entropy=entropy_cut)
    return np.where(answered[..., None], np.asarray(fused, dtype=np.float64), 1.0 / np.shape(fused)[-1])


def student_target(own: np.ndarray, mean: np.ndarray | None, *, temperature: float,
                   correction: str = "off") -> np.ndarray:
    """A DP site's public-set student target [P, C] (``privacy.student = "consensus"``):

        T_i(x) = softmax_c( log K_i(x, c) + log M(x, c) / tau ),

    K_i the site's own DP model's prediction, M the federation's mean over every sender (the
    consensus G unsharpened, :func:`fedkd.targets.unsharpen`), tau = ``temperature``: a product
    of experts, K_i * M^(1/tau), normalised. Where the site is confident (a skewed site knows its
    few classes) its own row decides; where its DP model is near-uniform (the IID sites: one
    noisy epoch a round on a few hundred examples) the sharpened mean does, and the mean of ten
    independently DP-trained models is far more accurate than any one of them (digits, epsilon
    4, 20 rounds, alpha 1 / 100: each model 0.21 / 0.23 on the public set, their mean 0.56 /
    0.38; docs/privacy.md). ``mean`` None (no consensus yet): T_i = K_i. Probabilities are
    floored at 1e-12 before the logarithm, so a class the wire rounded to 0 keeps a tiny share.
    Both inputs are post-processing of DP releases: the target costs no privacy.

    ``correction = "prior"`` (``privacy.student-correction``) divides M by its class marginal
    over the rows given, m(c) = mean_x M(x, c), before the product: log M(x, c) - log m(c), the
    federation's evidence with its own label mix removed (the prior correction of the expert
    fusion, L_j = log K_j - log pi_j), so a class that few senders hold is not out-voted on
    the rows where it is the answer; the site's own prior stays in K_i."""
    own = np.asarray(own, dtype=np.float64)
    if not temperature > 0:
        raise ValueError(f"privacy.student-temperature must be > 0; got {temperature!r}")
    if correction not in ("off", "prior"):
        raise ValueError(f"privacy.student-correction must be one of 'off', 'prior'; got {correction!r}")
    logits = np.log(np.maximum(own, 1e-12))
    if mean is not None:
        mean = np.asarray(mean, dtype=np.float64)
        if mean.shape != own.shape:
            raise ValueError(f"student_target: own {own.shape} and mean {mean.shape} must have the same shape")
        evidence = np.log(np.maximum(mean, 1e-12))
        if correction == "prior":
            evidence = evidence - np.log(np.maximum(mean.mean(axis=0, keepdims=True), 1e-12))
        logits = logits + evidence / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    rows = np.exp(logits)
    return rows / rows.sum(axis=-1, keepdims=True)
