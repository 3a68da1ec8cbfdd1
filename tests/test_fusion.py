"""Tests for fedkd.fusion (DESIGN section 3): known answers worked out by hand, and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkd.fusion import (
    DIVERGENCES,
    FUSION_METHODS,
    effectiveness_matrix,
    entropy,
    fuse,
    hellinger_divergence,
    informative_rows,
    js_divergence,
    kl_divergence,
    neighbour_weights,
    softmax,
)

LN2 = math.log(2.0)


def confident_rows(rng: np.random.Generator, labels: np.ndarray, num_classes: int, strength: float = 4.0) -> np.ndarray:
    """Rows of softmax(noise + strength * onehot(label)): low entropy, argmax = label."""
    logits = rng.normal(0.0, 0.3, size=(len(labels), num_classes))
    logits[np.arange(len(labels)), labels] += strength
    return softmax(logits)


# ----------------------------------------------------------------- divergences


def test_js_of_identical_distributions_is_zero():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-15)


def test_js_of_disjoint_one_hots_is_ln2():
    p = np.array([1.0, 0.0, 0.0])
    q = np.array([0.0, 0.0, 1.0])
    assert js_divergence(p, q) == pytest.approx(LN2, rel=1e-9)


def test_js_is_symmetric_and_bounded():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=20)
    q = rng.dirichlet(np.ones(5), size=20)
    d_pq, d_qp = js_divergence(p, q), js_divergence(q, p)
    np.testing.assert_allclose(d_pq, d_qp, rtol=1e-12, atol=1e-15)
    assert (d_pq > 0).all() and (d_pq <= LN2 + 1e-12).all()


def test_js_known_answer_half_overlap():
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4);
    # KL(p||m) = ln(4/3); KL(q||m) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)... worked out:
    # KL(q||m) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3)
    # JS = 0.5 ln(4/3) + 0.25 ln(4/3) = 0.75 ln(4/3)
    p, q = np.array([1.0, 0.0]), np.array([0.5, 0.5])
    assert js_divergence(p, q) == pytest.approx(0.75 * math.log(4.0 / 3.0), rel=1e-9)


def test_kl_known_answer():
    # KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    assert kl_divergence(p, q) == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-9)
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-15)
    # KL is not symmetric: KL(q||p) = 1/4 ln(1/2) + 3/4 ln(3/2)
    assert kl_divergence(q, p) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-9)


def test_entropy_known_answers():
    assert entropy(np.full(4, 0.25)) == pytest.approx(math.log(4.0), rel=1e-12)
    assert entropy(np.array([1.0, 0.0, 0.0])) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------- identical / disjoint clients


@pytest.mark.parametrize("measure", ["epd", "agreement"])
def test_identical_clients_get_uniform_weights(measure):
    rng = np.random.default_rng(1)
    n, p, c = 5, 30, 6
    one = confident_rows(rng, rng.integers(0, c, size=p), c)
    knowledge = np.repeat(one[None], n, axis=0)
    result = fuse(knowledge=knowledge, method="knfu", measure=measure)
    np.testing.assert_allclose(result.weights, np.full((n, n), 1.0 / n), atol=1e-12)
    # fusing identical knowledge gives it back to everyone
    np.testing.assert_allclose(result.fused, knowledge, atol=1e-12)


@pytest.mark.parametrize("divergence", ["js", "kl"])
def test_disjoint_label_client_gets_zero_weight_under_epd(divergence):
    rng = np.random.default_rng(2)
    p, c = 60, 10
    # clients 0-2: balanced over classes 0..4 (same label mix); client 3: classes 5..9 only
    labels = [rng.permutation(np.arange(p) % 5) for _ in range(3)] + [5 + rng.permutation(np.arange(p) % 5)]
    knowledge = np.stack([confident_rows(rng, y, c, strength=6.0) for y in labels])
    d = effectiveness_matrix(knowledge, measure="epd", divergence=divergence)
    assert d[:3, :3].max() < 0.05  # the honest three are close ...
    assert d[:3, 3].min() > 0.3  # ... and the disjoint one is far
    result = fuse(knowledge=knowledge, method="knfu", measure="epd", divergence=divergence, threshold=0.05)
    w = result.weights
    np.testing.assert_array_equal(w[:3, 3], 0.0)
    np.testing.assert_array_equal(w[3, :3], 0.0)
    assert w[3, 3] == pytest.approx(1.0)
    assert (w[:3, :3] > 0).all()
    # F_0 is a combination of clients 0..2 only
    expected = np.einsum("j,jpc->pc", w[0, :3], knowledge[:3])
    np.testing.assert_allclose(result.fused[0], expected, atol=1e-12)
    np.testing.assert_allclose(result.fused[3], knowledge[3], atol=1e-12)


# ----------------------------------------------------------------- baselines by hand


def test_mean_equals_arithmetic_mean():
    rng = np.random.default_rng(3)
    knowledge = np.stack([confident_rows(rng, rng.integers(0, 4, size=8), 4) for _ in range(3)])
    result = fuse(knowledge=knowledge, method="mean")
    by_hand = (knowledge[0] + knowledge[1] + knowledge[2]) / 3.0
    for i in range(3):
        np.testing.assert_allclose(result.fused[i], by_hand, atol=1e-12)
    np.testing.assert_allclose(result.weights, np.full((3, 3), 1 / 3), atol=1e-15)


def test_mean_two_clients_hand_numbers():
    k = np.array([[[0.9, 0.1, 0.0]], [[0.7, 0.0, 0.3]]])
    result = fuse(knowledge=k, method="mean", uniform_entropy=1.0)
    np.testing.assert_allclose(result.fused[0, 0], [0.8, 0.05, 0.15], atol=1e-12)
    np.testing.assert_allclose(result.fused[1, 0], [0.8, 0.05, 0.15], atol=1e-12)


def test_era_equals_softmax_of_mean_over_point_one():
    k = np.array([[[0.9, 0.1, 0.0]], [[0.7, 0.0, 0.3]]])
    result = fuse(knowledge=k, method="era", uniform_entropy=1.0)
    mean = np.array([0.8, 0.05, 0.15])
    e = np.exp(mean / 0.1)
    by_hand = e / e.sum()  # exp(8), exp(0.5), exp(1.5) normalised
    np.testing.assert_allclose(result.fused[0, 0], by_hand, rtol=1e-12)
    np.testing.assert_allclose(result.fused[1, 0], by_hand, rtol=1e-12)
    assert by_hand[0] == pytest.approx(math.exp(8) / (math.exp(8) + math.exp(0.5) + math.exp(1.5)))


def test_none_returns_identity_and_no_knowledge():
    rng = np.random.default_rng(4)
    k = rng.dirichlet(np.ones(3), size=(4, 5))
    result = fuse(knowledge=k, method="none")
    assert result.fused is None
    np.testing.assert_array_equal(result.weights, np.eye(4))


def test_sharpen_option_applies_softmax_over_temperature():
    k = np.array([[[0.9, 0.1, 0.0]], [[0.7, 0.0, 0.3]]])
    result = fuse(knowledge=k, method="mean", uniform_entropy=1.0, sharpen_temperature=0.5)
    e = np.exp(np.array([0.8, 0.05, 0.15]) / 0.5)
    np.testing.assert_allclose(result.fused[0, 0], e / e.sum(), rtol=1e-12)


# ----------------------------------------------------------------- entropy mask


def test_near_uniform_rows_are_masked():
    k = np.array([[[0.25, 0.25, 0.25, 0.25], [0.97, 0.01, 0.01, 0.01], [0.26, 0.25, 0.25, 0.24]]])
    np.testing.assert_array_equal(informative_rows(k, 0.95), [[False, True, False]])


def test_uniform_adversary_row_does_not_change_mean_fusion():
    rng = np.random.default_rng(5)
    p, c = 12, 5
    honest = np.stack([confident_rows(rng, rng.integers(0, c, size=p), c) for _ in range(2)])
    adversary = np.full((1, p, c), 1.0 / c)
    result = fuse(knowledge=np.concatenate([honest, adversary]), method="mean")
    expected = honest.mean(axis=0)
    for i in range(3):
        np.testing.assert_allclose(result.fused[i], expected, atol=1e-12)


def test_uniform_adversary_row_does_not_change_knfu_fusion():
    rng = np.random.default_rng(6)
    p, c = 40, 5
    honest = np.stack([confident_rows(rng, rng.integers(0, c, size=p), c) for _ in range(3)])
    adversary = confident_rows(rng, rng.integers(0, c, size=p), c)
    flat = np.arange(p) % 2 == 0  # the adversary sends uniform rows on half of P
    adversary[flat] = 1.0 / c
    knowledge = np.concatenate([honest, adversary[None]])
    # threshold large: everyone is a neighbour, so the adversary has weight > 0
    result = fuse(knowledge=knowledge, method="knfu", measure="epd", threshold=10.0)
    w = result.weights
    assert (w[:3, 3] > 0).all()
    for i in range(3):
        honest_w = w[i, :3] / w[i, :3].sum()
        expected = np.einsum("j,jpc->pc", honest_w, honest[:, flat])
        np.testing.assert_allclose(result.fused[i][flat], expected, atol=1e-12)
        # where the adversary's rows are informative they count as usual
        expected_all = np.einsum("j,jpc->pc", w[i], knowledge[:, ~flat])
        np.testing.assert_allclose(result.fused[i][~flat], expected_all, atol=1e-12)


def test_all_rows_uniform_falls_back_to_unmasked_mean():
    k = np.full((2, 3, 4), 0.25)
    result = fuse(knowledge=k, method="mean")
    np.testing.assert_allclose(result.fused, k, atol=1e-15)


# ----------------------------------------------------------------- neighbour weights


D3 = np.array([[0.0, 0.1, 0.3], [0.1, 0.0, 0.2], [0.3, 0.2, 0.0]])


def test_neighbour_weights_exp_minus_beta_d_all_neighbours():
    w = neighbour_weights(D3, beta=10.0, threshold=1.0, max_neighbours=10)
    # row 0: exp(0), exp(-1), exp(-3)
    r0 = np.array([1.0, math.exp(-1), math.exp(-3)])
    r1 = np.array([math.exp(-1), 1.0, math.exp(-2)])
    r2 = np.array([math.exp(-3), math.exp(-2), 1.0])
    np.testing.assert_allclose(w[0], r0 / r0.sum(), rtol=1e-12)
    np.testing.assert_allclose(w[1], r1 / r1.sum(), rtol=1e-12)
    np.testing.assert_allclose(w[2], r2 / r2.sum(), rtol=1e-12)


def test_neighbour_weights_median_threshold():
    # row 0: others' d = (0.1, 0.3), median 0.2 -> N(0) = {0, 1}
    # row 1: others' d = (0.1, 0.2), median 0.15 -> N(1) = {1, 0}
    # row 2: others' d = (0.3, 0.2), median 0.25 -> N(2) = {2, 1}
    w = neighbour_weights(D3, beta=10.0)
    e1, e2 = math.exp(-1), math.exp(-2)
    expected = np.array(
        [
            [1 / (1 + e1), e1 / (1 + e1), 0.0],
            [e1 / (1 + e1), 1 / (1 + e1), 0.0],
            [0.0, e2 / (1 + e2), 1 / (1 + e2)],
        ]
    )
    np.testing.assert_allclose(w, expected, rtol=1e-12, atol=0)


def test_neighbour_weights_beta_zero_is_uniform_over_neighbours():
    w = neighbour_weights(D3, beta=0.0, threshold=1.0)
    np.testing.assert_allclose(w, np.full((3, 3), 1 / 3), rtol=1e-12)


def test_neighbour_weights_cap_keeps_smallest():
    w = neighbour_weights(D3, beta=10.0, threshold=1.0, max_neighbours=2)
    # each row keeps itself and its nearest other client
    assert set(np.flatnonzero(w[0])) == {0, 1}
    assert set(np.flatnonzero(w[1])) == {0, 1}
    assert set(np.flatnonzero(w[2])) == {1, 2}
    only_self = neighbour_weights(D3, threshold=1.0, max_neighbours=1)
    np.testing.assert_array_equal(only_self, np.eye(3))


def test_neighbour_weights_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        neighbour_weights(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="max_neighbours"):
        neighbour_weights(D3, max_neighbours=0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 12),
    cap=st.integers(1, 6),
    threshold=st.one_of(st.just("median"), st.floats(0.0, 1.0)),
)
def test_top_k_cap_respected_and_self_included(seed, n, cap, threshold):
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.0, 0.7, size=(n, n))
    np.fill_diagonal(d, 0.0)
    w = neighbour_weights(d, beta=10.0, threshold=threshold, max_neighbours=cap)
    assert ((w > 0).sum(axis=1) <= cap).all()
    assert (np.diag(w) > 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= 0).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 14), cap=st.integers(1, 5))
def test_knfu_cap_respected_on_knowledge(seed, n, cap):
    rng = np.random.default_rng(seed)
    k = rng.dirichlet(np.full(4, 0.3), size=(n, 10))
    for measure in ("epd", "agreement"):
        w = fuse(knowledge=k, method="knfu", measure=measure, threshold=10.0, max_neighbours=cap).weights
        assert ((w > 0).sum(axis=1) <= cap).all()
        assert (np.diag(w) > 0).all()


# ----------------------------------------------------------------- simplex property


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
    p=st.integers(1, 15),
    c=st.integers(2, 7),
    concentration=st.sampled_from([0.05, 0.3, 1.0, 20.0]),
    sharpen=st.sampled_from([0.0, 0.1, 0.5, 2.0]),
)
def test_fused_rows_stay_on_the_simplex(seed, n, p, c, concentration, sharpen):
    rng = np.random.default_rng(seed)
    k = rng.dirichlet(np.full(c, concentration), size=(n, p))
    for method in ("none", "mean", "era", "knfu"):
        for measure in ("epd", "agreement"):
            result = fuse(knowledge=k, method=method, measure=measure, sharpen_temperature=sharpen)
            w = result.weights
            assert w.shape == (n, n)
            assert (w >= 0).all()
            np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-9)
            if method == "none":
                assert result.fused is None
                continue
            f = result.fused
            assert f.shape == (n, p, c)
            assert np.isfinite(f).all()
            assert (f >= 0).all()
            np.testing.assert_allclose(f.sum(axis=-1), 1.0, atol=1e-9)


# ----------------------------------------------------------------- errors


def test_unknown_method_lists_valid_names():
    k = np.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match="bogus") as err:
        fuse(knowledge=k, method="bogus")
    for name in ("none", "mean", "era", "knfu", "expert"):
        assert name in str(err.value)
    assert set(FUSION_METHODS.names()) == {"none", "mean", "era", "knfu", "expert"}


def test_unknown_measure_lists_valid_names():
    k = np.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match="bogus") as err:
        fuse(knowledge=k, method="knfu", measure="bogus")
    assert "agreement" in str(err.value) and "epd" in str(err.value)


@pytest.mark.parametrize("measure", ["epd", "agreement"])
def test_unknown_divergence_lists_valid_names(measure):
    k = np.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match="bogus") as err:
        fuse(knowledge=k, method="knfu", measure=measure, divergence="bogus")
    for name in ("js", "kl", "hellinger"):
        assert name in str(err.value)


@pytest.mark.parametrize("shape", [(3, 4), (0, 3, 4), (2, 3, 4, 1)])
def test_bad_knowledge_shape_raises(shape):
    with pytest.raises(ValueError, match="shape"):
        fuse(knowledge=np.full(shape, 0.25), method="mean")


# ----------------------------------------------------------------- adversaries (measured)


def _honest_and_random(seed: int, n_honest: int = 7, n_random: int = 3, p: int = 200, c: int = 10):
    """Honest clients: skewed (each knows 3 classes well) but consistent (argmax = true label
    everywhere); random senders: Dirichlet(1) rows (informative enough to pass the mask)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, size=p)
    rows = []
    for _ in range(n_honest):
        known = rng.choice(c, size=3, replace=False)
        logits = rng.normal(0.0, 0.5, size=(p, c))
        logits[np.arange(p), y] += np.where(np.isin(y, known), 6.0, 2.0)
        rows.append(softmax(logits))
    rows.extend(rng.dirichlet(np.ones(c), size=p) for _ in range(n_random))
    return np.stack(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", ["median", 10.0])
@pytest.mark.parametrize("divergence", ["js", "hellinger", "kl"])
def test_random_senders_get_small_weight_under_agreement(seed, threshold, divergence):
    knowledge = _honest_and_random(seed)
    w = fuse(
        knowledge=knowledge, method="knfu", measure="agreement", divergence=divergence, threshold=threshold
    ).weights
    honest = w[:7]
    to_random = honest[:, 7:].mean()  # mean weight per random sender
    others = honest[:, :7][~np.eye(7, dtype=bool)].mean()  # mean weight per other honest client
    # measured: 0 with the median threshold, about 0.07 with everyone admitted
    assert to_random < 0.25 * others
    # and in total the random senders carry under 10% of an honest client's fused knowledge
    assert honest[:, 7:].sum(axis=1).max() < 0.10


def test_unknown_fusion_parameter_and_threshold_word_are_refused():
    k = np.full((2, 4, 3), 1 / 3)
    with pytest.raises(TypeError, match="betta"):
        fuse(knowledge=k, method="knfu", betta=3.0)
    with pytest.raises(ValueError, match="median"):
        neighbour_weights(np.zeros((2, 2)), threshold="mean")


# ----------------------------------------------------------------- vectorised = row by row
#
# fedkd.fusion computes the agreement measure, neighbour selection and fusion vectorised
# (simulations/micro/fusion_speed.py: thousands of sites). The loops below are the plain
# row-by-row definitions those functions replaced; the vectorised code must give the
# same numbers bit for bit, so that results do not depend on the federation's size.


def _reference_agreement(knowledge, confident_fraction=0.5, divergence="js"):
    n, p, _ = knowledge.shape
    keep = max(1, int(round(confident_fraction * p)))
    confidence = knowledge.max(axis=-1)
    d = np.empty((n, n))
    for i in range(n):
        confident = np.argsort(-confidence[i], kind="stable")[:keep]
        d[i] = DIVERGENCES[divergence](knowledge[i, confident][None], knowledge[:, confident]).mean(axis=-1)
    return d


def _reference_epd(knowledge, divergence):
    epd = knowledge.mean(axis=-2)
    return DIVERGENCES[divergence](epd[:, None, :], epd[None, :, :])


def _reference_neighbour_weights(divergences, beta=10.0, threshold="median", max_neighbours=10):
    n = divergences.shape[0]
    weights = np.zeros((n, n))
    for i in range(n):
        others = np.delete(np.arange(n), i)
        d_others = divergences[i, others]
        tau = np.median(d_others) if threshold == "median" and n > 1 else threshold
        if n > 1:
            candidates = others[d_others <= tau]
            candidates = candidates[np.argsort(divergences[i, candidates], kind="stable")]
            members = np.concatenate([[i], candidates[: max_neighbours - 1]])
        else:
            members = np.array([i])
        d = divergences[i, members]
        w = np.exp(-beta * (d - d.min()))
        weights[i, members] = w / w.sum()
    return weights


def _reference_weighted_fusion(knowledge, weights, mask):
    n, p, c = knowledge.shape
    fused = np.empty((weights.shape[0], p, c))
    for i in range(weights.shape[0]):
        members = np.flatnonzero(weights[i])
        w = weights[i, members][:, None] * mask[members]
        total = w.sum(axis=0)
        empty = total <= 0
        if empty.any():
            w[:, empty] = weights[i, members][:, None]
            total = w.sum(axis=0)
        fused[i] = np.einsum("kp,kpc->pc", w / total, knowledge[members])
    return fused


def _knowledge_with_ties(seed, n, p, c):
    """Random knowledge where some clients are exact copies (ties in d) and one is uniform."""
    rng = np.random.default_rng(seed)
    k = rng.dirichlet(np.full(c, 0.3), size=(n, p))
    if n >= 4:
        k[1] = k[0]
        k[3] = k[2]
        k[-1] = 1.0 / c  # near-uniform rows are masked
    return k


@pytest.mark.parametrize("seed,n,p,c", [(0, 1, 7, 3), (1, 2, 5, 4), (2, 7, 30, 10), (3, 23, 40, 5), (4, 300, 12, 10)])
def test_vectorised_effectiveness_equals_row_by_row(seed, n, p, c):
    k = _knowledge_with_ties(seed, n, p, c)
    for fraction in (0.5, 0.1, 1.0):
        np.testing.assert_array_equal(
            effectiveness_matrix(k, measure="agreement", divergence="js", confident_fraction=fraction),
            _reference_agreement(k, fraction),
        )
    for divergence in ("js", "kl"):
        np.testing.assert_array_equal(
            effectiveness_matrix(k, measure="epd", divergence=divergence), _reference_epd(k, divergence)
        )


@pytest.mark.parametrize("seed,n,p,c", [(0, 1, 7, 3), (1, 2, 5, 4), (2, 7, 30, 10), (3, 23, 40, 5), (4, 300, 12, 10)])
def test_matrix_product_divergences_equal_row_by_row(seed, n, p, c):
    # KL and h^2 go through BLAS: equal to the definition up to rounding, d_ii exactly 0
    k = _knowledge_with_ties(seed, n, p, c)
    for divergence in ("kl", "hellinger"):
        for fraction in (0.5, 0.1, 1.0):
            d = effectiveness_matrix(k, measure="agreement", divergence=divergence, confident_fraction=fraction)
            np.testing.assert_allclose(d, _reference_agreement(k, fraction, divergence), rtol=0, atol=1e-12)
            assert (np.diag(d) == 0).all() and (d >= 0).all()
    d = effectiveness_matrix(k, measure="epd", divergence="hellinger")
    np.testing.assert_allclose(d, _reference_epd(k, "hellinger"), rtol=0, atol=1e-12)
    assert (np.diag(d) == 0).all()


def test_hellinger_known_values():
    assert hellinger_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    assert hellinger_divergence(np.array([0.3, 0.7]), np.array([0.3, 0.7])) == 0.0
    assert hellinger_divergence(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(1 - math.sqrt(0.5))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(2, 12), concentration=st.sampled_from([0.02, 0.3, 1.0, 50.0]))
def test_js_is_sandwiched_by_hellinger(seed, c, concentration):
    # ln 2 h^2 <= JS <= h^2 row by row, hence for the agreement measure's means too: the
    # fast h^2 agreement ranks neighbours as JS does up to that factor
    rng = np.random.default_rng(seed)
    k = rng.dirichlet(np.full(c, concentration), size=(6, 20))
    js = effectiveness_matrix(k, measure="agreement", divergence="js")
    h2 = effectiveness_matrix(k, measure="agreement", divergence="hellinger")
    assert (js <= h2 + 1e-12).all()
    assert (LN2 * h2 <= js + 1e-12).all()


@pytest.mark.parametrize("seed,n", [(0, 1), (1, 2), (2, 9), (3, 40), (4, 300)])
@pytest.mark.parametrize("cap", [1, 2, 3, 10, 1000])
@pytest.mark.parametrize("threshold", ["median", 0.2, 0.0])
def test_vectorised_neighbour_weights_equal_row_by_row(seed, n, cap, threshold):
    rng = np.random.default_rng(seed)
    d = rng.random((n, n)).round(1)  # rounded: many ties, which the cap must break by index
    np.fill_diagonal(d, 0.0)
    np.testing.assert_array_equal(
        neighbour_weights(d, beta=7.0, threshold=threshold, max_neighbours=cap),
        _reference_neighbour_weights(d, beta=7.0, threshold=threshold, max_neighbours=cap),
    )


@pytest.mark.parametrize("method", ["mean", "era", "knfu"])
@pytest.mark.parametrize("seed,n,p,c,cap", [(0, 1, 6, 3, 4), (1, 6, 20, 10, 4), (2, 30, 25, 4, 4),
                                            (3, 80, 500, 10, 10), (4, 90, 30, 6, 100)])
def test_vectorised_fusion_equals_row_by_row(method, seed, n, p, c, cap):
    from fedkd.fusion import sharpen

    k = _knowledge_with_ties(seed, n, p, c)
    result = fuse(knowledge=k, method=method, max_neighbours=cap, divergence="js")
    mask = informative_rows(k, 0.95)
    if method == "knfu":
        expected_w = _reference_neighbour_weights(_reference_agreement(k), max_neighbours=cap)
    else:
        expected_w = np.full((n, n), 1.0 / n)
    np.testing.assert_array_equal(result.weights, expected_w)
    expected = _reference_weighted_fusion(k, expected_w, mask)
    if method == "era":
        expected = sharpen(expected, 0.1)
    np.testing.assert_array_equal(result.fused, expected)


def test_sparse_fusion_with_fully_masked_positions_equals_row_by_row():
    """Positions where every neighbour's row is masked fall back to the plain weights."""
    rng = np.random.default_rng(5)
    n, p, c = 12, 9, 5
    k = rng.dirichlet(np.full(c, 0.3), size=(n, p))
    k[:, :3] = 1.0 / c  # nobody is informative at the first three positions
    w = neighbour_weights(rng.random((n, n)), max_neighbours=3)
    mask = informative_rows(k, 0.95)
    from fedkd.fusion import weighted_fusion

    np.testing.assert_array_equal(weighted_fusion(k, w, mask), _reference_weighted_fusion(k, w, mask))


def test_agreement_hand_worked_with_hellinger_and_ties():
    """``agreement`` with h^2 on three clients, two public examples, two classes, worked by
    hand. h^2(p, q) = 1/2 sum_c (sqrt p_c - sqrt q_c)^2 = 1 - sum_c sqrt(p_c q_c) for rows
    summing to 1. With confident_fraction 0.5, |S_i| = 1: S_0 = {x0} (0.9 > 0.6),
    S_1 = {x1} (0.6 > 0.5), S_2 = {x0}: a tie (0.7 = 0.7) goes to the first position."""
    k = np.array([
        [[0.9, 0.1], [0.6, 0.4]],
        [[0.5, 0.5], [0.6, 0.4]],
        [[0.7, 0.3], [0.3, 0.7]],
    ])

    def h2(p, q):  # noqa: ANN001, ANN202
        return 1.0 - sum(math.sqrt(a * b) for a, b in zip(p, q))

    expected = np.array([
        [0.0, h2([0.9, 0.1], [0.5, 0.5]), h2([0.9, 0.1], [0.7, 0.3])],  # on x0
        [h2([0.6, 0.4], [0.6, 0.4]), 0.0, h2([0.6, 0.4], [0.3, 0.7])],  # on x1
        [h2([0.7, 0.3], [0.9, 0.1]), h2([0.7, 0.3], [0.5, 0.5]), 0.0],  # on x0 (the tie)
    ])
    assert expected[0, 1] == pytest.approx(1 - 2 / math.sqrt(5))  # 1 - sqrt(.45) - sqrt(.05)
    assert expected[1, 0] == pytest.approx(0.0)  # site 1 agrees with 0 where 1 is confident
    d = effectiveness_matrix(k, measure="agreement", divergence="hellinger", confident_fraction=0.5)
    np.testing.assert_allclose(d, expected, atol=1e-12)
    # neighbours of site 0 (median threshold over {d01, d02}): d02 < d01, so N(0) = {0, 2};
    # w_0j = exp(-beta d_0j) / (exp(0) + exp(-beta d_02)) on N(0), 0 for site 1
    w = neighbour_weights(d, beta=10.0, threshold="median", max_neighbours=10)
    z = 1.0 + math.exp(-10.0 * expected[0, 2])
    np.testing.assert_allclose(w[0], [1 / z, 0.0, math.exp(-10.0 * expected[0, 2]) / z], atol=1e-12)


def _expert_by_hand(k, members, gamma, floor):  # noqa: ANN001, ANN202
    """class_expert_fusion's formula, one receiver, example and class at a time."""
    n, p, c = k.shape
    prior = [[max(float(np.mean(k[j, :, cc])), floor) for cc in range(c)] for j in range(n)]
    prior = [[v / sum(row) for v in row] for row in prior]
    out = np.zeros_like(k)
    for i in range(n):
        senders = [j for j in range(n) if members[i][j]]
        for x in range(p):
            z = []
            for cc in range(c):
                total = sum(prior[j][cc] for j in senders)
                s = sum(prior[j][cc] / total * (math.log(k[j, x, cc]) - math.log(prior[j][cc])) for j in senders)
                z.append(s + gamma * math.log(prior[i][cc]))
            e = [math.exp(v - max(z)) for v in z]
            out[i, x] = [v / sum(e) for v in e]
    return out


def test_class_expert_fusion_known_answer():
    from fedkd.fusion import class_expert_fusion

    k = np.array([[[0.9, 0.1], [0.7, 0.3]], [[0.4, 0.6], [0.2, 0.8]], [[0.5, 0.5], [0.6, 0.4]]])
    members = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=bool)
    mask = np.ones(k.shape[:2], dtype=bool)
    fused, weights = class_expert_fusion(k, members, mask, prior_weight=0.5, prior_floor=1e-3)
    np.testing.assert_allclose(fused, _expert_by_hand(k, members, 0.5, 1e-3), atol=1e-12)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    assert weights[0, 2] == 0.0 and weights[2, 0] == 0.0  # not neighbours: no weight
    # receiver 0: pi_0 = (0.8, 0.2), pi_1 = (0.3, 0.7); a_0 = (8/11, 2/9), a_1 = (3/11, 7/9)
    # on both examples: w_01 = mean over (x, c) of a_1 = (3/11 + 7/9) / 2
    assert weights[0, 1] == pytest.approx((3 / 11 + 7 / 9) / 2)
    assert weights[0, 0] == pytest.approx((8 / 11 + 2 / 9) / 2)


