"""fedkd.privacy.debias: the unbiased estimate of label-rr votes, its pooling and projection,
and the server's ``fusion.release-debias``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedkd.config import ConfigError, load_config
from fedkd.data import load_federation
from fedkd.federation.server import ServerState, server_round
from fedkd.fusion import simplex_projection
from fedkd.privacy.debias import debias, pooled_estimate, released_onehots, rr_rates
from fedkd.privacy.release import label_release, randomized_response


def test_rates_by_hand():
    """eps 1, C 4: p = e / (e + 3) = 0.47536, q = 1 / (e + 3) = 0.17488 (hand formula)."""
    p, q = rr_rates(epsilon=1.0, num_classes=4)
    assert p == pytest.approx(math.e / (math.e + 3), rel=1e-12)
    assert q == pytest.approx(1 / (math.e + 3), rel=1e-12)
    assert p == pytest.approx(0.475367, abs=1e-6) and q == pytest.approx(0.174878, abs=1e-6)


def test_debiased_values_by_hand():
    """A released one-hot e_o at eps 1, C 4 debiases to (1 - q)/(p - q) = 0.825122 / 0.300489 = 2.74593 on o and
    -q/(p - q) = -0.5820 elsewhere (computed by hand from p, q above); rows sum to
    (1 - C q)/(p - q) = 1."""
    d = debias(np.eye(4)[[2]], epsilon=1.0)
    assert d[0, 2] == pytest.approx(2.74593, abs=1e-4)
    np.testing.assert_allclose(d[0, [0, 1, 3]], -0.58198, atol=1e-4)
    assert d.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("epsilon,k", [(0.5, 4), (1.0, 4), (2.0, 10)])
def test_debiased_estimate_is_unbiased_over_many_draws(epsilon, k):
    """Mean over 400,000 randomized responses of true label 1, debiased, equals e_1 within
    5 standard errors per coordinate (standard error = sqrt(P(1-P)/n)/(p-q), hand formula)."""
    n = 400_000
    rng = np.random.default_rng(7)
    released = randomized_response(np.full(n, 1), epsilon=epsilon, num_classes=k, rng=rng)
    mean = debias(np.eye(k)[released], epsilon=epsilon).mean(axis=0)
    p, q = rr_rates(epsilon=epsilon, num_classes=k)
    prob = np.full(k, q)
    prob[1] = p
    stderr = np.sqrt(prob * (1 - prob) / n) / (p - q)
    assert np.all(np.abs(mean - np.eye(k)[1]) < 5 * stderr)
    # the raw (not debiased) mean is biased: p on the true class, far from 1
    raw = np.eye(k)[released].mean(axis=0)
    assert abs(raw[1] - 1.0) > 100 * stderr[1]


def test_released_onehots_undo_smoothing():
    rows, _ = label_release(np.eye(4)[[0, 3, 1]], epsilon=50.0, rng=np.random.default_rng(0), smoothing=0.3)
    np.testing.assert_array_equal(released_onehots(rows), np.eye(4)[[0, 3, 1]])


def test_simplex_projection_by_hand():
    """(2.7472, -0.582, -0.582, -0.582) projects to e_0; (0.8, 0.6, -0.4) to (0.6, 0.4, 0)
    (theta = (0.8 + 0.6 - 1)/2 = 0.2); a distribution is its own projection."""
    np.testing.assert_allclose(simplex_projection(np.array([[2.7472, -0.582, -0.582, -0.582]])), [[1, 0, 0, 0]])
    np.testing.assert_allclose(simplex_projection(np.array([0.8, 0.6, -0.4])), [0.6, 0.4, 0.0], atol=1e-12)
    dist = np.array([[0.1, 0.2, 0.7]])
    np.testing.assert_allclose(simplex_projection(dist), dist)
    rows = simplex_projection(np.random.default_rng(1).normal(size=(50, 5)) * 3)
    assert np.all(rows >= 0) and np.allclose(rows.sum(axis=1), 1.0)


def test_pooling_over_rounds_recovers_the_senders_label():
    """Three senders all predicting class 2 on 2,000 examples, eps 1, C 4: one sender's raw
    release puts mass p = 0.475 on the true class; the pooled, projected estimate puts more
    there after one round (3 draws) and more with every pooled round (12 draws after 4:
    measured 0.545 -> 0.734 mass and 45% -> 80% top-1 right; with 3 draws the argmax gains
    little, 3 p^2 (1 - p) + p^3 = 0.46 plus ties, so rounds are what pooling needs)."""
    rng = np.random.default_rng(3)
    truth = np.full(2000, 2)
    total = count = None
    mass, right = [], []
    for _ in range(4):
        knowledge = np.stack([np.eye(4)[randomized_response(truth, epsilon=1.0, num_classes=4, rng=rng)]
                              for _ in range(3)])
        fused, total, count = pooled_estimate(knowledge, epsilon=1.0, previous_sum=total, previous_count=count)
        mass.append(float(fused[:, 2].mean()))
        right.append(float(np.mean(fused.argmax(axis=1) == 2)))
    single = float(knowledge[0][:, 2].mean())
    assert single == pytest.approx(0.475, abs=0.04)
    assert single < mass[0] < mass[1] < mass[2] < mass[3] and mass[3] > 0.7
    assert right[3] > right[0] + 0.2 and right[3] > 0.75
    np.testing.assert_array_equal(count, 12.0)


@pytest.fixture(scope="module")
def parts():
    config = load_config(overrides={"data.num-clients": 3, "global-student.enabled": False,
                                    "shield.release": "label-rr", "shield.release-epsilon": 1.0,
                                    "fusion.release-debias": "rounds"})
    return config, load_federation(config.data, config.seed)


def test_server_round_debiases_and_pools_over_rounds(parts):
    """Every receiver gets the same F_i = G = project(mean debiased vote) and the running
    sums survive the checkpoint's state_dict round trip."""
    config, split = parts
    state = ServerState()
    release = np.arange(3)
    votes = np.eye(10)[[[4, 4, 1], [4, 7, 1], [2, 4, 1]]]  # senders x examples
    server_round(config=config, split=split, state=state, round_number=1, release=release,
                 accepted={j: votes[j] for j in range(3)})
    expected, _, _ = pooled_estimate(votes, epsilon=1.0)
    for j in range(3):
        np.testing.assert_allclose(state.fused[j][1], expected)
        np.testing.assert_allclose(state.consensus[j], expected)
    assert state.fused[0][1][0].argmax() == 4 and state.fused[0][1][2].argmax() == 1
    arrays, meta = state.state_dict()
    again = ServerState()
    again.load_state_dict(arrays, meta, round_number=1)
    server_round(config=config, split=split, state=again, round_number=2, release=release,
                 accepted={j: votes[j] for j in range(3)})
    np.testing.assert_array_equal(again.release_votes[1][:3], 6.0)
    np.testing.assert_allclose(again.fused[0][1], expected)  # same votes twice: same mean


def test_debias_needs_the_release():
    with pytest.raises(ConfigError, match="fusion.release-debias: 'senders' debiases randomized-response labels "
                                          "and needs shield.release = 'label-rr'; got shield.release = 'none'"):
        load_config(overrides={"fusion.release-debias": "senders"})
    with pytest.raises(ConfigError, match="fusion.release-debias"):
        load_config(overrides={"fusion.release-debias": "always", "shield.release": "label-rr"})
