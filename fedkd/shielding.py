"""Shielding the released knowledge (Swing-distillation style), on arrays.

A client turns its logits z(x) on the public set into released knowledge with a
per-example temperature and Gaussian logit noise:

    s(x) in [0, 1]           sensitivity from a pluggable scorer
    T(x) = T0 * (1 + gamma * s(x))
    K(x) = softmax((z(x) + N(0, sigma^2 I)) / T(x))

so every released row stays a probability vector, and examples whose prediction looks
private are released flatter. Scorers see the predictions p(x), an optional public
reference r(x) and, for text, the public inputs as strings (``texts``): the ``pii``
scorer reads the input, not the prediction. Optionally only the ``top_k`` largest probabilities are
kept (the rest of the mass is spread evenly over the other classes).

Shielding is empirical protection; the formal guarantee comes from DP-SGD, since
predictions of a DP-trained model on public inputs are post-processing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedkd.fusion import entropy, js_divergence, softmax
from fedkd.registry import Registry

# scorer(probs [P, C], reference [P, C] | None, texts: P strings | None) -> s [P] in [0, 1]
SensitivityScorer = Callable[[np.ndarray, np.ndarray | None, Sequence[str] | None], np.ndarray]
SENSITIVITY_SCORERS: Registry[SensitivityScorer] = Registry("sensitivity scorer")


@SENSITIVITY_SCORERS.register("uniform")
def uniform_sensitivity(
    probs: np.ndarray, reference: np.ndarray | None, texts: Sequence[str] | None = None
) -> np.ndarray:
    """s(x) = 0: every example treated alike (temperature T0 everywhere)."""
    return np.zeros(probs.shape[0])


@SENSITIVITY_SCORERS.register("confidence")
def confidence_sensitivity(
    probs: np.ndarray, reference: np.ndarray | None, texts: Sequence[str] | None = None
) -> np.ndarray:
    """s(x) = (max_c p_c(x) - 1/C) / (1 - 1/C): confident predictions are the likeliest to
    reflect memorised private examples."""
    c = probs.shape[-1]
    return np.clip((probs.max(axis=-1) - 1.0 / c) / (1.0 - 1.0 / c), 0.0, 1.0)


@SENSITIVITY_SCORERS.register("divergence")
def divergence_sensitivity(
    probs: np.ndarray, reference: np.ndarray | None, texts: Sequence[str] | None = None
) -> np.ndarray:
    """s(x) = JS(p(x), r(x)) / ln 2, r = a public reference (last round's fused knowledge;
    uniform when there is none): knowledge that departs from what is public is more private."""
    if reference is None:
        reference = np.full_like(probs, 1.0 / probs.shape[-1])
    return np.clip(js_divergence(probs, reference) / np.log(2.0), 0.0, 1.0)


# Tokens that look like personal data in (lower-cased, tokenizer-decoded) text: e-mail
# addresses, phone-like digit runs, numbers of two or more digits (ids, pins, account and
# reference numbers), single digits spelled apart ("4 8 1 5"), and a word after a
# self-introduction or title (names: "this is dana", "my name is ...", "dr. lee").
PII_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"[\w.+-]+\s*@\s*[\w-]+(\s*\.\s*[\w-]+)+"),
    "phone": re.compile(r"\+?\d[\d\s().-]{6,}\d"),
    "number": re.compile(r"\b\d{2,}\b"),
    "digit-run": re.compile(r"\b\d(\s+\d\b){2,}"),
    "name": re.compile(r"\b(this is|my name is|i am|i'm|regards,?|mr\.?|mrs\.?|ms\.?|dr\.?)\s+[a-z]{2,}"),
}


def pii_hits(text: str) -> int:
    """Number of PII-like matches in ``text`` (see :data:`PII_PATTERNS`)."""
    return sum(len(pattern.findall(text)) for pattern in PII_PATTERNS.values())


REDACTED = "redacted"
"""What :func:`redact_pii` writes in place of each PII-like span."""


def redact_pii(text: str) -> str:
    """``text`` (lower-cased) with every span a :data:`PII_PATTERNS` pattern matches replaced
    by :data:`REDACTED`, patterns applied in their order: ``"my pin is 4 8 1 5"`` ->
    ``"my pin is redacted"``. Two texts that differ only inside such spans come out equal."""
    out = text.lower()
    for pattern in PII_PATTERNS.values():
        out = pattern.sub(REDACTED, out)
    return out


def pii_rows(texts: Sequence[str]) -> np.ndarray:
    """``[P]`` bool: the inputs with at least one PII-like match (:func:`pii_hits` > 0, lower-cased).

    A function of the public inputs alone, so choosing rows by it reveals nothing about a
    site's private data (``shield.release-rows = "pii"``, :mod:`fedkd.privacy.release`)."""
    return np.array([pii_hits(t.lower()) > 0 for t in texts], dtype=bool)