def test_class_expert_fusion_of_identical_sites_returns_their_knowledge():
    """Senders that all agree (same knowledge, same prior) with gamma = 1: the likelihood is
    K / pi and putting pi back gives K itself."""
    from fedkd.fusion import class_expert_fusion

    rng = np.random.default_rng(3)
    one = rng.dirichlet(np.ones(5), size=7)
    k = np.stack([one, one, one])
    fused, _ = class_expert_fusion(k, np.ones((3, 3), bool), np.ones((3, 7), bool), prior_weight=1.0,
                                   prior_floor=1e-9)
    for i in range(3):
        np.testing.assert_allclose(fused[i], one, atol=1e-12)


def _expert_class_loop(knowledge, members, mask, *, prior_weight, prior_floor, null_weight):  # noqa: ANN001, ANN202
    """class_expert_fusion as it was before issue 14's speed-up: trust repeated to [N, N, C],
    then two [N, N] x [N, P] products per class (the reference the faster code must equal)."""
    from fedkd.fusion import softmax

    n, p, c = knowledge.shape
    prior = np.clip(knowledge.mean(axis=1), prior_floor, None)
    prior /= prior.sum(axis=1, keepdims=True)
    log_prior = np.log(prior)
    likelihood = np.log(np.clip(knowledge, 1e-12, None)) - log_prior[:, None, :]
    trust = np.asarray(members, dtype=np.float64)
    if trust.ndim == 2:
        trust = np.repeat(trust[:, :, None], c, axis=2)
    informative = mask.astype(np.float64)
    evidence, held = np.empty((n, p, c)), np.zeros((n, n))
    for cls in range(c):
        claim = trust[:, :, cls] * prior[None, :, cls]
        total = claim @ informative + null_weight
        inverse = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
        evidence[:, :, cls] = (claim @ (informative * likelihood[:, :, cls])) * inverse
        held += claim * (inverse @ informative.T)
    fused = softmax(evidence + prior_weight * log_prior[:, None, :], axis=-1)
    sums = held.sum(axis=1, keepdims=True)
    return fused, np.divide(held, sums, out=np.zeros_like(held), where=sums > 0)


