"""fedkd.privacy.selection: report-noisy-max, its decision rounds and budget, and the ledger."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedkd.config import ConfigError, load_config
from fedkd.federation.server import privacy_row
from fedkd.privacy import ledger_metrics, PrivacyLedger, site_privacy_plan
from fedkd.privacy.selection import (
    decision_epsilon,
    decision_rounds,
    dp_sgd_target,
    report_noisy_max,
    selection_ledger,
)


def test_report_noisy_max_matches_the_laplace_difference_formula():
    """Two candidates with scores 0 and d = 1 at eps = 1: the lower one wins when
    X - Y > d for X, Y ~ Lap(1); P = e^{-eps d} (1 + eps d / 2) / 2 = 0.27591 (the density of a
    difference of two Laplace variables). 40,000 draws: within 4 standard errors."""
    rng = np.random.default_rng(0)
    draws = 40_000
    wins = sum(report_noisy_max([0.0, 1.0], epsilon=1.0, rng=rng) == 0 for _ in range(draws))
    expected = math.exp(-1.0) * (1 + 0.5) / 2
    assert abs(expected - 0.275909) < 1e-5
    assert abs(wins / draws - expected) < 4 * math.sqrt(expected * (1 - expected) / draws)


def test_report_noisy_max_is_epsilon_dp_on_neighbouring_counts():
    """Monotone neighbours (every count up by 0 or 1): P[choice | D] <= e^eps P[choice | D'] for
    each choice, estimated on 40,000 draws each (eps = 0.5, three candidates)."""
    eps, draws = 0.5, 40_000
    for base, neighbour in (([3.0, 2.0, 0.0], [3.0, 3.0, 1.0]), ([1.0, 1.0, 1.0], [2.0, 1.0, 1.0])):
        freq = []
        for scores in (base, neighbour):
            rng = np.random.default_rng(1)
            picks = np.bincount([report_noisy_max(scores, epsilon=eps, rng=rng) for _ in range(draws)], minlength=3)
            freq.append(picks / draws)
        assert np.all(freq[0] <= math.exp(eps) * freq[1] + 0.01) and np.all(freq[1] <= math.exp(eps) * freq[0] + 0.01)


def test_report_noisy_max_refuses_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="epsilon"):
        report_noisy_max([1.0], epsilon=0.0, rng=rng)
    with pytest.raises(ValueError, match="scores"):
        report_noisy_max([], epsilon=1.0, rng=rng)


def test_decision_rounds_and_budget_by_hand():
    """20 rounds, 3 decisions: 1 + ceil(m 19 / 3) = 8, 14, 20; eps_d = 0.6 / 3 = 0.2; 4 rounds,
    2 decisions: 3, 4; more decisions than rounds 2..R: one per round."""
    assert decision_rounds(rounds=20, decisions=3) == (8, 14, 20)
    assert decision_rounds(rounds=4, decisions=2) == (3, 4)
    assert decision_rounds(rounds=3, decisions=10) == (2, 3)
    assert decision_epsilon(selection_epsilon=0.6, rounds=20, decisions=3) == pytest.approx(0.2)
    assert decision_epsilon(selection_epsilon=0.6, rounds=3, decisions=10) == pytest.approx(0.3)
    assert dp_sgd_target(target_epsilon=4.0, selection_epsilon=0.4) == pytest.approx(3.6)
    with pytest.raises(ValueError, match="selection-epsilon"):
        dp_sgd_target(target_epsilon=1.0, selection_epsilon=1.0)


def test_config_refuses_a_selection_budget_at_or_above_the_target():
    with pytest.raises(ConfigError, match="privacy.selection-epsilon: must be below"):
        load_config(overrides={"privacy.selection": "noisy-max", "privacy.target-epsilon": 1.0,
                               "privacy.selection-epsilon": 1.0})


def test_selection_ledger_never_decreases_and_charges_the_whole_budget():
    row = selection_ledger(previous=None, selection_epsilon=0.4, site_claim=0.0)
    assert row == {"selection": "noisy-max", "selection-epsilon": 0.4, "selection-delta": 0.0}
    assert selection_ledger(previous={"selection-epsilon": 0.5}, selection_epsilon=0.4)["selection-epsilon"] == 0.5
    assert selection_ledger(previous=row, selection_epsilon=0.4, site_claim=0.7)["selection-epsilon"] == 0.7


def test_plan_leaves_room_and_the_ledger_composes_to_at_most_the_target():
    """With selection on, DP-SGD is calibrated for target - eps_sel (real Opacus RDP accounting);
    the server's row composes the two: combined = DP-SGD's epsilon + eps_sel <= target, and
    never below either part."""
    config = load_config(overrides={"privacy.enabled": True, "privacy.accountant": "rdp", "num-server-rounds": 2,
                                    "privacy.selection": "noisy-max", "privacy.selection-epsilon": 1.0,
                                    "privacy.target-epsilon": 3.0})
    plan = site_privacy_plan(config, 20)  # q = 1: a quick calibration
    assert plan.target_epsilon == pytest.approx(2.0)
    ledger = PrivacyLedger(plan)
    ledger.record(plan.planned_steps)
    metrics = ledger_metrics(ledger, round_steps=plan.planned_steps)
    row = privacy_row(config=config, metrics={**metrics, "selection-epsilon": 0.5}, previous=None)
    assert row["selection-epsilon"] == 1.0  # the whole budget, above the site's claim so far
    assert row["combined-epsilon"] == pytest.approx(row["epsilon-spent"] + 1.0)
    assert row["epsilon-spent"] <= 2.0 + 1e-9 and row["combined-epsilon"] <= 3.0 + 1e-9
    assert row["combined-epsilon"] >= max(row["epsilon-spent"], row["selection-epsilon"])
