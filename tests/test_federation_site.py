"""fedkd.federation.site: the site's round, its inbox, reply and persistent state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedkd.config import load_config
from fedkd.data import load_federation
from fedkd.federation.site import SiteInbox, SiteRefusal, SiteState, site_evaluation, site_round
from fedkd.wire import decode, encode


@pytest.fixture(scope="module")
def parts():
    config = load_config(overrides={"data.num-clients": 3, "train.local-epochs": 1, "train.distill-epochs": 1,
                                    "train.target-choice": "fused"})
    return config, load_federation(config.data, config.seed)


def _inbox(config, split, **fields):  # noqa: ANN001, ANN202
    return SiteInbox(round_number=fields.pop("round_number", 1), public_fingerprint=split.public_fingerprint,
                     config_digest=config.digest(), **fields)


def test_inbox_bytes_are_its_arrays():
    inbox = SiteInbox(round_number=2, public_fingerprint="f", config_digest="d",
                      release_positions=np.arange(5), fused=np.zeros((5, 10), np.float16))
    # 5 int64 positions (40 bytes) + 5 x 10 float16 (100 bytes); the round config is not counted
    assert inbox.nbytes == 5 * 8 + 5 * 10 * 2
    assert set(inbox.arrays()) == {"release-positions", "fused"}
    assert SiteInbox(round_number=1, public_fingerprint="f", config_digest="d").nbytes == 0


def test_a_site_refuses_another_config_or_public_set(parts):
    config, split = parts
    state = SiteState.fresh(config=config, split=split, client=0)
    with pytest.raises(SiteRefusal, match="site 0 refuses round 1: its run config differs"):
        site_round(config=config, split=split, client=0, state=state,
                   inbox=SiteInbox(round_number=1, public_fingerprint=split.public_fingerprint, config_digest="x"))
    with pytest.raises(SiteRefusal, match="its public transfer set .* differs from the server's \\(abc\\)"):
        site_round(config=config, split=split, client=0, state=state,
                   inbox=SiteInbox(round_number=1, public_fingerprint="abc", config_digest=config.digest()))
    assert state.rounds_trained == 0  # nothing happened


def test_round_reply_releases_one_row_per_requested_position(parts):
    config, split = parts
    state = SiteState.fresh(config=config, split=split, client=1)
    positions = np.array([3, 7, 11])
    reply = site_round(config=config, split=split, client=1, state=state,
                       inbox=_inbox(config, split, release_positions=positions))
    assert set(reply.arrays) == {"knowledge"}
    knowledge = reply.arrays["knowledge"]
    assert knowledge.dtype == np.float16 and knowledge.shape == (3, split.num_classes)
    np.testing.assert_allclose(knowledge.astype(np.float64).sum(axis=1), 1.0, atol=5e-3)
    assert reply.metrics["partition-id"] == 1 and reply.metrics["rounds-trained"] == 1
    assert reply.metrics["num-examples"] == len(split.clients[1].train)
    assert "distil-loss" not in reply.metrics  # round 1: nothing to distil
    assert state.rounds_trained == 1


def test_fused_knowledge_is_distilled_only_where_it_covers(parts):
    config, split = parts
    state = SiteState.fresh(config=config, split=split, client=0)
    fused = np.full((4, split.num_classes), 1.0 / split.num_classes)
    reply = site_round(config=config, split=split, client=0, state=state,
                       inbox=_inbox(config, split, round_number=2, fused=encode(fused),
                                    fused_positions=np.arange(4)))
    assert np.isfinite(reply.metrics["distil-loss"])
    assert reply.arrays["knowledge"].shape == (len(split.public), split.num_classes)  # all of P released


def test_an_adversary_corrupts_its_own_reply(parts):
    config, split = parts
    flipped = load_config(overrides={**config.to_flat(), "adversary.clients": "2:flip"})
    honest = site_round(config=config, split=split, client=2, state=SiteState.fresh(config=config, split=split, client=2),
                        inbox=_inbox(config, split))
    liar = site_round(config=flipped, split=split, client=2,
                      state=SiteState.fresh(config=flipped, split=split, client=2), inbox=_inbox(flipped, split))
    # flip moves class c's probability to c + 1: the honest release rolled by one class
    np.testing.assert_array_equal(decode(liar.arrays["knowledge"]),
                                  np.roll(decode(honest.arrays["knowledge"]), 1, axis=1))


def test_state_dict_round_trip_and_key_checks(parts):
    config, split = parts
    state = SiteState.fresh(config=config, split=split, client=0)
    site_round(config=config, split=split, client=0, state=state, inbox=_inbox(config, split))
    saved = state.state_dict()
    assert set(saved) == {"model", "rounds-trained"}
    again = SiteState.fresh(config=config, split=split, client=0)
    again.load_state_dict(saved)
    assert again.rounds_trained == 1
    for name, tensor in state.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor)
    with pytest.raises(KeyError, match="unknown key\\(s\\) weights"):
        again.load_state_dict({**saved, "weights": 1})
    with pytest.raises(KeyError, match="no key 'rounds-trained'"):
        again.load_state_dict({"model": saved["model"]})
    with pytest.raises(KeyError, match="has key 'privacy' but this site has no privacy"):
        again.load_state_dict({**saved, "privacy": "{}"})


def test_a_private_site_keeps_its_ledger_in_its_state(parts):
    config, split = parts
    private = load_config(overrides={**config.to_flat(), "privacy.enabled": True, "privacy.target-epsilon": 8.0})
    state = SiteState.fresh(config=private, split=split, client=0)
    reply = site_round(config=private, split=split, client=0, state=state, inbox=_inbox(private, split))
    saved = state.state_dict()
    assert json.loads(saved["privacy"])["history"]  # the ledger's accountant history
    assert 0 < reply.metrics["epsilon"] <= 8.0 and reply.metrics["dp-stopped"] == 0.0
    again = SiteState.fresh(config=private, split=split, client=0)
    again.load_state_dict(saved)
    assert again.ledger.epsilon() == state.ledger.epsilon() == reply.metrics["epsilon"]


def test_evaluation_is_the_local_test_accuracy(parts):
    config, split = parts
    state = SiteState.fresh(config=config, split=split, client=2)
    scores = site_evaluation(config=config, split=split, client=2, state=state)
    test = split.clients[2].test
    with torch.no_grad():
        predicted = state.model(torch.as_tensor(test.x, dtype=torch.float32)).argmax(1).numpy()
    shared = split.test
    with torch.no_grad():
        on_shared = state.model(torch.as_tensor(shared.x, dtype=torch.float32)).argmax(1).numpy()
    # prior-accuracy, worked out independently: importance weights w(x) = pi(y) / p_test(y)
    # over the shared test set, pi the site's label frequencies over its three splits
    data = split.clients[2]
    labels = np.concatenate([data.train.y, data.val.y, data.test.y])
    pi = np.array([(labels == c).mean() for c in range(split.num_classes)])
    p_test = np.array([(shared.y == c).mean() for c in range(split.num_classes)])
    w = pi[shared.y] / p_test[shared.y]
    expected = float((w * (on_shared == shared.y)).sum() / w.sum())
    assert scores.pop("prior-accuracy") == pytest.approx(expected, abs=1e-12)
    assert scores == {"partition-id": 2, "accuracy": float((predicted == test.y).mean()),
                      "num-examples": float(len(test))}


def _private_release(config, split, noise):  # noqa: ANN001, ANN202
    state = SiteState.fresh(config=config, split=split, client=0, noise=noise)
    reply = site_round(config=config, split=split, client=0, state=state, inbox=_inbox(config, split))
    return reply.arrays["knowledge"], reply.metrics


def test_a_site_secret_release_cannot_be_reproduced_from_the_run_config(parts):
    """The attack of issue 16: the server reruns a site's round with every seed it can
    derive from the run config and compares. It matches a run-seed release bit for bit and
    never a site-secret one, which the site itself (holding its key) can reproduce."""
    from fedkd.federation.site import NoiseSource
    from fedkd.seeds import new_site_secret

    config, split = parts
    private = load_config(overrides={**config.to_flat(), "privacy.enabled": True, "privacy.target-epsilon": 8.0,
                                     "model.architectures": "mlp-small"})
    attack, _ = _private_release(private, split, NoiseSource("run-seed"))  # all the server knows
    seeded, seeded_metrics = _private_release(private, split, NoiseSource("run-seed"))
    np.testing.assert_array_equal(attack, seeded)  # the attack works against run-seed noise
    key = new_site_secret()
    secret, metrics = _private_release(private, split, NoiseSource("site-secret", key))
    assert not np.array_equal(attack, secret)
    again, _ = _private_release(private, split, NoiseSource("site-secret", key))
    np.testing.assert_array_equal(again, secret)  # the site can rerun its own round exactly
    other, _ = _private_release(private, split, NoiseSource("site-secret", new_site_secret()))
    assert not np.array_equal(other, secret)
    assert seeded_metrics["dp-noise-seed"] == 0.0 and metrics["dp-noise-seed"] == 1.0  # the ledger says which


def test_a_site_obeys_the_servers_dp_stop_and_adopts_its_history(parts):
    config, split = parts
    private = load_config(overrides={**config.to_flat(), "privacy.enabled": True, "privacy.target-epsilon": 8.0,
                                     "model.architectures": "mlp-small"})
    state = SiteState.fresh(config=private, split=split, client=0)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    plan = state.ledger.plan
    recorded = np.array([[plan.noise_multiplier, plan.sample_rate, 3 * plan.steps_per_round]])
    reply = site_round(config=private, split=split, client=0, state=state,
                       inbox=_inbox(private, split, privacy_history=recorded, dp_stop=True))
    assert reply.metrics["dp-stopped"] == 1.0 and reply.metrics["dp-round-steps"] == 0.0
    assert state.ledger.steps == 3 * plan.steps_per_round  # the server's record, taken
    assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items())  # no private step
    fewer = np.array([[plan.noise_multiplier, plan.sample_rate, 1]])
    assert not state.ledger.adopt(fewer) and state.ledger.steps == 3 * plan.steps_per_round  # never lowered


def test_secure_rng_noise_seed_reaches_opacus_secure_mode(parts):
    """noise-seed 'secure-rng' through a site's round: Opacus's PrivacyEngine is built with
    secure_mode=True, which imports torchcsprng (not installable here); Opacus's own
    ImportError comes back as fedkd's one-line error naming the setting, before any step.
    (tests/test_privacy.py's test_secure_mode_reaches_opacus checks the engine's optimizer
    and sampler with a stand-in torchcsprng.)"""
    pytest.importorskip("opacus")
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchcsprng is installed: secure mode would run")
    from fedkd.federation.site import NoiseSource

    config, split = parts
    private = load_config(overrides={**config.to_flat(), "privacy.enabled": True, "privacy.target-epsilon": 8.0,
                                     "model.architectures": "mlp-small"})
    state = SiteState.fresh(config=private, split=split, client=0, noise=NoiseSource("secure-rng"))
    with pytest.raises(RuntimeError, match="privacy.noise-seed 'secure-rng' \\(Opacus secure_mode\\) needs the "
                                           "torchcsprng package"):
        site_round(config=private, split=split, client=0, state=state, inbox=_inbox(private, split))
    assert state.ledger.steps == 0  # nothing was spent


def test_a_dp_site_leaves_abstained_rows_alone_and_selects_under_its_budget(parts):
    """Under DP a fully abstained target (every row uniform, fedkd/dp_knowledge.py) distils
    nothing: the round ends with exactly the model of a round without fused knowledge. With
    privacy.selection = noisy-max, a decision round reports its choice (an index of the
    candidates) and eps_sel / decisions spent; the DP-SGD plan is calibrated for the rest."""
    config, split = parts
    private = load_config(overrides={**config.to_flat(), "privacy.enabled": True, "privacy.target-epsilon": 8.0,
                                     "privacy.accountant": "rdp", "num-server-rounds": 2,
                                     "privacy.student": "off"})  # the one-model DP site
    uniform = encode(np.full((len(split.public), split.num_classes), 1.0 / split.num_classes))
    models = []
    for fused in (uniform, None):
        state = SiteState.fresh(config=private, split=split, client=0)
        reply = site_round(config=private, split=split, client=0, state=state,
                           inbox=_inbox(private, split, round_number=2, fused=fused))
        models.append(state.model.state_dict())
    assert reply.metrics.get("distil-rows", 0.0) == 0.0
    for name, tensor in models[0].items():
        torch.testing.assert_close(tensor, models[1][name], rtol=0, atol=0)
    selecting = load_config(overrides={**private.to_flat(), "privacy.selection": "noisy-max",
                                       "privacy.selection-epsilon": 2.0, "privacy.selection-rounds": 1})
    state = SiteState.fresh(config=selecting, split=split, client=0)
    assert state.ledger.plan.target_epsilon == pytest.approx(6.0)
    onehot = encode(np.eye(split.num_classes)[np.arange(len(split.public)) % split.num_classes])
    reply = site_round(config=selecting, split=split, client=0, state=state,
                       inbox=_inbox(selecting, split, round_number=2, fused=onehot))
    assert reply.metrics["selection-choice"] in (0.0, 1.0) and reply.metrics["selection-epsilon"] == pytest.approx(2.0)
    assert reply.metrics["epsilon"] <= 6.0 + 1e-9
    assert state.target_scores["selection:choice"][1] == 1  # one decision taken, kept in the site's state


def test_a_dp_site_with_a_student_keeps_its_private_model_apart_and_reports_the_student(parts):
    """privacy.student = consensus: the DP model trains by DP-SGD only (bit for bit the model of a
    round without any fused knowledge), releases knowledge, and the student, distilled from its
    initial weights towards K_i * M^(1/tau), is what evaluation reports. With a consensus that
    says class 3 on every public row the student says 3 on nearly all of them; the DP model does not.
    (Without the prior correction: a consensus equal on every row is its own class marginal,
    which the correction divides out; test_dp_knowledge works the correction by hand.)"""
    config, split = parts
    private = load_config(overrides={**config.to_flat(), "privacy.enabled": True, "privacy.target-epsilon": 8.0,
                                     "privacy.accountant": "rdp", "num-server-rounds": 2,
                                     "model.architectures": "mlp-small", "privacy.student-correction": "off"})
    assert private.dp_student  # the default for expert
    assert not load_config(overrides={**private.to_flat(), "privacy.selection": "noisy-max"}).dp_student
    assert not load_config(overrides={**private.to_flat(), "privacy.enabled": False}).dp_student
    p, c = len(split.public), split.num_classes
    says_three = encode(np.eye(c)[np.full(p, 3)])
    replies, states = [], []
    for fused, consensus in ((encode(np.full((p, c), 1.0 / c)), says_three), (None, None)):
        state = SiteState.fresh(config=private, split=split, client=0)
        replies.append(site_round(config=private, split=split, client=0, state=state,
                                  inbox=_inbox(private, split, round_number=2, fused=fused, consensus=consensus)))
        states.append(state)
    for name, tensor in states[0].model.state_dict().items():  # the DP model never distilled
        torch.testing.assert_close(tensor, states[1].model.state_dict()[name], rtol=0, atol=0)
    np.testing.assert_array_equal(replies[0].arrays["knowledge"], replies[1].arrays["knowledge"])
    from fedkd.distillation import predict_logits

    student_says = predict_logits(states[0].student, split.public.x).argmax(axis=1)
    private_says = predict_logits(states[0].model, split.public.x).argmax(axis=1)
    assert (student_says == 3).mean() > 0.9 > (private_says == 3).mean()
    saved = states[0].state_dict()
    assert set(saved) >= {"model", "student", "privacy"}
    again = SiteState.fresh(config=private, split=split, client=0)
    again.load_state_dict(saved)
    scores = site_evaluation(config=private, split=split, client=0, state=again)
    test = split.clients[0].test
    assert scores["accuracy"] == pytest.approx(float(np.mean(predict_logits(states[0].student, test.x).argmax(1) == test.y)))
    assert scores["private-accuracy"] == pytest.approx(float(np.mean(predict_logits(states[0].model, test.x).argmax(1) == test.y)))
    with pytest.raises(KeyError, match="has no student"):
        SiteState.fresh(config=load_config(overrides={**private.to_flat(), "privacy.student": "off"}), split=split,
                        client=0).load_state_dict(saved)


def test_a_dp_student_site_releases_the_average_of_its_iterates(parts):
    """privacy.ema-decay = 0.25 with the DP student: DP-SGD trains exactly as without it (the
    average is post-processing), round 1 releases what the site without it releases (the first
    average is the model), and round 2 releases the shielded predictions of 0.25 theta_1 +
    0.75 theta_2, weights averaged by hand from the two rounds' models. The average survives
    a state round trip."""
    from fedkd.distillation import predict_logits
    from fedkd.federation.site import NoiseSource, release_knowledge
    from fedkd.seeds import site_seed

    config, split = parts
    plain = load_config(overrides={**config.to_flat(), "privacy.enabled": True, "privacy.target-epsilon": 8.0,
                                   "privacy.accountant": "rdp", "num-server-rounds": 2,
                                   "model.architectures": "mlp-small", "privacy.ema-decay": 0.0})
    averaged = load_config(overrides={**plain.to_flat(), "privacy.ema-decay": 0.25})
    assert load_config().privacy.ema_decay == 0.7  # the default
    assert SiteState.fresh(config=plain, split=split, client=0).average is None
    states = {name: SiteState.fresh(config=c, split=split, client=0) for name, c in (("plain", plain), ("ema", averaged))}
    released, iterates = {name: [] for name in states}, []
    for round_number in (1, 2):
        for name, c in (("plain", plain), ("ema", averaged)):
            reply = site_round(config=c, split=split, client=0, state=states[name],
                               inbox=_inbox(c, split, round_number=round_number))
            released[name].append(decode(reply.arrays["knowledge"]))
        for key, tensor in states["plain"].model.state_dict().items():  # same DP-SGD, bit for bit
            torch.testing.assert_close(tensor, states["ema"].model.state_dict()[key], rtol=0, atol=0)
        iterates.append({k: v.clone() for k, v in states["plain"].model.state_dict().items()})
    np.testing.assert_array_equal(released["ema"][0], released["plain"][0])
    by_hand = SiteState.fresh(config=plain, split=split, client=0).model
    by_hand.load_state_dict({k: 0.25 * iterates[0][k] + 0.75 * iterates[1][k] for k in iterates[0]})
    rng = np.random.default_rng(NoiseSource().round_seed(site_seed(averaged.seed, 0, 2)))
    expected, _ = release_knowledge(averaged, predict_logits(by_hand, split.public.x), rng=rng,
                                    public_x=split.public.x)
    np.testing.assert_allclose(released["ema"][1], expected, atol=2e-3)  # float16 on the wire
    assert np.abs(released["ema"][1] - released["plain"][1]).max() > 1e-2  # and not the last iterate's
    again = SiteState.fresh(config=averaged, split=split, client=0)
    again.load_state_dict(states["ema"].state_dict())
    for key, tensor in again.average.state_dict().items():
        torch.testing.assert_close(tensor, states["ema"].average.state_dict()[key], rtol=0, atol=0)
    with pytest.raises(KeyError, match="keeps no iterate average"):
        SiteState.fresh(config=plain, split=split, client=0).load_state_dict(states["ema"].state_dict())