@pytest.mark.parametrize("senders", ["effective", "weighted", "all"])
@pytest.mark.parametrize("null_weight", [0.0, 0.05])
def test_class_expert_fusion_equals_the_class_by_class_loop(senders, null_weight):
    """The one-pass code (gathered neighbours, or three products for dense rows) equals the
    previous class-by-class loop up to rounding, with dropped rows and an empty receiver."""
    from fedkd.fusion import class_expert_fusion, informative_rows, knfu_weights

    rng = np.random.default_rng(7)
    k = rng.dirichlet(np.full(6, 0.3), size=(90, 25))
    k[:4] = 1.0 / 6  # uninformative senders: masked everywhere
    mask = informative_rows(k, 0.95)
    w = knfu_weights(k, measure="agreement", divergence="hellinger", confident_fraction=0.5, beta=10.0,
                     threshold="median", max_neighbours=10)
    members = {"effective": w > 0, "weighted": w, "all": np.ones((90, 90), bool)}[senders]
    if senders != "all":
        members = members.copy()
        members[5] = 0  # a receiver with no sender at all
    got = class_expert_fusion(k, members, mask, prior_weight=0.7, prior_floor=1e-3, null_weight=null_weight)
    want = _expert_class_loop(k, members, mask, prior_weight=0.7, prior_floor=1e-3, null_weight=null_weight)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("trust", ["off", "verified", "claimed"])
