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
    for bad in ("", "2", "0,0", "x", "consensus,consensus"):
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
