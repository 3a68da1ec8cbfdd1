"""fedkd.targets: blends, the pooled validated choice, and the site round that uses them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkd.config import load_config
from fedkd.data import load_federation
from fedkd.federation.site import build_site_model, local_round
from fedkd.targets import blend, parse_candidates, pooled_choice, record_scores, validation_nll


def test_blend_is_the_convex_combination():
    own, fused = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    np.testing.assert_allclose(blend(own, fused, 0.25), [[0.75, 0.25]])
    np.testing.assert_allclose(blend(own, fused, 0.0), own)


def test_parse_candidates():
    assert parse_candidates("0, 0.5,1") == (0.0, 0.5, 1.0)
    assert parse_candidates("0,consensus") == (0.0, "consensus")
    assert parse_candidates("1,mean,mean-local,consensus-local") == (1.0, "mean", "mean-local", "consensus-local")
    for bad in ("", "2", "0,0", "x", "consensus,consensus", "mean,mean", "means"):
        with pytest.raises(ValueError):
            parse_candidates(bad)


def test_pooled_choice_by_error_then_nll():
    """train.target-score = "error": the pooled error rate decides, the pooled NLL breaks its ties."""
    from fedkd.targets import ERROR

    scores = record_scores({}, {0.0: 0.40, "consensus": 0.20})  # NLL prefers the consensus
    scores = record_scores(scores, {0.0: 0.0, "consensus": 0.1}, prefix=ERROR)  # error prefers local
    assert pooled_choice(scores, (0.0, "consensus")) == "consensus"
    assert pooled_choice(scores, (0.0, "consensus"), by=(ERROR, "")) == 0.0
    scores = record_scores(scores, {0.0: 0.2, "consensus": 0.1}, prefix=ERROR)  # pooled error 0.1 each: tie
    assert pooled_choice(scores, (0.0, "consensus"), by=(ERROR, "")) == "consensus"  # the NLL decides
    assert scores[ERROR + "0"] == [0.2, 2] and scores["0"] == [0.4, 1]


def test_pooled_choice_pools_rounds_and_breaks_ties_upwards():
    scores = record_scores({}, {0.0: 0.30, 0.5: 0.40, 1.0: 0.20})
    assert pooled_choice(scores, (0.0, 0.5, 1.0)) == 1.0
    scores = record_scores(scores, {0.0: 0.10, 0.5: 0.40, 1.0: 0.50})  # pooled: 0.2, 0.4, 0.35
    assert scores == {"0": [pytest.approx(0.4), 2], "0.5": [pytest.approx(0.8), 2], "1": [pytest.approx(0.7), 2]}
    assert pooled_choice(scores, (0.0, 0.5, 1.0)) == 0.0
    assert pooled_choice(record_scores({}, {0.0: 0.3, 1.0: 0.3}), (0.0, 1.0)) == 1.0  # tie: more federation
    assert record_scores({}, {0.0: float("nan")}) == {}  # an empty validation split scores nothing
    assert pooled_choice({}, (0.0, 0.5)) == 0.5
    assert pooled_choice(record_scores({}, {0.0: 0.3, "consensus": 0.1}), (0.0, "consensus")) == "consensus"


def test_margin_choice_keeps_the_reference_unless_the_paired_bound_is_an_improvement():
    """d = nll_c - nll_G per validation example: mean -0.25, sample sd sqrt(2.25 / 3) = 0.866,
    se = 0.433 (worked out by hand). margin 0 and 0.5: bounds -0.25 and -0.033 < 0, local (0)
    is kept; margin 1: +0.183 >= 0, the consensus G stays."""
    from fedkd.targets import margin_choice, record_example_scores

    reference = np.array([1.0, 1.0, 1.0, 1.0])
    scores = record_example_scores({}, {"consensus": reference, 0.0: reference + np.array([-1.0, 0.5, -1.0, 0.5]),
                                        1.0: reference + 0.1})
    candidates = (0.0, 1.0, "consensus")
    assert margin_choice(scores, candidates, margin=0.0) == 0.0
    assert margin_choice(scores, candidates, margin=0.5) == 0.0
    assert margin_choice(scores, candidates, margin=1.0) == "consensus"
    # a uniform gain has se = 0 and passes any margin; 1.0 is worse everywhere and never chosen
    steady = record_example_scores({}, {"consensus": reference, 0.0: reference - 0.05, 1.0: reference + 0.1})
    assert margin_choice(steady, candidates, margin=10.0) == 0.0
    # the ranking stays the pooled NLL's: a steadier but smaller gain (1.0: -0.05, se 0) does
    # not replace a best candidate that fails the margin; the reference stays
    mixed = record_example_scores(scores, {})
    mixed = record_example_scores({k: v for k, v in mixed.items() if k != "x:1"}, {1.0: reference - 0.05})
    assert margin_choice(mixed, candidates, margin=1.0) == "consensus"
    assert margin_choice(mixed, candidates, margin=0.0) == 0.0


def test_margin_choice_pools_rounds_per_example_and_falls_back_without_a_reference():
    from fedkd.targets import EXAMPLES, margin_choice, record_example_scores, reference_candidate

    scores = record_example_scores({}, {"consensus": np.array([1.0, 1.0]), 0.0: np.array([0.0, 0.0])})
    scores = record_example_scores(scores, {"consensus": np.array([1.0, 1.0]), 0.0: np.array([4.0, 4.0])})
    assert scores[EXAMPLES + "0"] == [2.0, 4.0, 4.0] and scores[EXAMPLES + "consensus"] == [2.0, 2.0, 2.0]
    assert margin_choice(scores, (0.0, "consensus"), margin=0.0) == "consensus"  # pooled: 2 against 1
    restarted = record_example_scores(scores, {0.0: np.array([1.0, 1.0, 1.0])})  # the split changed
    assert restarted[EXAMPLES + "0"] == [1.0, 1.0, 1.0, 1.0]
    assert record_example_scores({}, {0.0: np.array([np.nan, 1.0])}) == {}
    pooled = record_scores({}, {0.0: 0.1, 1.0: 0.3})  # no per-example record: the pooled NLL decides
    assert margin_choice(pooled, (0.0, 1.0), margin=1.0) == 0.0
    # pooling the mean NLLs leaves the per-example records whole
    assert record_scores(scores, {0.0: 0.5})[EXAMPLES + "0"] == [2.0, 4.0, 4.0]
    assert reference_candidate((0.0, 1.0, "consensus-local", "consensus")) == "consensus"
    assert reference_candidate((0.0, 0.5, 1.0)) == 1.0


def test_validated_site_with_a_margin_records_every_example():
    from fedkd.targets import EXAMPLES

    model, split, metrics, scores = _validated_round_on_site_2(**{"train.target-margin": 1.0})
    n = len(split.clients[2].val)
    assert {EXAMPLES + "0", EXAMPLES + "1"} <= set(scores)
    assert all(len(scores[EXAMPLES + k]) == n + 1 and scores[EXAMPLES + k][0] == 1.0 for k in ("0", "1"))
    for k in ("0", "1"):  # the per-example record averages to the pooled NLL of the same round
        assert np.mean(scores[EXAMPLES + k][1:]) == pytest.approx(scores[k][0], rel=1e-5)
    assert metrics["val-nll"] == pytest.approx(validation_nll(model, split.clients[2].val))


def test_target_margin_needs_the_nll_score():
    from fedkd.config import ConfigError

    with pytest.raises(ConfigError, match="train.target-margin.*target-score = 'error'"):
        load_config(overrides={"train.target-margin": 1.0, "train.target-score": "error"})
    assert load_config(overrides={"train.target-margin": 1.0}).train.target_margin == 1.0


def test_validation_nll_by_hand():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    from fedkd.data import ArrayDataset

    data = ArrayDataset(np.array([[1.0, 0.0], [0.0, 2.0]], np.float32), np.array([0, 0]), np.arange(2))
    # logits [1, 0] and [0, 2]; -log softmax(.)[0] = log(1 + e^-1) and log(1 + e^2)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert validation_nll(model, data) == pytest.approx(expected, rel=1e-6)


def test_validated_round_with_only_lambda_zero_is_local_training():
    """lambda = 0 means no distillation: the validated round then trains exactly as a round
    without fused knowledge does (same seed, same steps), whatever F_i says."""
    config = load_config(overrides={"data.num-clients": 3, "train.local-epochs": 1, "train.distill-epochs": 1,
                                    "train.target-choice": "validated", "train.blend-candidates": "0"})
    split = load_federation(config.data, config.seed)
    everything = np.arange(len(split.public))
    fused = np.full((len(split.public), split.num_classes), 1 / split.num_classes, dtype=np.float32)
    kwargs = dict(config=config, client=1, round_number=2, data=split.clients[1], public_x=split.public.x,
                  release_positions=everything)
    scores: dict = {}
    validated, metrics = local_round(model=build_site_model(config, split, 1), fused=fused, fused_positions=everything,
                                     target_scores=scores, **kwargs)
    local, _ = local_round(model=build_site_model(config, split, 1), **kwargs)
    np.testing.assert_array_equal(validated, local)
    assert metrics["target-lambda"] == 0.0 and scores["0"][1] == 1


def _validated_round_on_site_2(**overrides):  # noqa: ANN003, ANN202
    """One validated round of site 2 (3 sites, candidates 0 and 1, F_i = "everything is 0"):
    ``(model, split, metrics, scores)``."""
    config = load_config(overrides={"data.num-clients": 3, "train.local-epochs": 1, "train.distill-epochs": 1,
                                    "train.target-choice": "validated", "train.blend-candidates": "0,1", **overrides})
    split = load_federation(config.data, config.seed)
    everything = np.arange(len(split.public))
    fused = np.eye(split.num_classes, dtype=np.float32)[np.zeros(len(split.public), int)]  # "everything is 0"
    fused = 0.9 * fused + 0.1 / split.num_classes
    scores: dict = {}
    model = build_site_model(config, split, 2)
    _, metrics = local_round(model=model, config=config, client=2, round_number=2, data=split.clients[2],
                             public_x=split.public.x, release_positions=everything, fused=fused,
                             fused_positions=everything, target_scores=scores)
    return model, split, metrics, scores


def test_validated_site_keeps_the_candidate_it_reports():
    model, split, metrics, scores = _validated_round_on_site_2()
    assert set(scores) == {"0", "1"} and all(count == 1 for _, count in scores.values())
    chosen = metrics["target-lambda"]
    assert scores[f"{chosen:g}"][0] == min(total for total, _ in scores.values())
    assert metrics["val-nll"] == pytest.approx(validation_nll(model, split.clients[2].val))


def test_validated_site_by_error_records_both_scores_and_keeps_the_lowest_error():
    """train.target-score = "error": each candidate's validation error is pooled beside its NLL,
    and the kept model has the lowest pooled error (ties: the lowest NLL)."""
    from fedkd.distillation import accuracy
    from fedkd.targets import ERROR

    model, split, metrics, scores = _validated_round_on_site_2(**{"train.target-score": "error"})
    assert set(scores) == {"0", "1", ERROR + "0", ERROR + "1"}
    chosen = f"{metrics['target-lambda']:g}"
    errors = {k: scores[ERROR + k][0] for k in ("0", "1")}
    assert errors[chosen] == min(errors.values())
    assert errors[chosen] == pytest.approx(1.0 - accuracy(model, split.clients[2].val))


def test_simplex_projection_by_hand():
    from fedkd.targets import simplex_projection

    np.testing.assert_allclose(simplex_projection(np.array([[0.5, 0.5, -1.0], [2.0, 0.0, 0.0], [0.6, 0.6, 0.3]])),
                               [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1.3 / 3, 1.3 / 3, 0.4 / 3]], atol=1e-12)
    np.testing.assert_allclose(simplex_projection(np.array([[0.2, 0.3, 0.5]]) - 7.0), [[0.2, 0.3, 0.5]], atol=1e-12)


def test_unsharpen_by_hand_and_inverts_sharpen():
    """softmax(M / T) = G  <=>  M = T log G + k (rows summing to 1): G = (1, e^-1) / (1 + e^-1)
    at T = 0.5 is M = (0.75, 0.25); and unsharpen(sharpen(M, T), T) = M for random rows."""
    from fedkd.fusion import sharpen
    from fedkd.targets import unsharpen

    g = np.array([[1.0, math.exp(-1)]]) / (1 + math.exp(-1))
    np.testing.assert_allclose(unsharpen(g, 0.5), [[0.75, 0.25]], atol=1e-12)
    m = np.random.default_rng(0).dirichlet(np.ones(10), size=200)
    for temperature in (0.1, 0.5, 1.0, 3.0):
        np.testing.assert_allclose(unsharpen(sharpen(m, temperature), temperature), m, atol=1e-12)
    np.testing.assert_array_equal(unsharpen(g, None), g)  # None: never sharpened (the DP vote mean)
    np.testing.assert_allclose(unsharpen(np.array([[1.0, 0.0, 0.0]]), 0.1), [[1.0, 0.0, 0.0]])  # zeros: floored
    with pytest.raises(ValueError):
        unsharpen(g, 0.0)


def test_unsharpen_through_the_wire_formats():
    """G as the site receives it: float16 moves M by about T 2^-11; uint8 (small entries of G
    rounded to 0) stays within a few hundredths; rows stay probability vectors."""
    from fedkd.fusion import sharpen
    from fedkd.targets import unsharpen
    from fedkd.wire import decode, encode

    m = np.random.default_rng(1).dirichlet(np.ones(20), size=300)
    g = sharpen(m, 0.1)
    for wire, tolerance in (("float16", 2e-4), ("uint8", 0.06)):
        back = unsharpen(decode(encode(g, wire)).astype(np.float32), 0.1)
        assert np.abs(back - m).max() < tolerance, wire
        np.testing.assert_allclose(back.sum(axis=1), 1.0, atol=1e-9)
        assert (back >= 0).all()


def test_unsharpened_consensus_is_what_fusion_mean_sends():
    """M = unsharpen(G, T) for the server's consensus G (ERA, masked, T = 0.1) is the masked
    mean of every sender's knowledge: fusion method ``mean``'s F_i."""
    from fedkd.fusion import consensus, fuse
    from fedkd.targets import unsharpen

    rng = np.random.default_rng(2)
    knowledge = rng.dirichlet(np.full(6, 0.3), size=(5, 40))
    knowledge[1, :10] = 1 / 6  # uninformative rows: masked out of both
    g, _ = consensus(knowledge=knowledge, uniform_entropy=0.95, temperature=0.1)
    np.testing.assert_allclose(unsharpen(g, 0.1), fuse(knowledge=knowledge, method="mean").fused[0], atol=1e-10)


def test_consensus_temperature_mirrors_what_the_server_sends():
    from fedkd.federation.site import consensus_temperature

    assert consensus_temperature(load_config()) == pytest.approx(0.1)
    assert consensus_temperature(load_config(overrides={"fusion.era-temperature": 0.3})) == pytest.approx(0.3)
    votes = {"privacy.enabled": True, "fusion.dp-knowledge": "votes"}
    assert consensus_temperature(load_config(overrides={**votes, "fusion.trust": "off"})) is None
    assert consensus_temperature(load_config(overrides={**votes, "fusion.trust": "verified"})) == pytest.approx(0.1)


def test_candidate_targets_by_hand():
    """The named candidates: G, M = unsharpen(G), each under the site's add-one prior."""
    from fedkd.federation.site import candidate_target
    from fedkd.fusion import sharpen
    from fedkd.targets import under_prior

    m = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    g = sharpen(m, 0.1)
    labels = np.array([0, 0, 0, 1])  # prior (4, 2, 1) / 7
    own, fused = np.full((2, 3), 1 / 3), np.eye(3)[[0, 2]]
    kwargs = dict(own=own, fused=fused, consensus=g, labels=labels, temperature=0.1)
    np.testing.assert_allclose(candidate_target("mean", **kwargs), m, atol=1e-12)
    prior = np.array([4.0, 2.0, 1.0]) / 7
    np.testing.assert_allclose(candidate_target("mean-local", **kwargs), under_prior(m, prior), atol=1e-12)
    np.testing.assert_allclose(candidate_target("mean-local", **kwargs)[0], np.array([2.0, 0.6, 0.2]) / 2.8)
    np.testing.assert_array_equal(candidate_target("consensus", **kwargs), g)
    np.testing.assert_allclose(candidate_target("consensus-local", **kwargs), under_prior(g, prior))
    np.testing.assert_allclose(candidate_target(0.5, **kwargs), 0.5 * own + 0.5 * fused)


def test_validated_site_scores_the_unsharpened_mean():
    """A validated round with candidates ``mean`` and ``mean-local`` (G sent) scores both and
    reports the kept one as -3 / -4."""
    config = load_config(overrides={"data.num-clients": 3, "train.local-epochs": 1, "train.distill-epochs": 1,
                                    "train.target-choice": "validated", "train.blend-candidates": "0,mean,mean-local"})
    split = load_federation(config.data, config.seed)
    everything = np.arange(len(split.public))
    from fedkd.fusion import sharpen

    m = np.random.default_rng(3).dirichlet(np.ones(split.num_classes), size=len(split.public))
    scores: dict = {}
    _, metrics = local_round(model=build_site_model(config, split, 2), config=config, client=2, round_number=2,
                             data=split.clients[2], public_x=split.public.x, release_positions=everything,
                             fused=m.astype(np.float32), fused_positions=everything, target_scores=scores,
                             consensus=sharpen(m, 0.1).astype(np.float32))
    assert set(scores) == {"0", "mean", "mean-local"}
    assert metrics["target-lambda"] in (0.0, -3.0, -4.0)