@pytest.mark.parametrize("neighbours", ["effective", "all"])
def test_expert_returns_its_evidence_equal_to_a_fusion_without_the_prior(trust, neighbours):
    """FusionResult.evidence (what DP-aware abstention reads) is F_i at gamma = 0: the
    class-by-class reference with prior_weight 0 for trust off, and in every mode the fused
    rows of a second fusion run with prior_weight 0 (the server's old second call)."""
    from fedkd.fusion import fuse, informative_rows, knfu_weights

    rng = np.random.default_rng(11)
    k = rng.dirichlet(np.full(5, 0.4), size=(8, 12))
    params = dict(knowledge=k, method="expert", neighbours=neighbours, trust=trust)
    result = fuse(**params, prior_weight=1.0)
    again = fuse(**params, prior_weight=0.0)
    np.testing.assert_allclose(result.evidence, again.fused, rtol=0, atol=1e-12)
    assert not np.allclose(result.evidence, result.fused)  # the prior term really was on
    if trust == "off":
        mask = informative_rows(k, 0.95)
        members = (np.ones((8, 8), bool) if neighbours == "all" else
                   knfu_weights(k, measure="agreement", divergence="hellinger", confident_fraction=0.5,
                                beta=10.0, threshold="median", max_neighbours=10) > 0)
        want, _ = _expert_class_loop(k, members, mask, prior_weight=0.0, prior_floor=1e-3, null_weight=0.0)
        np.testing.assert_allclose(result.evidence, want, rtol=0, atol=1e-12)


