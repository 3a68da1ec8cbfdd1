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
    loss_attack, output_features, reference_masks, rmia_scores, trained_scores
from fedkd.audit.exposure import candidate_fillings, exposure_by_rank, exposure_by_skewnorm, fill
from fedkd.audit.metrics import attack_metrics, bootstrap_draws, curve_metrics, simultaneous_confidence, \
    strongest_attack
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


def test_vectorised_replicate_formulas_match_scikit_learn_with_unit_weights():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(2)
    labels = rng.random(300) < 0.4
    scores = np.round(rng.normal(size=300) + labels, 1)  # many ties
    fpr, tpr, _ = roc_curve(labels, scores)
    got = curve_metrics(scores=scores, labels=labels)
    assert got["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["advantage"] == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    for alpha in (0.01, 0.001, 0.1):
        ok = fpr <= alpha + 1e-12
        expected = tpr[ok].max() if ok.any() else 0.0
        if alpha in (0.01, 0.001):
            assert got[f"tpr@{alpha:g}"] == pytest.approx(expected, abs=1e-12)
    # a replicate that duplicates one member and drops another, by hand: members scores
    # {3, 1} -> {3, 3}, non-members {2, 0}: AUC = (1 + 1 + 1 + 1) / 4 = 1
    draws = bootstrap_draws(scores=np.array([3.0, 1.0, 2.0, 0.0]), labels=np.array([1, 1, 0, 0]),
                            num_bootstrap=400, seed=0)
    assert set(np.round(draws["auc"], 6)) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert draws["auc"].max() == 1.0 and draws["auc"].min() <= 0.5


def _realistic_scores():
    """100 members / 100 non-members: a weak shift plus 15% strongly memorised members."""
    rng = np.random.default_rng(5)
    labels = np.r_[np.ones(100), np.zeros(100)].astype(int)
    return rng.normal(size=200) + 0.6 * labels + 3.0 * labels * (rng.random(200) < 0.15), labels


def test_interval_ends_move_less_than_0_01_between_bootstrap_seeds_at_the_default_replicates():
    scores, labels = _realistic_scores()

    def spread(num_bootstrap=None):
        extra = {} if num_bootstrap is None else {"num_bootstrap": num_bootstrap}
        runs = [attack_metrics(scores=scores, labels=labels, seed=seed, **extra) for seed in (1, 2)]
        return max(abs(a - b) for key in ("auc_ci", "tpr_at_1pct_ci", "tpr_at_01pct_ci", "advantage_ci")
                   for a, b in zip(getattr(runs[0], key), getattr(runs[1], key)))

    assert spread() <= 0.01 + 1e-9
    assert attack_metrics.__kwdefaults__["num_bootstrap"] == 10_000
    assert spread(200) > 0.01  # what the old default did: the test can fail


def test_strongest_attack_rule_and_bonferroni_level():
    attacks = {
        "loss": {"tpr_at_1pct_ci": (0.0, 0.05), "auc_ci": (0.55, 0.70), "auc": 0.62},
        "rmia": {"tpr_at_1pct_ci": (0.03, 0.20), "auc_ci": (0.50, 0.66), "auc": 0.58},
        "lira": {"tpr_at_1pct_ci": (0.03, 0.25), "auc_ci": (0.52, 0.66), "auc": 0.59},
    }
    assert strongest_attack(attacks=attacks) == "lira"  # tie on TPR lower bound, higher AUC lower bound
    quiet = {"a": {"tpr_at_1pct_ci": (0.0, 0.02), "auc_ci": (0.45, 0.55), "auc": 0.50},
             "b": {"tpr_at_1pct_ci": (0.0, 0.02), "auc_ci": (0.45, 0.55), "auc": 0.50}}
    assert strongest_attack(attacks=quiet) == "a"  # full tie: the first name
    assert simultaneous_confidence(confidence=0.95, num_attacks=5) == pytest.approx(0.99)
    with pytest.raises(ValueError, match="attacks: need at least one"):
        strongest_attack(attacks={})


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
    assert sorted(ATTACKS.names()) == ["lira-offline", "lira-online", "loss", "rmia", "rmia-online",
                                       "trained-gb", "trained-rf"]


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


def _two_class_logits(p):
    """Logits whose softmax probability of label 0 is exactly ``p``."""
    p = np.asarray(p, dtype=np.float64)
    return np.stack([np.log(p), np.log1p(-p)], axis=-1)


def test_rmia_known_answer_by_hand():
    # 2 candidates, 2 reference models (model 0 trained on x2, model 1 on x1), 3 population samples
    inputs = dict(
        target_probs=np.array([0.8, 0.4]),
        reference_probs=np.array([[0.2, 0.9], [0.6, 0.3]]),
        in_mask=np.array([[False, True], [True, False]]),
        population_target_probs=np.array([0.5, 0.9, 0.6]),
        population_reference_probs=np.array([[0.4, 0.8, 0.2], [0.6, 0.8, 0.3]]),
    )
    # offline, a = 0.5: p(x) = (1.5 p_OUT + 0.5) / 2 -> p(x1) = 0.4, p(x2) = 0.475;
    # r(x) = 2.0, 0.842; p(z) = 0.625, 0.85, 0.4375 -> r(z) = 0.8, 1.059, 1.371
    # gamma 1: x1 beats all 3, x2 only z1 (0.842 / 0.8 >= 1)
    assert rmia_scores(**inputs, offline_a=0.5) == pytest.approx([1.0, 1 / 3])
    # gamma 2: x1 needs r(z) <= 1.0 (z1 only), x2 none
    assert rmia_scores(**inputs, offline_a=0.5, gamma=2.0) == pytest.approx([1 / 3, 0.0])
    # online: p(x) = (p_IN + p_OUT) / 2 = 0.4, 0.6 -> r(x) = 2.0, 0.667; p(z) = p_OUT(z) =
    # 0.5, 0.8, 0.25 -> r(z) = 1.0, 1.125, 2.4: x1 beats z1, z2; x2 none
    assert rmia_scores(**inputs, online=True) == pytest.approx([2 / 3, 0.0])
    # the registered attack reads the same numbers from logits
    labels = np.zeros(2, np.int64)
    got = ATTACKS.get("rmia")(
        logits=_two_class_logits(inputs["target_probs"]), labels=labels,
        reference_logits=_two_class_logits(inputs["reference_probs"]), in_mask=inputs["in_mask"],
        population_logits=_two_class_logits(inputs["population_target_probs"]),
        population_labels=np.zeros(3, np.int64),
        population_reference_logits=_two_class_logits(inputs["population_reference_probs"]), offline_a=0.5)
    assert got == pytest.approx([1.0, 1 / 3])
    with pytest.raises(ValueError, match=r"offline_a: must be in \[0, 1\]; got 1.5"):
        rmia_scores(**inputs, offline_a=1.5)
    with pytest.raises(ValueError, match="RMIA needs"):
        ATTACKS.get("rmia")(logits=_two_class_logits([0.5, 0.5]), labels=labels)


def test_rmia_separates_synthetic_members_and_stays_at_chance_without_signal():
    for shift, seed in ((2.0, 0), (0.0, 4)):
        logits, labels, ref, masks, members = _gaussian_world(shift=shift, seed=seed)
        rng = np.random.default_rng(seed + 100)
        difficulty = rng.normal(0, 2, 400)  # population: OUT of the target and of every reference
        pop = np.stack([difficulty + rng.normal(0, 1, 400), np.zeros(400)], -1)
        pop_ref = np.stack([difficulty + rng.normal(0, 1, (16, 400)), np.zeros((16, 400))], -1)
        kwargs = dict(logits=logits, labels=labels, reference_logits=ref, in_mask=masks, population_logits=pop,
                      population_labels=np.zeros(400, np.int64), population_reference_logits=pop_ref)
        for name in ("rmia", "rmia-online"):
            m = attack_metrics(scores=ATTACKS.get(name)(**kwargs), labels=members, num_bootstrap=1000)
            if shift:
                assert m.auc > 0.85, name
            else:
                assert m.auc_ci[0] <= 0.5 <= m.auc_ci[1], name


def test_output_features_by_hand():
    logits = np.log(np.array([[0.1, 0.7, 0.2]]))
    f = output_features(logits, np.array([2]))
    assert f.shape == (1, 6)
    assert f[0, :3] == pytest.approx(np.log([0.7, 0.2, 0.1]))
    assert f[0, 3] == pytest.approx(np.log(0.2 / 0.8))  # phi of label 2
    assert f[0, 4] == 1  # label 2 is the second most probable
    assert f[0, 5] == pytest.approx(-(0.1 * np.log(0.1) + 0.7 * np.log(0.7) + 0.2 * np.log(0.2)))


def test_trained_attack_separates_synthetic_members():
    rng = np.random.default_rng(0)
    n = 200
    members = rng.random(n) < 0.5
    labels = rng.integers(0, 10, n)
    logits = rng.normal(0, 1, (n, 10))
    logits[np.arange(n), labels] += np.where(members, 3.0, 0.5)  # members: confident on their label
    for name in ("trained-rf", "trained-gb"):
        s = ATTACKS.get(name)(logits=logits, labels=labels, membership=members, seed=0)
        assert attack_metrics(scores=s, labels=members, num_bootstrap=0).auc > 0.85, name


def test_trained_attack_scores_are_out_of_fold():
    # random features: a forest scored on its own training rows memorises them (AUC ~ 1);
    # out-of-fold scores must stay at chance
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(1)
    features = rng.normal(size=(200, 6))
    members = rng.random(200) < 0.5
    in_sample = RandomForestClassifier(n_estimators=300, min_samples_leaf=2, random_state=0).fit(features, members)
    assert attack_metrics(scores=in_sample.predict_proba(features)[:, 1], labels=members,
                          num_bootstrap=0).auc > 0.95
    for folds in (2, 5):
        s = trained_scores(features=features, membership=members, folds=folds, seed=0)
        assert np.isfinite(s).all()
        m = attack_metrics(scores=s, labels=members, num_bootstrap=1000)
        assert m.auc_ci[0] <= 0.5 <= m.auc_ci[1], folds
    # make row 0 an outlier: every model that trained on it changes; the rows held out with
    # row 0 are scored by the model of the other fold, which never saw it, so their scores
    # stay exactly the same (an in-sample scorer would move them)
    from sklearn.model_selection import StratifiedKFold

    base = trained_scores(features=features, membership=members, folds=2, seed=0)
    moved = features.copy()
    moved[0] += 100.0
    again = trained_scores(features=moved, membership=members, folds=2, seed=0)
    held = next(h for _, h in StratifiedKFold(2, shuffle=True, random_state=0).split(features, members) if 0 in h)
    others = np.setdiff1d(np.arange(200), held)
    assert np.array_equal(base[held[held != 0]], again[held[held != 0]])
    assert not np.array_equal(base[others], again[others])  # the fold that trained on row 0 did change
    with pytest.raises(ValueError, match="folds: must be an integer from 2"):
        trained_scores(features=features, membership=members, folds=1)
    with pytest.raises(ValueError, match="classifier: must be one of random-forest, gradient-boosting; got 'svm'"):
        trained_scores(features=features, membership=members, classifier="svm")


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
    # several canaries at once (one fit): the same values, in their shape; N(5, 1)'s CDF at 4 is 0.1587
    both = exposure_by_skewnorm(canary_loss=np.array([5.0, 4.0]), candidate_losses=losses)
    assert both.shape == (2,) and both[0] == pytest.approx(1.0, abs=0.15)
    assert both[1] == pytest.approx(-math.log2(0.1587), abs=0.2)
    # a one-hot release gives two losses (label kept: 0, flipped: -log 1e-6): no skew-normal
    # describes that, so the estimate is undefined, not the degenerate fit's number
    two = np.where(rng.random(2000) < 0.35, 0.0, -math.log(1e-6))
    assert math.isnan(exposure_by_skewnorm(canary_loss=0.0, candidate_losses=two))
    assert exposure_by_skewnorm(canary_loss=0.0, candidate_losses=np.zeros(50)) == 0.0  # a full tie
    assert math.isfinite(exposure_by_skewnorm(canary_loss=5.0, candidate_losses=losses[:10]))  # few, all distinct
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


def test_an_exposure_averaged_over_release_draws_shows_its_spread():
    from fedkd.audit.report import _exposure_cell

    assert _exposure_cell({"rank": 1.904, "rank-q05": 0.82, "rank-q95": 3.951, "draws": 100}) == "1.90 [0.82, 3.95]"
    assert _exposure_cell({"rank": 9.37}) == "9.37"  # a deterministic release: one draw, no spread
