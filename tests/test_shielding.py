"""Tests for fedkd.shielding (DESIGN section 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkd.fusion import entropy, softmax
from fedkd.shielding import (
    SENSITIVITY_SCORERS,
    confidence_sensitivity,
    divergence_sensitivity,
    pii_hits,
    pii_rows,
    redact_pii,
    pii_sensitivity,
    shield,
    top_k_release,
    uniform_sensitivity,
)


def _logits(seed: int = 0, p: int = 50, c: int = 10, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, size=(p, c))


def _effective_temperature(logits_row: np.ndarray, released_row: np.ndarray) -> float:
    """T from log K_a - log K_b = (z_a - z_b) / T, using the row's extreme classes."""
    a, b = int(np.argmax(logits_row)), int(np.argmin(logits_row))
    return (logits_row[a] - logits_row[b]) / (math.log(released_row[a]) - math.log(released_row[b]))


def test_scorer_registry_names():
    assert set(SENSITIVITY_SCORERS.names()) >= {"uniform", "confidence", "divergence", "pii"}
    with pytest.raises(ValueError, match="confidence"):
        SENSITIVITY_SCORERS.get("nope")


def test_plain_release_is_softmax_over_temperature():
    z = np.array([[2.0, 0.0, -1.0]])
    released, stats = shield(z, temperature=2.0)
    e = np.exp(z / 2.0)
    np.testing.assert_allclose(released, e / e.sum(), rtol=1e-12)
    assert stats.mean_temperature == pytest.approx(2.0)
    assert stats.mean_sensitivity == 0.0
    assert stats.mean_entropy == pytest.approx(float(entropy(e / e.sum())[0]), rel=1e-12)


def test_higher_temperature_raises_mean_entropy():
    z = _logits(1)
    entropies = [shield(z, temperature=t)[1].mean_entropy for t in (0.5, 1.0, 2.0, 5.0)]
    assert all(a < b for a, b in zip(entropies, entropies[1:])), entropies
    assert entropies[-1] <= math.log(10) + 1e-12


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    p=st.integers(1, 20),
    c=st.integers(2, 8),
    scale=st.sampled_from([0.0, 1.0, 10.0, 100.0]),
    temperature=st.floats(0.05, 20.0),
    gamma=st.floats(0.0, 5.0),
    noise_std=st.sampled_from([0.0, 0.5, 5.0]),
    scorer=st.sampled_from(sorted(SENSITIVITY_SCORERS.names())),
    top_k=st.integers(0, 9),
    with_reference=st.booleans(),
)
def test_release_rows_are_distributions(seed, p, c, scale, temperature, gamma, noise_std, scorer, top_k, with_reference):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.0, size=(p, c)) * scale
    reference = rng.dirichlet(np.ones(c), size=p) if with_reference else None
    texts = [("my pin is 4 8 1 5" if i % 2 else "hello") for i in range(p)] if scorer == "pii" else None
    released, stats = shield(
        z,
        temperature=temperature,
        gamma=gamma,
        noise_std=noise_std,
        scorer=scorer,
        reference=reference,
        top_k=top_k,
        rng=rng,
        texts=texts,
    )
    assert released.shape == (p, c)
    assert np.isfinite(released).all()
    assert (released >= 0).all()
    np.testing.assert_allclose(released.sum(axis=1), 1.0, atol=1e-9)
    assert 0.0 <= stats.mean_sensitivity <= 1.0
    assert temperature - 1e-9 <= stats.mean_temperature <= temperature * (1 + gamma) + 1e-9
    assert 0.0 <= stats.mean_entropy <= math.log(c) + 1e-9