def test_sharpening_after_fusion_keeps_the_consensus_and_sharpens_the_evidence():
    """fusion.sharpen-temperature T: F_i and its evidence both become softmax(p / T) (ERA's form);
    expert's own consensus G_i is passed on untouched (it used to be dropped)."""
    from fedkd.fusion import fuse

    k = np.random.default_rng(2).dirichlet(np.ones(4), size=(5, 6))
    plain = fuse(knowledge=k, method="expert", neighbours="all", trust="verified")
    sharp = fuse(knowledge=k, method="expert", neighbours="all", trust="verified", sharpen_temperature=0.5)

    def by_hand(p):  # noqa: ANN001, ANN202
        q = np.exp(p / 0.5)
        return q / q.sum(axis=-1, keepdims=True)

    np.testing.assert_allclose(sharp.fused, by_hand(plain.fused), atol=1e-12)
    np.testing.assert_allclose(sharp.evidence, by_hand(plain.evidence), atol=1e-12)
    np.testing.assert_array_equal(sharp.consensus, plain.consensus)
    np.testing.assert_array_equal(sharp.consensus_weights, plain.consensus_weights)


# ----------------------------------------------------------------- verified trust (expert)

# 3 sites x 2 examples x 2 classes. Sites 0 and 1 call x0 a 0 and x1 a 1 (probability >= 0.5);
# site 2 calls them the other way round (a label-flipper's view).
TRUST_K = np.array([
    [[0.9, 0.1], [0.2, 0.8]],
    [[0.8, 0.2], [0.4, 0.6]],
    [[0.3, 0.7], [0.6, 0.4]],
])


