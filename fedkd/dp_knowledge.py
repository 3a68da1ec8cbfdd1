"""DP-aware knowledge: what DP-trained sites release is noisy and under-confident; fuse votes.

A site trained with DP-SGD (one noisy epoch a round on 20-300 examples) releases rows that
are close to uniform: on digits at epsilon 4 the mean entropy of a released row is
2.1-2.3 nats against log 10 = 2.30 (docs/benchmarks.md, "20 rounds, DP"). Their *top-1 label*
still carries what the site learnt (local-only DP training reaches ALMA 0.24-0.78 from it),
but the probabilities do not: the class-expert fusion of such rows is the receiver's own
label prior plus a little evidence, nearly the same row for every public input, and
distilling it for five epochs a round overwrites the site's private epoch (measured: ALMA
0.100, chance, at alpha 100). So, under DP, knowledge is fused as *hard votes with
abstention*, PATE's Confident-GNMax (Papernot et al. 2018, "Scalable Private Learning with
PATE", ICLR, Alg. 1) without its Gaussian noise: each site is already DP-trained, so
anything computed from its release is post-processing and needs no further noise.

1. *Votes* (:func:`hard_votes`): each sender's row becomes the smoothed one-hot of its top-1
   label, V_j(x) = (1 - s) onehot(argmax_c K_j(x, c)) + s / C (s = ``fusion.vote-smoothing``;
   s > 0 keeps every log finite for the class-expert fusion, which then reads each sender's
   label prior as its vote frequencies).
2. *Fusion*: the run's fusion method on V instead of K (class-expert fusion: a sender's vote
   for c counts by how much of c it holds, under the receiver's prior); the consensus G is
   the *unsharpened* mean of the votes, (1/N) sum_j V_j(x) (ERA's sharpening, softmax(G / 0.1),
   would make a weak plurality look certain).
3. *Abstention* (:func:`abstain`): where the fused row's top probability is below the
   threshold tau (``fusion.vote-threshold``) the row is replaced by the uniform row: the
   federation abstains on x (Confident-GNMax's "answer only when the plurality is large").
4. *The site* (:func:`distillable_rows`) distils only the rows that are not near-uniform
   (entropy <= ``fusion.uniform-entropy`` * log C), so abstained rows, and any
   near-uniform target, leave its model alone; with ``privacy.distill-classes = "own"``
   (:func:`own_class_rows`) only those whose top class is one its own model calls on at
   least half a uniform share of the public set (its vote frequencies: post-processing of
   its DP model, not its private labels, which would need a DP release of their own).

Pure functions on arrays; no Flower imports.
"""

from __future__ import annotations

import numpy as np

from fedkd.fusion import entropy

DP_KNOWLEDGE = ("auto", "votes", "soft")
"""Values of ``fusion.dp-knowledge``: ``votes`` (this module), ``soft`` (the released rows as
they are, as without DP), ``auto`` = ``votes`` for method ``expert`` under DP, else ``soft``."""


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


def own_class_rows(targets: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Mask [P] of the target rows whose top class is one of the site's own: a class c with
    vote share v(c) >= 1 / (2C), v = the frequencies of the site model's top-1 labels ``own``
    [P'] (integers in 0..C-1) on the public set."""
    targets = np.asarray(targets, dtype=np.float64)
    num_classes = targets.shape[-1]
    own = np.asarray(own, dtype=np.int64)
    share = np.bincount(own, minlength=num_classes) / max(len(own), 1)
    return share[targets.argmax(axis=-1)] >= 1.0 / (2 * num_classes)