def test_confidence_scorer_gives_confident_rows_higher_temperature():
    confident = np.array([8.0, 0.0, 0.0, 0.0])
    unsure = np.array([0.4, 0.0, 0.0, 0.0])
    z = np.stack([confident, unsure])
    t0, gamma = 1.5, 2.0
    released, stats = shield(z, temperature=t0, gamma=gamma, scorer="confidence")
    t_conf = _effective_temperature(confident, released[0])
    t_unsure = _effective_temperature(unsure, released[1])
    assert t_conf > t_unsure > t0
    # by hand: s = (max softmax - 1/C) / (1 - 1/C), T = T0 (1 + gamma s)
    s = [(softmax(r).max() - 0.25) / 0.75 for r in (confident, unsure)]
    assert t_conf == pytest.approx(t0 * (1 + gamma * s[0]), rel=1e-9)
    assert t_unsure == pytest.approx(t0 * (1 + gamma * s[1]), rel=1e-9)
    assert stats.mean_temperature == pytest.approx(t0 * (1 + gamma * (s[0] + s[1]) / 2), rel=1e-12)
    assert stats.mean_sensitivity == pytest.approx((s[0] + s[1]) / 2, rel=1e-12)
    # one row at a time: the returned statistics say the same
    t_alone = [shield(r[None], temperature=t0, gamma=gamma, scorer="confidence")[1].mean_temperature for r in z]
    assert t_alone[0] > t_alone[1]


def test_gamma_zero_ignores_the_scorer():
    z = _logits(2)
    base, _ = shield(z, temperature=1.3)
    texts = ["my pin is 4 8 1 5"] * len(z)
    for scorer in SENSITIVITY_SCORERS.names():
        released, stats = shield(z, temperature=1.3, gamma=0.0, scorer=scorer, texts=texts)
        np.testing.assert_allclose(released, base, rtol=1e-12)
        assert stats.mean_temperature == pytest.approx(1.3)


def test_confidence_sensitivity_known_answers():
    probs = np.array([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.625, 0.125, 0.125, 0.125]])
    # (1 - 1/4) / (3/4) = 1; (1/4 - 1/4) = 0; (0.625 - 0.25) / 0.75 = 0.5
    np.testing.assert_allclose(confidence_sensitivity(probs, None), [1.0, 0.0, 0.5], atol=1e-12)
    np.testing.assert_array_equal(uniform_sensitivity(probs, None), [0.0, 0.0, 0.0])


def test_divergence_scorer_is_zero_when_prediction_equals_reference():
    z = _logits(3, p=20, c=5)
    probs = softmax(z)
    np.testing.assert_allclose(divergence_sensitivity(probs, probs), 0.0, atol=1e-12)
    released, stats = shield(z, temperature=1.0, gamma=3.0, scorer="divergence", reference=probs)
    assert stats.mean_sensitivity == pytest.approx(0.0, abs=1e-12)
    assert stats.mean_temperature == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(released, probs, rtol=1e-12)


def test_divergence_scorer_known_answers():
    one_hot = np.array([[1.0, 0.0], [0.0, 1.0]])
    other = np.array([[0.0, 1.0], [0.0, 1.0]])
    # disjoint one-hots: JS = ln 2 -> s = 1; identical -> 0
    np.testing.assert_allclose(divergence_sensitivity(one_hot, other), [1.0, 0.0], atol=1e-12)
    # no reference: uniform. JS((1,0), (1/2,1/2)) = 0.75 ln(4/3) (see test_fusion)
    s = divergence_sensitivity(np.array([[1.0, 0.0]]), None)
    assert s[0] == pytest.approx(0.75 * math.log(4 / 3) / math.log(2), rel=1e-9)


def test_top_k_release_hand_example():
    probs = np.array([[0.1, 0.6, 0.05, 0.25]])
    # keep 0.6 and 0.25; the remaining 0.15 is spread evenly over the other two classes
    np.testing.assert_allclose(top_k_release(probs, 2), [[0.075, 0.6, 0.075, 0.25]], atol=1e-12)
    # k = 1: keep 0.6, the other three share 0.4
    np.testing.assert_allclose(top_k_release(probs, 1), [[0.4 / 3, 0.6, 0.4 / 3, 0.4 / 3]], atol=1e-12)
    # k = 0 or k >= C: unchanged
    np.testing.assert_allclose(top_k_release(probs, 0), probs)
    np.testing.assert_allclose(top_k_release(probs, 4), probs)


def test_top_k_release_keeps_ranking_of_top_k():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(8), size=30)
    released = top_k_release(probs, 3)
    top = np.argsort(-probs, axis=1)[:, :3]
    np.testing.assert_allclose(np.take_along_axis(released, top, 1), np.take_along_axis(probs, top, 1), atol=1e-12)
    # the other five classes share one value per row
    rest = np.sort(released, axis=1)[:, :5]
    np.testing.assert_allclose(rest, rest[:, :1].repeat(5, axis=1), atol=1e-12)