def test_confident_calls_and_class_recall_by_hand():
    from fedkd.fusion import class_false_calls, class_recall, confident_calls

    calls = confident_calls(TRUST_K, confidence=0.5)
    assert calls[0].tolist() == [[True, False], [False, True]]
    assert calls[2].tolist() == [[False, True], [True, False]]
    assert not confident_calls(TRUST_K, confidence=0.85)[1].any()  # site 1's best is 0.8
    r = class_recall(TRUST_K, calls)
    # verifier 0: S_0(0) = {x0} -> K_j(x0, 0) = .9 .8 .3; S_0(1) = {x1} -> K_j(x1, 1) = .8 .6 .4
    np.testing.assert_allclose(r[0], [[0.9, 0.8], [0.8, 0.6], [0.3, 0.4]])
    # verifier 2: S_2(0) = {x1} -> K_j(x1, 0) = .2 .4 .6; S_2(1) = {x0} -> K_j(x0, 1) = .1 .2 .7
    np.testing.assert_allclose(r[2], [[0.2, 0.1], [0.4, 0.2], [0.6, 0.7]])
    # a verifier with no call of c verifies nothing: NaN (site 0 at 0.85 calls only x0)
    strict = class_recall(TRUST_K, confident_calls(TRUST_K, confidence=0.85))
    assert strict[0, 1, 0] == pytest.approx(0.8) and np.isnan(strict[0, :, 1]).all()
    # false calls: verifier 0 calls x1 a 1, so f_0j(0) = K_j(x1, 0) = .2 .4 .6 and f_0j(1) = K_j(x0, 1)
    f = class_false_calls(TRUST_K, calls)
    np.testing.assert_allclose(f[0], [[0.2, 0.1], [0.4, 0.2], [0.6, 0.7]])
    # at 0.85 site 0 calls only x0 (a 0): nothing else to check class 0 against (NaN); for
    # class 1, which it never calls, x0 is a call of something else
    strict_f = class_false_calls(TRUST_K, confident_calls(TRUST_K, confidence=0.85))
    assert np.isnan(strict_f[0, :, 0]).all()
    np.testing.assert_allclose(strict_f[0, :, 1], [0.1, 0.2, 0.7])


