"""fedkd.privacy.release: k-ary randomized response on released labels, and its ledger."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chisquare

from fedkd.privacy.release import (
    combined_epsilon,
    composed_release_epsilon,
    epsilon_per_round,
    keep_probability,
    label_release,
    mechanism_epsilon,
    randomized_response,
    release_ledger,
    response_distribution,
    with_combined,
    withhold_rows,
)


def test_keep_probability_by_hand():
    # eps = ln 9, K = 10: e^eps / (e^eps + 9) = 9 / 18 = 1/2
    assert keep_probability(epsilon=math.log(9), num_classes=10) == pytest.approx(0.5)
    # eps = ln 3, K = 2 (Warner's binary RR): 3 / 4
    assert keep_probability(epsilon=math.log(3), num_classes=2) == pytest.approx(0.75)
    dist = response_distribution(label=2, epsilon=math.log(9), num_classes=10)
    np.testing.assert_allclose(dist, [1 / 18] * 2 + [1 / 2] + [1 / 18] * 7)
    assert keep_probability(epsilon=1000.0, num_classes=10) == pytest.approx(1.0)  # no overflow


@pytest.mark.parametrize("epsilon", [0.5, 2.0, math.log(9)])
def test_epsilon_equals_the_hand_computed_probability_ratio(epsilon):
    """max / min output probability = (e^eps / (e^eps + K - 1)) / (1 / (e^eps + K - 1)) = e^eps."""
    k = 10
    keep = math.exp(epsilon) / (math.exp(epsilon) + k - 1)
    other = 1 / (math.exp(epsilon) + k - 1)
    assert math.log(keep / other) == pytest.approx(epsilon)
    assert mechanism_epsilon(epsilon=epsilon, num_classes=k) == pytest.approx(epsilon, abs=1e-12)


@pytest.mark.parametrize("epsilon, k", [(1.0, 10), (math.log(9), 10), (0.3, 3)])
def test_output_distribution_matches_the_formula(epsilon, k):
    """200,000 draws from true label 1: chi-square goodness of fit to the formula."""
    rng = np.random.default_rng(7)
    draws = randomized_response(np.ones(200_000, dtype=np.int64), epsilon=epsilon, num_classes=k, rng=rng)
    observed = np.bincount(draws, minlength=k)
    expected = response_distribution(label=1, epsilon=epsilon, num_classes=k) * len(draws)
    assert chisquare(observed, expected).pvalue > 1e-3
    # and the test has power: a mechanism that keeps 2 points more often is rejected
    wrong = expected.copy()
    wrong[1] += 0.02 * len(draws)
    wrong[[0, 2]] -= 0.01 * len(draws)
    assert chisquare(observed, wrong).pvalue < 1e-6


def test_label_release_rows_are_one_hot_of_the_released_label():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=500)
    rows, flipped = label_release(probs, epsilon=math.log(9), rng=rng)
    np.testing.assert_array_equal(rows.sum(axis=1), 1.0)
    assert set(np.unique(rows)) == {0.0, 1.0}
    changed = rows.argmax(axis=1) != probs.argmax(axis=1)
    assert flipped == changed.mean() and 0.4 < flipped < 0.6  # keep probability 1/2
    smooth, _ = label_release(probs, epsilon=math.log(9), rng=np.random.default_rng(0), smoothing=0.1)
    np.testing.assert_allclose(smooth.max(axis=1), 0.9 + 0.01)
    np.testing.assert_allclose(smooth.sum(axis=1), 1.0)


def test_invalid_release_settings_name_the_key():
    with pytest.raises(ValueError, match="shield.release-epsilon must be a finite number > 0; got 0"):
        keep_probability(epsilon=0, num_classes=10)
    with pytest.raises(ValueError, match=r"shield.release-smoothing must be in \[0, 1\); got 1.0"):
        label_release(np.eye(3), epsilon=1.0, rng=np.random.default_rng(0), smoothing=1.0)


def test_composition_is_never_below_either_part():
    assert composed_release_epsilon(epsilon_per_round=0.5, rounds=20) == 10.0
    for dp, release in [(0.0, 1.0), (3.9, 0.0), (3.9, 2.0), (0.1, 40.0)]:
        eps, delta = combined_epsilon(dp_epsilon=dp, dp_delta=1e-5, release_epsilon=release)
        assert eps >= dp and eps >= release and delta == 1e-5
    row = {"epsilon-spent": 3.9, "delta": 1e-5}
    previous = None
    for r in range(1, 4):  # three accepted rounds at 2.0 per round
        previous = with_combined({**row, **release_ledger(previous=previous, epsilon_per_round=2.0)})
        assert previous["release-rounds"] == r and previous["release-epsilon"] == 2.0 * r
        assert previous["combined-epsilon"] == 3.9 + 2.0 * r >= max(3.9, 2.0 * r)
    # a site that claims more than the server counted is charged its claim; never lowered
    more = release_ledger(previous=previous, epsilon_per_round=2.0, site_claim=50.0)
    assert more["release-epsilon"] == 50.0
    assert release_ledger(previous=more, epsilon_per_round=2.0)["release-epsilon"] == 50.0


def test_through_site_round_rows_are_one_hot_and_the_ledger_carries_the_release():
    from fedkd.config import load_config
    from fedkd.data import load_federation
    from fedkd.federation.server import privacy_row
    from fedkd.federation.site import SiteInbox, SiteState, site_round

    config = load_config(overrides={"data.num-clients": 3, "train.local-epochs": 1, "train.distill-epochs": 1,
                                    "train.target-choice": "fused", "shield.release": "label-rr",
                                    "shield.release-epsilon": 1.5, "privacy.enabled": True,
                                    "privacy.target-epsilon": 8.0, "model.architectures": "mlp-small"})
    split = load_federation(config.data, config.seed)
    state = SiteState.fresh(config=config, split=split, client=0)
    row = None
    for r in (1, 2):
        inbox = SiteInbox(round_number=r, public_fingerprint=split.public_fingerprint, config_digest=config.digest())
        reply = site_round(config=config, split=split, client=0, state=state, inbox=inbox)
        knowledge = reply.arrays["knowledge"].astype(np.float64)
        assert set(np.unique(knowledge)) == {0.0, 1.0}
        np.testing.assert_array_equal(knowledge.sum(axis=1), 1.0)
        assert reply.metrics["release-epsilon"] == 1.5 * r
        assert 0.0 <= reply.metrics["release-flipped"] <= 1.0
        row = privacy_row(config=config, metrics=reply.metrics, previous=row)
        assert row["release-epsilon"] == 1.5 * r and row["release-delta"] == 0.0
        assert row["combined-epsilon"] == row["epsilon-spent"] + 1.5 * r
        assert row["combined-delta"] == row["delta"] == 1e-5
    # a release-only site (no DP-SGD) still has a ledger row, with no DP figures
    plain = load_config(overrides={**config.to_flat(), "privacy.enabled": False})
    state = SiteState.fresh(config=plain, split=split, client=1)
    inbox = SiteInbox(round_number=1, public_fingerprint=split.public_fingerprint, config_digest=plain.digest())
    reply = site_round(config=plain, split=split, client=1, state=state, inbox=inbox)
    only = privacy_row(config=plain, metrics=reply.metrics, previous=None)
    assert only["release-epsilon"] == 1.5 and "epsilon-spent" not in only and "combined-epsilon" not in only


def test_release_draws_from_the_site_noise_source():
    """Same seed, same released labels; another seed, other labels (the site's noise seed)."""
    probs = np.random.default_rng(1).dirichlet(np.ones(10), size=300)
    a, _ = label_release(probs, epsilon=1.0, rng=np.random.default_rng(5))
    b, _ = label_release(probs, epsilon=1.0, rng=np.random.default_rng(5))
    c, _ = label_release(probs, epsilon=1.0, rng=np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------- targeted rows (release-rows)


def test_label_release_randomizes_only_the_chosen_rows():
    """Unchosen rows come back unchanged; chosen rows are one-hots whose labels follow the
    k-ary RR distribution (chi-square against the hand-computed e^eps/(e^eps+K-1))."""
    k, eps, p = 4, math.log(3), 6000  # keep = 3 / (3 + 3) = 1/2, each other class 1/6
    probs = np.tile([0.1, 0.6, 0.2, 0.1], (p, 1))
    chosen = np.arange(p) % 3 == 0
    out, flipped = label_release(probs, epsilon=eps, rng=np.random.default_rng(0), rows=chosen)
    np.testing.assert_array_equal(out[~chosen], probs[~chosen])
    onehots = out[chosen]
    assert set(np.unique(onehots)) == {0.0, 1.0}
    counts = np.bincount(onehots.argmax(axis=1), minlength=k)
    n = int(chosen.sum())
    expected = n * np.array([1 / 6, 1 / 2, 1 / 6, 1 / 6])
    assert chisquare(counts, expected).pvalue > 1e-3
    # the flipped share counts chosen rows only, over all rows
    assert flipped == pytest.approx(np.mean(onehots.argmax(axis=1) != 1) * n / p)


def test_label_release_rows_do_not_change_the_draws_of_the_chosen_rows():
    """Choosing fewer rows leaves the released labels of the rows still chosen as they were."""
    probs = np.random.default_rng(1).dirichlet(np.ones(6), size=200)
    every, _ = label_release(probs, epsilon=1.0, rng=np.random.default_rng(3))
    some = np.random.default_rng(2).random(200) < 0.4
    part, _ = label_release(probs, epsilon=1.0, rng=np.random.default_rng(3), rows=some)
    np.testing.assert_array_equal(part[some], every[some])


def test_label_release_refuses_a_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"rows must be a \[P\] = \[5\] boolean mask"):
        label_release(np.full((5, 3), 1 / 3), epsilon=1.0, rng=np.random.default_rng(0), rows=np.ones(4, bool))


def test_release_ledger_names_the_rows_it_covers():
    assert release_ledger(previous=None, epsilon_per_round=1.0)["release-rows"] == "all"
    row = release_ledger(previous=None, epsilon_per_round=1.0, rows="pii")
    assert row["release-rows"] == "pii" and row["release-epsilon"] == 1.0
    with pytest.raises(ValueError, match="shield.release-rows must be one of all, pii; got 'some'"):
        release_ledger(previous=None, epsilon_per_round=1.0, rows="some")


def test_site_release_with_pii_rows_randomizes_exactly_the_pii_inputs():
    """The site's release step on text: rows whose detokenized public input has a PII-like
    match are one-hots, the others the shielded probabilities (softmax of the logits)."""
    from fedkd.config import load_config
    from fedkd.data.text import tokenize
    from fedkd.federation.site import release_knowledge
    from fedkd.fusion import softmax

    config = load_config(overrides={"data.dataset": "topics", "model.architectures": "bert-tiny",
                                    "global-student.model": "bert-tiny", "shield.release": "label-rr",
                                    "shield.release-rows": "pii", "shield.release-epsilon": 1.0})
    texts = ["my pin is 4 8 1 5", "the printer is broken", "hi, this is dana from billing", "where is my parcel"]
    ids = tokenize(texts, tokenizer=config.data.tokenizer, max_length=config.data.max_length)
    logits = np.random.default_rng(0).normal(size=(4, 6))
    out, stats = release_knowledge(config, logits, rng=np.random.default_rng(1), public_x=ids)
    np.testing.assert_allclose(out[[1, 3]], softmax(logits[[1, 3]]), atol=1e-12)
    for row in out[[0, 2]]:
        assert sorted(row) == [0.0] * 5 + [1.0]
    assert 0.0 <= stats.release_flipped <= 0.5


# ---------------------------------------------------------------- withhold


def test_withhold_rows_release_the_uniform_row_there_and_nothing_else_changes():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    out = withhold_rows(probs, rows=np.array([False, True, False]))
    np.testing.assert_array_equal(out[[0, 2]], probs[[0, 2]])
    np.testing.assert_array_equal(out[1], [1 / 3, 1 / 3, 1 / 3])
    # the output on a withheld row is the same for any input row: 0-DP there
    other = withhold_rows(np.array([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0], [0.6, 0.3, 0.1]]),
                          rows=np.array([False, True, False]))
    np.testing.assert_array_equal(out[1], other[1])
    from fedkd.fusion import informative_rows

    np.testing.assert_array_equal(informative_rows(out[None], 0.95)[0], [True, False, True])
    with pytest.raises(ValueError, match="a \\[P\\] boolean mask"):
        withhold_rows(probs, rows=np.ones(2, bool))


