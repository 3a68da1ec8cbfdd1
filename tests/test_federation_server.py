"""fedkd.federation.server: inboxes, reply checks, the server's round, state and summary."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.config import load_config
from fedkd.data import load_federation
from fedkd.federation.server import (
    global_student_rows,
    ServerState,
    accept_reply,
    privacy_row,
    release_positions,
    run_summary,
    server_round,
    site_inbox,
)
from fedkd.wire import InvalidPayload


@pytest.fixture(scope="module")
def parts():
    config = load_config(overrides={"data.num-clients": 3, "fusion.method": "mean", "global-student.epochs": 1})
    return config, load_federation(config.data, config.seed)


def _rows(values, classes=10):  # noqa: ANN001, ANN202
    out = np.full((len(values), classes), 0.0)
    for i, v in enumerate(values):
        out[i, i % classes] = v
        out[i, (i + 1) % classes] = 1.0 - v
    return out


def test_inbox_carries_fused_knowledge_of_known_sites_only(parts):
    config, split = parts
    state = ServerState()
    everything = np.arange(len(split.public))
    state.fused[1] = (everything, np.full((len(split.public), 10), 0.1))
    known = site_inbox(config=config, split=split, state=state, client=1, round_number=2, release=everything)
    assert known.release_positions is None and known.fused_positions is None  # all of P: no positions
    assert known.fused.dtype == np.float16  # F_i on the wire in the federation's format
    np.testing.assert_array_equal(known.fused, np.full((len(split.public), 10), np.float16(0.1)))
    assert known.nbytes == len(split.public) * 10 * 2  # float16
    for client in (None, 0):  # unknown node; a site never fused
        inbox = site_inbox(config=config, split=split, state=state, client=client, round_number=2, release=everything)
        assert inbox.fused is None and inbox.nbytes == 0
    subset = np.array([0, 5])
    inbox = site_inbox(config=config, split=split, state=state, client=0, round_number=2, release=subset)
    np.testing.assert_array_equal(inbox.release_positions, subset)
    assert inbox.config_digest == config.digest() and inbox.public_fingerprint == split.public_fingerprint


def test_release_positions_are_seeded_per_round(parts):
    config, split = parts
    subset = load_config(overrides={**config.to_flat(), "knowledge.public-subset": 7})
    first, again = release_positions(subset, split, 3), release_positions(subset, split, 3)
    np.testing.assert_array_equal(first, again)
    assert len(first) == 7 and (np.diff(first) > 0).all()
    expected = np.sort(np.random.default_rng([subset.seed, 3]).choice(len(split.public), 7, replace=False))
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(release_positions(config, split, 3), np.arange(len(split.public)))


def test_accept_reply_validates(parts):
    config, _ = parts
    good = {"knowledge": _rows([0.7, 0.6]).astype(np.float16)}
    out = accept_reply(config=config, num_classes=10, release=np.arange(2), record_names={"knowledge", "metrics"},
                       arrays=good)
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    with pytest.raises(InvalidPayload, match="shape"):
        accept_reply(config=config, num_classes=10, release=np.arange(3), record_names={"knowledge", "metrics"},
                     arrays=good)


def _rdp(history, delta):  # noqa: ANN001, ANN202  Opacus's accountant, used directly
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


def test_privacy_row_is_built_once_and_refuses_a_stray_epsilon(parts):
    config, _ = parts
    assert privacy_row(config=config, metrics={"train-loss": 1.0}, previous=None) is None
    with pytest.raises(InvalidPayload, match="'epsilon' without dp-target-epsilon"):
        privacy_row(config=config, metrics={"epsilon": 1.0}, previous=None)
    metrics = {"epsilon": 1.5, "dp-target-epsilon": 4.0, "dp-delta": 1e-5, "dp-noise-multiplier": 1.1,
               "dp-sample-rate": 0.1, "dp-steps": 30.0, "dp-planned-steps": 200.0, "dp-round-steps": 30.0,
               "dp-stopped": 0.0, "dp-noise-seed": 1.0}
    from fedkd.privacy import compose_epsilon

    assert config.privacy.accountant == "prv"  # the default: the tightest sound accountant
    composed = compose_epsilon(history=[(1.1, 0.1, 30)], delta=1e-5, accountant="prv")
    assert 1.5 < composed < _rdp([(1.1, 0.1, 30)], 1e-5)  # the site under-reports; PRV beats RDP
    row = privacy_row(config=config, metrics=metrics, previous=None)
    assert row == {
        "target-epsilon": 4.0, "epsilon-spent": composed, "site-epsilon": 1.5, "delta": 1e-5,
        "noise-multiplier": 1.1, "sample-rate": 0.1, "steps": 30, "site-steps": 30, "planned-steps": 200,
        "round-steps": 30, "accountant": "prv", "certified-by": "prv", "stopped": False,
        "must-stop": compose_epsilon(history=[(1.1, 0.1, 60)], delta=1e-5) > 4.0, "noise-seed": "site-secret",
        "history": [[1.1, 0.1, 30]],
    }
    # the site lost its state: it reports 10 steps in all; the server keeps composing
    lost = {**metrics, "epsilon": 0.4, "dp-steps": 10.0, "dp-round-steps": 10.0}
    again = privacy_row(config=config, metrics=lost, previous=row)
    assert again["history"] == [[1.1, 0.1, 40]] and again["steps"] == 40
    assert again["epsilon-spent"] == compose_epsilon(history=[(1.1, 0.1, 40)], delta=1e-5) > row["epsilon-spent"]
    assert again["epsilon-spent"] < _rdp([(1.1, 0.1, 40)], 1e-5)
    # out-of-bounds figures are refused, naming the metric
    for key, value in (("dp-delta", 1.0), ("dp-round-steps", 2.5), ("epsilon", float("nan")),
                       ("dp-noise-seed", 7.0), ("dp-sample-rate", 0.0)):
        with pytest.raises(InvalidPayload, match=f"metric {key} must be"):
            privacy_row(config=config, metrics={**metrics, key: value}, previous=None)


def test_server_round_fuses_keeps_f_i_and_trains_the_student(parts):
    config, split = parts
    state = ServerState()
    release = np.array([0, 1])
    a, b, c = _rows([1.0, 0.8]), _rows([0.6, 0.4]), _rows([0.8, 0.6])
    record = server_round(config=config, split=split, state=state, round_number=1, release=release,
                          accepted={2: c, 0: a, 1: b})
    assert record.clients == [0, 1, 2]
    np.testing.assert_allclose(record.weights, np.full((3, 3), 1 / 3))  # mean: every sender 1/3
    expected = (a + b + c) / 3  # mean of the three; e.g. row 0 = [0.8, 0.2, 0, ...]
    np.testing.assert_allclose(expected[0, :2], [0.8, 0.2])
    for client in (0, 1, 2):
        positions, fused = state.fused[client]
        np.testing.assert_array_equal(positions, release)
        np.testing.assert_allclose(fused, expected)
    assert record.entry["round"] == 1 and record.entry["accepted"] == [0, 1, 2]
    assert 0.0 <= record.entry["global-accuracy"] <= 1.0 and state.student is not None


def test_state_dict_round_trip(parts):
    config, split = parts
    state = ServerState()
    server_round(config=config, split=split, state=state, round_number=1, release=np.arange(2),
                 accepted={0: _rows([1.0, 0.8]), 1: _rows([0.6, 0.4])})
    state.bytes_up, state.bytes_down = [10, 20], [5]
    state.history.append({"round": 1, "alma": 0.5})
    arrays, saved = state.state_dict()
    again = ServerState()
    again.load_state_dict(arrays, saved, round_number=1)
    assert again.completed_round == 1 and again.resumed_from == [1]
    assert again.bytes_up == [10, 20] and again.history == state.history
    np.testing.assert_array_equal(again.fused[1][1], state.fused[1][1])
    student = again.global_student(config, split)
    for name, tensor in state.student.state_dict().items():
        assert np.array_equal(student.state_dict()[name].numpy(), tensor.numpy())
    del saved["history"]
    with pytest.raises(KeyError, match="no key\\(s\\) history"):
        ServerState().load_state_dict(arrays, saved, round_number=1)


def test_summary_rows_by_hand(parts):
    config, split = parts
    state = ServerState(bytes_up=[100, 300], bytes_down=[50, 50, 80])
    state.history = [{"round": 1, "alma": 0.5, "worst": 0.2, "global-accuracy": 0.3},
                     {"round": 2, "global-accuracy": 0.4}]
    state.privacy = {1: {"epsilon-spent": 2.0}, 0: {"epsilon-spent": 1.0}}
    summary = run_summary(config=config, split=split, state=state, status="completed")
    assert summary["final"] == {"alma": 0.5, "worst": 0.2, "global-accuracy": 0.4}  # latest value of each
    assert summary["bytes"] == {"uplink-per-client-round": 200.0, "downlink-per-client-round": 60.0,
                                "total-per-client-round": 260.0}
    assert list(summary["privacy"]["ledger"]) == ["0", "1"]
    assert summary["rounds-completed"] == 2 and summary["rounds-planned"] == config.num_server_rounds
    assert summary["status"] == "completed" and summary["method"] == "mean" and "runner" not in summary


def test_consensus_is_the_sharpened_mean_and_travels_beside_f_i(parts):
    """fusion.consensus: G = softmax(mean_j K_j / T_era) (DS-FL's ERA), kept by the server and
    sent to every site beside its F_i (same positions, the federation's wire format)."""
    config, split = parts
    with_g = load_config(overrides={**config.to_flat(), "fusion.consensus": "on"})
    state = ServerState()
    a, b = _rows([1.0, 0.8]), _rows([0.6, 0.4])
    server_round(config=with_g, split=split, state=state, round_number=1, release=np.arange(2), accepted={0: a, 1: b})
    mean = (a + b) / 2
    expected = np.exp(mean / 0.1) / np.exp(mean / 0.1).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(state.consensus[0], expected)
    np.testing.assert_allclose(state.consensus[1], expected)  # the same G for every site
    inbox = site_inbox(config=with_g, split=split, state=state, client=0, round_number=2, release=np.arange(2))
    np.testing.assert_array_equal(inbox.consensus, expected.astype(np.float16))
    assert inbox.nbytes == 2 * 10 * 2 * 2 + 2 * 8 * 2  # F_i and G (float16); release and F_i positions (int64)
    plain = ServerState()
    server_round(config=config, split=split, state=plain, round_number=1, release=np.arange(2), accepted={0: a, 1: b})
    assert plain.consensus == {}


def test_global_student_skips_the_rows_every_sender_withheld():
    """Under shield.release = withhold a row that every sender released as uniform (1/C) is
    not distilled; a row one sender spoke on is; without withhold every row is."""
    u = np.full(4, 0.25)
    spoke = np.array([0.7, 0.1, 0.1, 0.1])
    knowledge = np.stack([np.stack([u, spoke, u]), np.stack([u, u, spoke])])  # [2 senders, 3 rows, 4]
    held = load_config(overrides={"data.dataset": "topics", "model.architectures": "bert-tiny",
                                  "global-student.model": "bert-tiny", "shield.release": "withhold",
                                  "shield.release-rows": "pii"})
    np.testing.assert_array_equal(global_student_rows(config=held, knowledge=knowledge), [1, 2])
    np.testing.assert_array_equal(global_student_rows(config=load_config(), knowledge=knowledge), [0, 1, 2])