def test_shield_top_k_applied_after_softmax():
    z = np.array([[3.0, 2.0, 1.0, 0.0]])
    released, _ = shield(z, temperature=1.0, top_k=2)
    p = softmax(z)[0]
    rest = (1 - p[0] - p[1]) / 2
    np.testing.assert_allclose(released[0], [p[0], p[1], rest, rest], rtol=1e-12)


def test_noise_without_rng_raises():
    with pytest.raises(ValueError, match="rng"):
        shield(_logits(), noise_std=0.1)


def test_noise_is_reproducible_and_changes_the_release():
    z = _logits(5)
    a, _ = shield(z, noise_std=1.0, rng=np.random.default_rng(7))
    b, _ = shield(z, noise_std=1.0, rng=np.random.default_rng(7))
    c, _ = shield(z, noise_std=1.0, rng=np.random.default_rng(8))
    clean, _ = shield(z)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a, clean)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": 0.0}, {"temperature": -1.0}, {"gamma": -0.5}, {"noise_std": -1.0}],
)
def test_invalid_parameters_raise(kwargs):
    with pytest.raises(ValueError, match="temperature"):
        shield(_logits(), **kwargs)


def test_nan_temperature_raises():
    with pytest.raises(ValueError):
        shield(_logits(), temperature=float("nan"))


def test_bad_logits_shape_raises():
    with pytest.raises(ValueError, match="shape"):
        shield(np.zeros(5))


def test_unknown_scorer_lists_names():
    with pytest.raises(ValueError, match="uniform"):
        shield(_logits(), scorer="nope")


# ----------------------------------------------------------------------- pii scorer


@pytest.mark.parametrize(
    ("text", "hits"),
    [
        ("i have a problem with the router", 0),
        ("my pin is 4 8 1 5", 1),
        ("ref 88123.", 1),
        ("hi, this is dana.", 1),
        ("mail me at jo.doe@example.org", 1),
        ("regards, sam. account 0042", 2),
    ],
)
def test_pii_hits_known_answers(text, hits):
    assert pii_hits(text) == hits


def test_pii_sensitivity_is_one_minus_half_per_hit_and_raises_temperature():
    texts = ["the router is down", "my pin is 4 8 1 5", "this is dana, ref 88123"]
    probs = softmax(_logits(p=3))
    s = pii_sensitivity(probs, None, texts)
    np.testing.assert_allclose(s, [0.0, 0.5, 0.75])
    z = _logits(p=3)
    released, stats = shield(z, temperature=1.0, gamma=2.0, scorer="pii", texts=texts)
    assert stats.mean_temperature == pytest.approx(1.0 + 2.0 * s.mean())
    # the clean row keeps T0; rows with personal data are flatter
    np.testing.assert_allclose(released[0], softmax(z[:1])[0], rtol=1e-12)
    assert _effective_temperature(z[2], released[2]) == pytest.approx(2.5)


def test_pii_rows_flag_the_inputs_with_a_match_case_blind():
    texts = ["the router is down", "My PIN is 4 8 1 5", "Hi, this is Dana", "ref 7", ""]
    np.testing.assert_array_equal(pii_rows(texts), [False, True, True, False, False])


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("my pin is 4 8 1 5", "my pin is redacted"),
        ("My PIN is 9 9 0 1", "my pin is redacted"),
        ("ref 88123.", "ref redacted."),
        ("mail me at jo.doe@example.org", "mail me at redacted"),
        ("the router is down", "the router is down"),
    ],
)
def test_redact_pii_known_answers(text, redacted):
    assert redact_pii(text) == redacted
    assert pii_hits(redact_pii(text)) == 0


def test_pii_scorer_needs_texts():
    with pytest.raises(ValueError, match="text inputs"):
        shield(_logits(p=3), gamma=1.0, scorer="pii")
    with pytest.raises(ValueError, match="2 texts for 3"):
        shield(_logits(p=3), gamma=1.0, scorer="pii", texts=["a", "b"])
