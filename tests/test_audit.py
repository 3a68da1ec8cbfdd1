"""Known-answer and property tests of the audit maths (fedkd.audit), and real training:
an overfit model leaks membership, the same model under DP-SGD (Opacus, epsilon 1) does
not, and the one-run epsilon lower bound stays below the accountant's epsilon."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from fedkd.audit.attacks import ATTACKS, lira_offline, lira_online, log_prob_of_label, logit_confidence, \
    loss_attack, reference_masks
from fedkd.audit.exposure import candidate_fillings, exposure_by_rank, exposure_by_skewnorm, fill
from fedkd.audit.metrics import attack_metrics
from fedkd.audit.one_run import epsilon_lower_bound, one_run_audit, p_value


# ------------------------------------------------------------------ metrics


def test_identical_member_and_non_member_scores_give_auc_one_half_within_the_ci():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=400)
    labels = np.tile([0, 1], 200)
    same = attack_metrics(scores=np.zeros(400), labels=labels, num_bootstrap=100)
    assert same.auc == 0.5 and same.advantage == 0.0 and same.tpr_at_1pct == 0.0
    noise = attack_metrics(scores=scores, labels=labels, num_bootstrap=100)
    assert noise.auc_ci[0] <= 0.5 <= noise.auc_ci[1]
    assert noise.auc_ci[0] < noise.auc < noise.auc_ci[1]


def test_perfectly_separated_scores_give_auc_one():
    labels = np.array([1] * 50 + [0] * 150)
    scores = np.where(labels == 1, 5.0, 0.0) + np.linspace(0, 1, 200)
    m = attack_metrics(scores=scores, labels=labels, num_bootstrap=50)
    assert m.auc == 1.0 and m.auc_ci == pytest.approx((1.0, 1.0))
    assert m.tpr_at_1pct == 1.0 and m.tpr_at_01pct == 1.0 and m.advantage == 1.0
    assert (m.members, m.non_members) == (50, 150)
    flipped = attack_metrics(scores=-scores, labels=labels, num_bootstrap=0)
    assert flipped.auc == 0.0


def test_metrics_refuse_one_class_and_non_finite_scores():
    with pytest.raises(ValueError, match="both members"):
        attack_metrics(scores=np.ones(3), labels=np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        attack_metrics(scores=np.array([0.0, np.nan]), labels=np.array([0, 1]))


# ------------------------------------------------------------------ attacks


def test_loss_and_logit_confidence_match_their_formulas():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(20, 5)) * 3
    labels = rng.integers(0, 5, 20)
    p = torch.softmax(torch.tensor(logits), -1).numpy()[np.arange(20), labels]
    assert np.allclose(log_prob_of_label(logits, labels), np.log(p))
    assert np.allclose(loss_attack(logits=logits, labels=labels), np.log(p))
    assert np.allclose(logit_confidence(logits, labels), np.log(p / (1 - p)))
    # stable where p rounds to 1 in floating point
    huge = np.array([[200.0, 0.0, 0.0]])
    assert logit_confidence(huge, np.array([0]))[0] == pytest.approx(200 - math.log(2))
    assert sorted(ATTACKS.names()) == ["lira-offline", "lira-online", "loss"]


def _gaussian_world(shift: float, seed: int = 0):
    """Logits whose label confidence is N(0, 1) + shift when the example was trained on."""
    rng = np.random.default_rng(seed)
    n, refs = 300, 16
    difficulty = rng.normal(0, 2, n)  # per-example offset LiRA calibrates away
    masks = reference_masks(num_models=refs, pool_size=n, seed=seed)
    conf = difficulty + rng.normal(0, 1, (refs, n)) + shift * masks
    members = rng.random(n) < 0.5
    target_conf = difficulty + rng.normal(0, 1, n) + shift * members

    def as_logits(c):  # two classes, label 0: confidence = z_0 - z_1
        return np.stack([c, np.zeros_like(c)], axis=-1)

    return as_logits(target_conf), np.zeros(n, np.int64), as_logits(conf), masks, members


def test_lira_finds_members_that_loss_misses_and_stays_at_chance_without_signal():
    logits, labels, ref, masks, members = _gaussian_world(shift=2.0)
    assert masks.sum(axis=1).tolist() == [150] * 16
    online = attack_metrics(scores=lira_online(logits=logits, labels=labels, reference_logits=ref, in_mask=masks),
                            labels=members, num_bootstrap=0).auc
    offline = attack_metrics(scores=lira_offline(logits=logits, labels=labels, reference_logits=ref,
                                                 in_mask=masks), labels=members, num_bootstrap=0).auc
    loss = attack_metrics(scores=loss_attack(logits=logits, labels=labels), labels=members, num_bootstrap=0).auc
    assert online > 0.85 and offline > 0.85 and loss < 0.8  # per-example calibration pays
    logits, labels, ref, masks, members = _gaussian_world(shift=0.0, seed=3)
    m = attack_metrics(scores=lira_online(logits=logits, labels=labels, reference_logits=ref, in_mask=masks),
                       labels=members, num_bootstrap=100)
    assert m.auc_ci[0] <= 0.5 <= m.auc_ci[1]


# ------------------------------------------------------------------ exposure


def test_exposure_known_answers():
    space = 1000
    others = np.arange(1.0, 1000.0)  # 999 other fillings, losses 1..999
    assert exposure_by_rank(canary_loss=0.5, candidate_losses=others, space_size=space) == pytest.approx(math.log2(1000))
    assert exposure_by_rank(canary_loss=1000.0, candidate_losses=others, space_size=space) == pytest.approx(0.0)
    # a sample of 100 of the 999: half below -> rank ~ 500
    sample = np.linspace(1, 999, 100)
    assert exposure_by_rank(canary_loss=500.0, candidate_losses=sample, space_size=space) == pytest.approx(1.0, abs=0.02)
    rng = np.random.default_rng(0)
    losses = rng.normal(5, 1, 2000)
    assert exposure_by_skewnorm(canary_loss=5.0, candidate_losses=losses) == pytest.approx(1.0, abs=0.15)
    assert exposure_by_skewnorm(canary_loss=-1.0, candidate_losses=losses) > 20  # beyond the sample
    fills, size = candidate_fillings(fmt="pin {} {}", exclude=[(4, 2)], max_candidates=1000, seed=0)
    assert size == 100 and len(fills) == 99 and (4, 2) not in fills
    fills, size = candidate_fillings(fmt="pin {} {} {} {}", exclude=[(1, 2, 3, 4)], max_candidates=50, seed=0)
    assert size == 10_000 and len(set(fills)) == 50
    assert fill("my pin is {} {} {} {}", (4, 8, 1, 5)) == "my pin is 4 8 1 5"


# ------------------------------------------------------------------ one-run bound


def test_one_run_p_value_and_bound_known_answers():
    # all 100 guesses right: P[Bin(100, q) = 100] = q^100 = 0.05 at q = 0.05^(1/100)
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(m=1000, r=100, v=100, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert epsilon_lower_bound(m=1000, r=100, v=50, delta=0.0) == 0.0  # chance level
    assert p_value(m=100, r=10, v=10, eps=0.0, delta=0.0) == pytest.approx(0.5**10)
    # delta only loosens the test
    assert p_value(m=1000, r=100, v=90, eps=1.0, delta=1e-3) > p_value(m=1000, r=100, v=90, eps=1.0, delta=0.0)
    assert epsilon_lower_bound(m=1000, r=100, v=90, delta=1e-3) < epsilon_lower_bound(m=1000, r=100, v=90, delta=0)
    # p-value falls as eps rises
    ps = [p_value(m=100, r=40, v=35, eps=e, delta=0.0) for e in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert ps == sorted(ps)


def test_epsilon_ceiling_is_every_guess_right_at_the_largest_guess_count():
    from fedkd.audit.one_run import epsilon_ceiling

    # m = 100: k in {1, 2, 5, 10, 20, 50}, beta split 6 ways; all 100 guesses right:
    # q^100 = 0.05 / 6, eps = logit(q)
    q = (0.05 / 6) ** (1 / 100)
    assert epsilon_ceiling(m=100, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert epsilon_ceiling(m=1000, delta=0.0) > epsilon_ceiling(m=100, delta=0.0)  # more canaries
    assert epsilon_ceiling(m=1, delta=0.0) == 0.0  # no guess count fits


def test_audit_report_marks_its_ceiling_and_blanks_unresolvable_low_fpr():
    from fedkd.audit.report import audit_markdown

    attack = {"auc": 0.6, "auc_ci": [0.5, 0.7], "tpr_at_1pct": 0.02, "tpr_at_1pct_ci": [0.0, 0.05],
              "tpr_at_01pct": 0.01, "tpr_at_01pct_ci": [0.0, 0.03], "advantage": 0.15,
              "advantage_ci": [0.05, 0.25],
              "one-run": {"epsilon_lower_bound": 0.3, "confidence": 0.95, "delta": 0.0, "canaries": 100,
                          "guesses": 20, "correct": 15, "tried": []}}
    result = {"run": "/runs/r", "site": 0, "candidates": 100, "members": 50, "canary-labels": 10,
              "reference-models": 4, "rounds-released": 2,
              "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-5},
              "shield": {"temperature": 1, "gamma": 0, "noise_std": 0, "scorer": "uniform", "top_k": 0},
              "accuracy": {"alma": 0.9, "site": 0.9, "global": 0.8},
              "targets": {"site-model": {"threat-model": "white-box", "attacks": {"loss": attack}}},
              "epsilon-lower-bound": {"max": 0.3, "where": "site-model/loss"}, "seconds": 1.0}
    text = audit_markdown(result)
    q = (0.05 / 6) ** (1 / 100)
    assert f"could certify, every guess right, is {math.log(q / (1 - q)):.2f}; the accountant's 8.00 is above it" in text
    row = next(line for line in text.splitlines() if line.startswith("| site-model |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[6] == ""  # TPR@0.1%FPR with 50 non-members: unresolvable, blank
    assert cells[7] == "0.150 [0.050, 0.250]"  # advantage with its CI


def test_one_run_audit_uses_top_and_bottom_guesses():
    included = np.array([True] * 100 + [False] * 100)
    perfect = one_run_audit(scores=included.astype(float) + np.linspace(0, 0.1, 200), included=included)
    assert perfect.correct == perfect.guesses == 200 and perfect.epsilon_lower_bound > 2.5
    rng = np.random.default_rng(0)
    coin = one_run_audit(scores=rng.normal(size=200), included=rng.random(200) < 0.5)
    assert coin.epsilon_lower_bound < 0.5


# ------------------------------------------------------------------ real training


@pytest.fixture(scope="module")
def canary_world():
    """150 clean digits always trained on, 200 mislabeled canaries each included w.p. 1/2."""
    from sklearn.datasets import load_digits

    from fedkd.data import ArrayDataset

    b = load_digits()
    x, y = (b.data / 16).astype(np.float32), b.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    base, cand = order[:150], order[150:350]
    cy = (y[cand] + rng.integers(1, 10, len(cand))) % 10
    included = rng.random(len(cand)) < 0.5
    train = ArrayDataset(np.concatenate([x[base], x[cand][included]]),
                         np.concatenate([y[base], cy[included]]), np.arange(150 + included.sum()))
    return train, x[cand], cy, included


def _train(train, *, epsilon):
    from fedkd.distillation import train_supervised
    from fedkd.models import build_model
    from fedkd.privacy import PrivacyLedger, plan_privacy, train_private

    torch.manual_seed(0)
    model = build_model("mlp-small", input_shape=(64,), num_classes=10, seed=0)
    if epsilon is None:
        train_supervised(model, train, epochs=25, batch_size=32, lr=1e-2, seed=0)
        return model, None, None
    plan = plan_privacy(target_epsilon=epsilon, num_examples=len(train), batch_size=64,
                        epochs_per_round=10, rounds=1)
    ledger = PrivacyLedger(plan)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        result = train_private(model, train, plan=plan, ledger=ledger, lr=3e-3, seed=0)
    assert not result.stopped
    return model, ledger.epsilon(), plan.delta


@pytest.fixture(scope="module")
def overfit(canary_world):
    return _train(canary_world[0], epsilon=None)[0]


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_dp_training_leaks_less_and_the_one_run_bound_stays_below_the_accountant(canary_world, overfit, epsilon):
    from fedkd.distillation import predict_logits

    train, cx, cy, included = canary_world
    private, spent, delta = _train(train, epsilon=epsilon)
    scores = {name: loss_attack(logits=predict_logits(m, cx), labels=cy) for name, m in
              (("overfit", overfit), ("dp", private))}
    leak = {k: attack_metrics(scores=s, labels=included, num_bootstrap=50) for k, s in scores.items()}
    assert leak["overfit"].auc > 0.85
    if epsilon == 1.0:
        assert leak["overfit"].auc > leak["dp"].auc + 0.2
        assert leak["dp"].auc_ci[0] <= 0.5 + 0.1
    bound_overfit = one_run_audit(scores=scores["overfit"], included=included, delta=delta)
    bound_dp = one_run_audit(scores=scores["dp"], included=included, delta=delta)
    assert 0 < spent <= epsilon
    assert bound_dp.epsilon_lower_bound <= spent
    assert bound_overfit.epsilon_lower_bound > 0.5  # 200 canaries suffice without DP


def test_each_target_gets_a_verdict_line():
    from fedkd.audit.report import target_verdict

    leaks = {"attacks": {"loss": {"auc_ci": [0.52, 0.61]}, "lira": {"auc_ci": [0.49, 0.58]}}}
    assert target_verdict("released knowledge", leaks) == (
        "- **released knowledge**: leaks membership: loss (AUC CI excludes 0.5); no evidence from lira.")
    quiet = {"attacks": {"loss": {"auc_ci": [0.40, 0.55]}}}
    assert target_verdict("final model", quiet) == (
        "- **final model**: no evidence of membership leakage: every AUC CI (loss) includes 0.5.")