def test_a_sender_that_calls_everything_one_class_is_not_trusted_for_it():
    """Recall alone trusts a sender that says 'class 0' everywhere (r = 1); its false calls
    (it also says 0 where the receiver calls 1) cancel that: J = 0.95 - 0.95 = 0."""
    from fedkd.fusion import verified_trust

    k = np.array([TRUST_K[0], [[0.95, 0.05], [0.95, 0.05]]])
    t, _ = verified_trust(k, beta=10.0, confidence=0.5)
    assert t[0, 1, 0] == pytest.approx(math.exp(-10.0))


def test_verified_trust_by_hand():
    from fedkd.fusion import verified_trust

    t, s = verified_trust(TRUST_K, beta=1.0, confidence=0.5)
    # receiver 0 calls both classes. Class 0: recall r_0j(0) = K_j(x0, 0) = .9 .8 .3, false
    # calls f_0j(0) = K_j(x1, 0) = .2 .4 .6 (x1 is called 1): J = .7 .4 0 (clipped);
    # class 1: r = K_j(x1, 1) = .8 .6 .4, f = K_j(x0, 1) = .1 .2 .7: J = .7 .4 0.
    # t_0j(c) = exp(-(1 - J)); the flipper (site 2) gets e^-1 on both classes
    np.testing.assert_allclose(t[0], np.exp(-(1 - np.array([[0.7, 0.7], [0.4, 0.4], [0.0, 0.0]]))))
    # s_0j = pi_0(0) t_0j(0) + pi_0(1) t_0j(1), pi_0 = EPD_0 = (0.55, 0.45)
    assert s[0, 2] == pytest.approx(0.55 * math.exp(-1.0) + 0.45 * math.exp(-1.0))
    assert s[0, 1] == pytest.approx(math.exp(-0.6))
    # at confidence 0.85 site 0 calls only x0, a 0: no other call, so no false calls (J = r);
    # class 1 falls back to s_0j = t_0j(0)
    t, s = verified_trust(TRUST_K, beta=1.0, confidence=0.85)
    np.testing.assert_allclose(t[0, :, 0], np.exp(-(1 - np.array([0.9, 0.8, 0.3]))))
    np.testing.assert_allclose(t[0, :, 1], t[0, :, 0])
    np.testing.assert_allclose(s[0], t[0, :, 0])
    # sites 1 and 2 call nothing at 0.85: they can check nobody and trust only themselves
    np.testing.assert_array_equal(s[1], [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(t[2], [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])


def test_class_expert_fusion_with_class_trust_and_a_null_expert_by_hand():
    """a_j(x, c) = t_j(c) pi_j(c) / (kappa + sum_l t_l(c) pi_l(c)); L_j = log K_j - log pi_j."""
    from fedkd.fusion import class_expert_fusion

    k = TRUST_K[:2]  # pi_0 = (0.55, 0.45), pi_1 = (0.6, 0.4)
    trust = np.array([[[1.0, 1.0], [0.5, 0.25]], [[1.0, 1.0], [1.0, 1.0]]])
    mask = np.ones((2, 2), dtype=bool)
    fused, weights = class_expert_fusion(k, trust, mask, prior_weight=1.0, prior_floor=1e-3, null_weight=0.1)
    a0 = np.array([0.55 / (0.1 + 0.55 + 0.5 * 0.6), 0.45 / (0.1 + 0.45 + 0.25 * 0.4)])
    a1 = np.array([0.5 * 0.6 / (0.1 + 0.55 + 0.5 * 0.6), 0.25 * 0.4 / (0.1 + 0.45 + 0.25 * 0.4)])
    pi0, pi1 = np.array([0.55, 0.45]), np.array([0.6, 0.4])
    for x in range(2):
        z = a0 * (np.log(k[0, x]) - np.log(pi0)) + a1 * (np.log(k[1, x]) - np.log(pi1)) + np.log(pi0)
        np.testing.assert_allclose(fused[0, x], np.exp(z) / np.exp(z).sum(), atol=1e-12)
    # w_0j = mean_{x, c} a_j / sum_l mean_{x, c} a_l (the null expert's share left out)
    assert weights[0, 1] == pytest.approx(a1.mean() / (a0.mean() + a1.mean()))
    assert weights[0].sum() == pytest.approx(1.0)


def test_trusted_consensus_by_hand():
    """G_i(x) = softmax(sum_j s_ij m_j(x) K_j(x) / sum_j s_ij m_j(x) / T); shares mean_x g_ij(x)."""
    from fedkd.fusion import trusted_consensus

    mask = np.array([[True, True], [True, False], [True, True]])  # site 1's x1 is dropped
    s = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 2.0]])
    g, shares = trusted_consensus(TRUST_K, mask, s, temperature=0.1)
    # receiver 0, x0: mean of sites 0 and 1 = (0.85, 0.15); x1: site 0 alone = (0.2, 0.8)
    np.testing.assert_allclose(g[0, 0], [1 / (1 + math.exp(-7.0)), math.exp(-7.0) / (1 + math.exp(-7.0))])
    np.testing.assert_allclose(g[0, 1], [math.exp(-6.0) / (1 + math.exp(-6.0)), 1 / (1 + math.exp(-6.0))])
    np.testing.assert_allclose(shares[0], [(0.5 + 1.0) / 2, (0.5 + 0.0) / 2, 0.0])
    # a receiver that trusts nobody gets the plain (masked) mean, ERA exactly
    np.testing.assert_allclose(shares[1], [(1 / 3 + 1 / 2) / 2, (1 / 3 + 0) / 2, (1 / 3 + 1 / 2) / 2])
    # receiver 2, x1: (1 * 0.2 + 2 * 0.6) / 3 = 0.4667 for class 0 (site 1 dropped at x1)
    mean = np.array([(0.2 + 2 * 0.6) / 3, (0.8 + 2 * 0.4) / 3])
    np.testing.assert_allclose(g[2, 1], np.exp(mean / 0.1) / np.exp(mean / 0.1).sum())
    np.testing.assert_allclose(shares[2], [(1 / 4 + 1 / 3) / 2, (1 / 4 + 0) / 2, (2 / 4 + 2 / 3) / 2])