@SENSITIVITY_SCORERS.register("pii")
def pii_sensitivity(
    probs: np.ndarray, reference: np.ndarray | None, texts: Sequence[str] | None = None
) -> np.ndarray:
    """s(x) = 1 - 2^(-h(x)), h(x) = PII-like matches in the input text (:func:`pii_hits`):
    0 for clean text, 1/2 for one match, 3/4 for two. Text inputs only: the knowledge on a
    public example that names a person or carries numbers is released flatter."""
    if texts is None:
        raise ValueError("the 'pii' sensitivity scorer needs text inputs (a text dataset)")
    if len(texts) != probs.shape[0]:
        raise ValueError(f"pii scorer: {len(texts)} texts for {probs.shape[0]} predictions")
    hits = np.array([pii_hits(t.lower()) for t in texts], dtype=np.float64)
    return 1.0 - np.exp2(-hits)


def top_k_release(probs: np.ndarray, k: int) -> np.ndarray:
    """Keep each row's k largest probabilities; spread the remaining mass evenly over the
    other C - k classes (so rows still sum to 1 and reveal only their top-k ranking)."""
    c = probs.shape[-1]
    if k <= 0 or k >= c:
        return probs
    order = np.argsort(-probs, axis=-1, kind="stable")
    top = np.take_along_axis(probs, order[:, :k], axis=-1)
    rest = np.clip(1.0 - top.sum(axis=-1, keepdims=True), 0.0, None) / (c - k)
    released = np.repeat(rest, c, axis=-1)
    np.put_along_axis(released, order[:, :k], top, axis=-1)
    return released / released.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class ShieldStats:
    mean_sensitivity: float
    mean_temperature: float
    mean_entropy: float
    release_flipped: float = 0.0
    """Fraction of rows whose released label is not the top-1 (``shield.release``; 0 without)."""


def shield(
    logits: np.ndarray,
    *,
    temperature: float = 1.0,
    gamma: float = 0.0,
    noise_std: float = 0.0,
    scorer: str = "uniform",
    reference: np.ndarray | None = None,
    top_k: int = 0,
    rng: np.random.Generator | None = None,
    texts: Sequence[str] | None = None,
) -> tuple[np.ndarray, ShieldStats]:
    """Released knowledge ``[P, C]`` from logits ``[P, C]`` (formulas in the module doc).

    ``reference`` [P, C] is the public reference for the ``divergence`` scorer, ``texts``
    the P public inputs as text for the ``pii`` scorer; ``rng`` draws the logit noise
    (required when ``noise_std > 0``).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [P, C]; got {logits.shape}")
    if not (temperature > 0 and gamma >= 0 and noise_std >= 0):  # also refuses NaN
        raise ValueError(
            f"need temperature > 0, gamma >= 0, noise_std >= 0; got {temperature}, {gamma}, {noise_std}"
        )
    if reference is not None and np.shape(reference) != logits.shape:
        raise ValueError(f"reference must have the logits' shape {logits.shape}; got {np.shape(reference)}")
    sensitivity = SENSITIVITY_SCORERS.get(scorer)(softmax(logits), reference, texts)
    per_example_t = temperature * (1.0 + gamma * sensitivity)
    if noise_std > 0:
        if rng is None:
            raise ValueError("shield() needs an rng when noise_std > 0")
        logits = logits + rng.normal(0.0, noise_std, size=logits.shape)
    released = softmax(logits / per_example_t[:, None])
    released = top_k_release(released, top_k)
    stats = ShieldStats(
        mean_sensitivity=float(sensitivity.mean()),
        mean_temperature=float(per_example_t.mean()),
        mean_entropy=float(entropy(released).mean()),
    )
    return released, stats