def test_epsilon_per_round_by_mechanism_and_the_withhold_ledger():
    assert epsilon_per_round(release="label-rr", epsilon=1.5) == 1.5
    assert epsilon_per_round(release="withhold", epsilon=1.5) == 0.0
    assert epsilon_per_round(release="none", epsilon=1.5) == 0.0
    with pytest.raises(ValueError, match="shield.release must be one of none, label-rr, withhold; got 'rr'"):
        epsilon_per_round(release="rr", epsilon=1.0)
    row = release_ledger(previous=None, epsilon_per_round=0.0, release="withhold", rows="pii")
    row = release_ledger(previous=row, epsilon_per_round=0.0, release="withhold", rows="pii")
    assert (row["release"], row["release-rounds"], row["release-epsilon"], row["release-rows"]) == ("withhold", 2, 0.0, "pii")
    with pytest.raises(ValueError, match="needs a release mechanism"):
        release_ledger(previous=None, epsilon_per_round=0.0, release="none")


def test_a_withholding_site_neither_releases_nor_distils_on_pii_rows():
    """Through the site's round on the embedded text data: the released rows whose public
    text has a PII-like match are uniform, the others are not; the fused rows a site distils
    on exclude those rows (the helper that drops them, checked against pii_rows by hand)."""
    from fedkd.config import load_config
    from fedkd.data import load_federation
    from fedkd.data.text import detokenize
    from fedkd.federation.site import SiteInbox, SiteState, _without_withheld_rows, site_round
    from fedkd.shielding import pii_rows

    config = load_config(overrides={"data.dataset": "topics", "data.text-examples": 240, "data.num-clients": 2,
                                    "model.architectures": "bert-tiny", "global-student.model": "bert-tiny",
                                    "train.local-epochs": 1, "train.distill-epochs": 1,
                                    "shield.release": "withhold", "shield.release-rows": "pii"})
    split = load_federation(config.data, config.seed)
    flagged = pii_rows(detokenize(split.public.x, tokenizer=config.data.tokenizer))
    assert 0 < flagged.sum() < len(flagged)
    state = SiteState.fresh(config=config, split=split, client=0)
    inbox = SiteInbox(round_number=1, public_fingerprint=split.public_fingerprint, config_digest=config.digest())
    reply = site_round(config=config, split=split, client=0, state=state, inbox=inbox)
    knowledge = reply.arrays["knowledge"].astype(np.float64)
    c = knowledge.shape[1]
    np.testing.assert_allclose(knowledge[flagged], 1.0 / c, atol=1e-3)  # float16 on the wire
    assert np.all(knowledge[~flagged].max(axis=1) > 1.0 / c + 1e-3)
    assert reply.metrics["release-epsilon"] == 0.0 and "release-flipped" not in reply.metrics
    positions = np.arange(len(flagged))
    fused = np.random.default_rng(0).dirichlet(np.ones(c), size=len(flagged))
    kept, kept_positions, consensus = _without_withheld_rows(config, split.public.x, fused, positions, fused)
    np.testing.assert_array_equal(kept_positions, positions[~flagged])
    np.testing.assert_array_equal(kept, fused[~flagged])
    np.testing.assert_array_equal(consensus, fused[~flagged])


def test_the_config_offers_exactly_the_mechanisms_and_rows_this_module_knows():
    """fedkd.config lists shield.release / shield.release-rows choices as literals (importing
    fedkd.privacy there would load Opacus at every config check): they must not drift."""
    import dataclasses

    from fedkd.config import ShieldConfig
    from fedkd.privacy.release import RELEASE_ROWS, RELEASES

    fields = {f.name: f.metadata["choices"] for f in dataclasses.fields(ShieldConfig)}
    assert tuple(fields["release"]) == RELEASES
    assert tuple(fields["release_rows"]) == RELEASE_ROWS