def test_random_and_flipped_senders_get_little_weight():
    """A hand-built federation of 6 sites, 10 classes, 40 public examples (4 of each class):
    honest sites 0-3 hold classes {0..4} or {5..9} (two sites each) and put 0.82 on the true
    class of their own classes (on the others: a confident wrong guess among their own);
    site 4 sends Dirichlet(1) noise, site 5 the label-flip of an honest {0..4} site. Under
    verified trust both adversaries get under 5% of every honest row of F_i and of G_i; without
    trust (label priors alone) the random sender gets far more."""
    from fedkd.adversary import corrupt

    rng = np.random.default_rng(0)
    c, labels = 10, np.repeat(np.arange(10), 4)

    def honest(held):  # noqa: ANN001, ANN202
        k = np.full((len(labels), c), 0.02)
        for x, y in enumerate(labels):
            guess = y if y in held else held[x % len(held)]
            k[x, guess] = 0.82
        return k / k.sum(axis=1, keepdims=True)

    low, high = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    sites = [honest(low), honest(low), honest(high), honest(high)]
    sites.append(corrupt(sites[0], "random", rng)["knowledge"])
    sites.append(corrupt(sites[1], "flip", rng)["knowledge"])
    k = np.stack(sites)
    result = fuse(knowledge=k, method="expert")
    assert result.weights[:4, 4:].sum(axis=1).max() < 0.05
    assert result.consensus_weights[:4, 4:].sum(axis=1).max() < 0.05
    # the honest holders of the receiver's classes carry its F_i: site 1 is site 0's partner
    assert result.weights[0, 1] > 0.3
    off = fuse(knowledge=k, method="expert", trust="off")
    assert off.weights[:4, 4].min() > 0.1


def _claimed_federation():  # noqa: ANN202
    """4 classes, 32 public examples (8 of each class). Honest sites put 0.85 on the true
    class of the classes they hold and, on the others, split evenly over their own classes
    (no confident call). Site 0 (the receiver) holds {0, 1}, site 1 {1, 2}, site 2 {2, 3}
    (no class in common with site 0); site 3 sends Dirichlet(1) noise; sites 4 and 5 send the
    label-flip (c -> c + 1) of two honest {2, 3} sites, so they claim {3, 0} and agree with
    each other."""
    from fedkd.adversary import corrupt

    rng = np.random.default_rng(0)
    c, labels = 4, np.repeat(np.arange(4), 8)

    def honest(held, top=0.85):  # noqa: ANN001, ANN202
        k = np.full((len(labels), c), 0.01)
        for x, y in enumerate(labels):
            if y in held:
                k[x, y] = top
            else:
                k[x, held] = 0.45
        return k / k.sum(axis=1, keepdims=True)

    sites = [honest([0, 1]), honest([1, 2]), honest([2, 3])]
    sites.append(corrupt(sites[0], "random", rng)["knowledge"])
    sites.append(corrupt(honest([2, 3], 0.8), "flip", rng)["knowledge"])
    sites.append(corrupt(honest([2, 3], 0.9), "flip", rng)["knowledge"])
    return np.stack(sites)


def test_claimed_trust_verifies_an_honest_holder_of_classes_the_receiver_lacks():
    """Receiver 0 cannot check site 2 itself (no class in common): verified trust gives it
    e^-beta; claimed trust lets site 1 (verified by 0 on class 1) check it on class 2, and
    site 2 then counts for class 3 too (nobody trusted checks 3: its sender trust s_02).
    The random site and the two agreeing flippers (who would vouch for each other) stay
    near sigma(-2 beta gate)."""
    from fedkd.fusion import claimed_trust, verified_trust

    k = _claimed_federation()
    _, s_verified = verified_trust(k, beta=10.0, confidence=0.5)
    assert s_verified[0, 2] < 1e-3
    t, s = claimed_trust(k, beta=10.0, confidence=0.5, steps=3)
    sigma = lambda z: 1 / (1 + np.exp(-20 * (z - 0.3)))  # noqa: E731  the step at beta 10, gate 0.3
    # site 1 on class 2, checked by site 1 alone (site 0 never calls 2: 0.45 / 0.92 < 0.5):
    # recall 0.85 / 0.88 where site 1 calls 2, false calls 0.45 / 0.92 (site 2 splits a 1-digit
    # over its own classes 2 and 3) where site 1 calls 1
    assert t[0, 2, 2] == pytest.approx(sigma(0.85 / 0.88 - 0.45 / 0.92), rel=1e-9)
    assert s[0, 1] > 0.9 and s[0, 2] > 0.9
    assert t[0, 2, 3] == pytest.approx(s[0, 2])  # class 3: nobody trusted calls it
    for bad in (3, 4, 5):  # J ~ 0 on every checked claim: about sigma(-6) = 0.0025
        assert s[0, bad] < 0.01, bad
        assert t[0, bad].max() < 0.05, bad
    np.testing.assert_array_equal(np.diagonal(s), 1.0)


def test_claimed_trust_gives_adversaries_little_weight_and_honest_senders_a_say():
    k = _claimed_federation()
    result = fuse(knowledge=k, method="expert", trust="claimed")
    assert result.weights[:3, 3:].sum(axis=1).max() < 0.05
    assert result.consensus_weights[:3, 3:].sum(axis=1).max() < 0.05
    assert result.consensus_weights[0, 2] > 0.1  # the honest site without the receiver's classes
    verified = fuse(knowledge=k, method="expert", trust="verified")
    assert verified.consensus_weights[0, 2] < 0.01


def test_claimed_trust_on_the_six_site_federation():
    """The federation of test_random_and_flipped_senders_get_little_weight under claimed trust."""
    from fedkd.adversary import corrupt

    rng = np.random.default_rng(0)
    c, labels = 10, np.repeat(np.arange(10), 4)

    def honest(held):  # noqa: ANN001, ANN202
        k = np.full((len(labels), c), 0.02)
        for x, y in enumerate(labels):
            k[x, y if y in held else held[x % len(held)]] = 0.82
        return k / k.sum(axis=1, keepdims=True)

    low, high = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    sites = [honest(low), honest(low), honest(high), honest(high)]
    sites.append(corrupt(sites[0], "random", rng)["knowledge"])
    sites.append(corrupt(sites[1], "flip", rng)["knowledge"])
    result = fuse(knowledge=np.stack(sites), method="expert", trust="claimed")
    assert result.weights[:4, 4:].sum(axis=1).max() < 0.05
    assert result.consensus_weights[:4, 4:].sum(axis=1).max() < 0.05
    assert result.weights[0, 1] > 0.3
