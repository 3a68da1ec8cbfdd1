"""fedkd.dp_knowledge: hard votes, the unsharpened vote consensus, abstention, the DP site's rows."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.config import load_config
from fedkd.data import load_federation
from fedkd.distillation import predict_logits
from fedkd.dp_knowledge import (abstain, distillable_rows, evidence_abstention, hard_votes, student_target,
                                 vote_consensus)
from fedkd.federation.server import ServerState, server_round


def test_hard_votes_by_hand():
    """(1 - s) onehot(argmax) + s / C: s = 0.3, C = 3 -> 0.8 on the top class, 0.1 elsewhere;
    a tie goes to the lowest index; a near-uniform DP row votes as firmly as a confident one."""
    k = np.array([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.334, 0.333, 0.333]])
    np.testing.assert_allclose(hard_votes(k, smoothing=0.3),
                               [[0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.8, 0.1, 0.1]])
    np.testing.assert_allclose(hard_votes(k, smoothing=0.0)[0], [0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="vote-smoothing"):
        hard_votes(k, smoothing=1.0)


def test_vote_consensus_is_the_unsharpened_vote_histogram():
    """Three senders vote 1, 1, 2 on x (s = 0): G(x) = (0, 2/3, 1/3), not ERA's sharpened row."""
    votes = hard_votes(np.array([[[0.1, 0.6, 0.3]], [[0.3, 0.4, 0.3]], [[0.3, 0.3, 0.4]]]), smoothing=0.0)
    np.testing.assert_allclose(vote_consensus(votes), [[0.0, 2 / 3, 1 / 3]])
    with pytest.raises(ValueError, match="shape"):
        vote_consensus(votes[0])


def test_abstain_keeps_rows_at_or_above_the_threshold_and_blanks_the_rest():
    fused = np.array([[0.6, 0.2, 0.2], [0.4, 0.35, 0.25], [0.5, 0.5, 0.0]])
    rows, answered = abstain(fused, threshold=0.5)
    np.testing.assert_array_equal(answered, [True, False, True])  # 0.5 >= 0.5 answers
    np.testing.assert_allclose(rows, [[0.6, 0.2, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    with pytest.raises(ValueError, match="vote-threshold"):
        abstain(fused, threshold=1.5)


def test_distillable_rows_leave_out_uniform_and_near_uniform_targets():
    """H(uniform) = log 3 > 0.95 log 3: out; H(0.4, 0.3, 0.3) = 1.0889 > 0.95 * 1.0986 = 1.0437:
    out; H(0.6, 0.2, 0.2) = 0.9503: in; a one-hot (H = 0): in."""
    targets = np.array([[1 / 3] * 3, [0.4, 0.3, 0.3], [0.6, 0.2, 0.2], [1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(distillable_rows(targets, uniform_entropy=0.95), [False, False, True, True])


@pytest.fixture(scope="module")
def parts():
    config = load_config(overrides={"data.num-clients": 3, "fusion.method": "expert", "global-student.enabled": False,
                                    "privacy.enabled": True, "fusion.vote-smoothing": 0.0, "fusion.dp-knowledge": "votes"})
    return config, load_federation(config.data, config.seed)


def test_server_fuses_votes_under_dp_and_abstains_on_a_split_vote(parts):
    """Under DP (dp-knowledge votes, method expert) three near-uniform releases (entropy within
    0.1% of log 10, every one dropped by the soft fusion's entropy filter) still carry their
    top-1 votes: on x0 all three vote class 3, G(x0) = onehot(3); on x1 they vote 0, 1, 2, the
    top share 1/3 < 0.5 and G(x1) abstains (uniform)."""
    config, split = parts
    assert config.dp_knowledge == "votes"
    base = np.full((3, 2, 10), 0.1)
    for j, (first, second) in enumerate([(3, 0), (3, 1), (3, 2)]):
        base[j, 0, first] += 0.01
        base[j, 1, second] += 0.01
    base /= base.sum(axis=-1, keepdims=True)
    state = ServerState()
    server_round(config=config, split=split, state=state, round_number=1, release=np.arange(2),
                 accepted={j: base[j] for j in range(3)})
    onehot = np.eye(10)[3]
    for j in range(3):
        np.testing.assert_allclose(state.consensus[j][0], onehot)
        np.testing.assert_allclose(state.consensus[j][1], np.full(10, 0.1))
    auto = load_config(overrides={**config.to_flat(), "fusion.dp-knowledge": "auto"})
    assert auto.dp_knowledge == "evidence"
    assert load_config(overrides={**auto.to_flat(), "fusion.method": "mean"}).dp_knowledge == "soft"
    assert load_config(overrides={**config.to_flat(), "privacy.enabled": False}).dp_knowledge is None


def test_evidence_abstains_where_the_senders_evidence_is_near_uniform(parts):
    """dp-knowledge evidence: on x0 both senders say class 2 with 0.9; on x1 their rows are
    within 0.2% of uniform (dropped as uninformative), so F_i(x1) would be the receiver's
    prior alone: it abstains (uniform row) instead, while F_i(x0) keeps class 2 on top."""
    config, split = parts
    evidence = load_config(overrides={**config.to_flat(), "fusion.dp-knowledge": "evidence", "fusion.evidence-entropy": 0.95})
    rows = np.full((2, 2, 10), 0.1)
    rows[:, 0] = np.full(10, 0.1 / 9)
    rows[:, 0, 2] = 0.9
    rows[:, 1, 0] += 0.002
    rows /= rows.sum(axis=-1, keepdims=True)
    state = ServerState()
    server_round(config=evidence, split=split, state=state, round_number=1, release=np.arange(2),
                 accepted={0: rows[0], 1: rows[1]})
    for site in (0, 1):
        fused = state.fused[site][1]
        assert fused[0].argmax() == 2 and fused[0].max() > 0.5
        np.testing.assert_allclose(fused[1], np.full(10, 0.1))


def test_evidence_abstention_by_hand():
    """Evidence rows (0.9, 0.05, 0.05): H = 0.394 <= 0.5 log 3 = 0.549, kept; (0.5, 0.3, 0.2):
    H = 1.030 > 0.549, abstained: that row of F becomes 1/3 each."""
    fused = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    evidence = np.array([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2]])
    np.testing.assert_allclose(evidence_abstention(fused, evidence, entropy_cut=0.5),
                               [[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])


def test_student_target_is_the_normalised_product_of_own_and_the_sharpened_mean():
    """T = K * M^(1/tau) / sum: worked by hand. K = (1/2, 1/4, 1/4), M = (0.2, 0.4, 0.4),
    tau = 1/2: K M^2 = (0.02, 0.04, 0.04) -> (0.2, 0.4, 0.4). A confident own row wins over a
    weak mean: K = (0.9, 0.05, 0.05), M = (0.3, 0.4, 0.3), tau = 1 -> (0.27, 0.02, 0.015) / 0.305."""
    own = np.array([[0.5, 0.25, 0.25], [0.9, 0.05, 0.05]])
    np.testing.assert_allclose(student_target(own[:1], np.array([[0.2, 0.4, 0.4]]), temperature=0.5),
                               [[0.2, 0.4, 0.4]], atol=1e-12)
    np.testing.assert_allclose(student_target(own[1:], np.array([[0.3, 0.4, 0.3]]), temperature=1.0),
                               [[0.27 / 0.305, 0.02 / 0.305, 0.015 / 0.305]], atol=1e-12)
    np.testing.assert_allclose(student_target(own, None, temperature=0.25), own, atol=1e-12)  # no consensus yet
    zero = student_target(np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]]), temperature=0.25)  # wire rounded to 0
    assert np.isfinite(zero).all() and zero[0, 0] > 1 - 1e-12
    with pytest.raises(ValueError, match="privacy.student-temperature must be > 0"):
        student_target(own, own, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        student_target(own, own[:1], temperature=1.0)


def test_student_target_with_the_prior_correction_divides_the_mean_by_its_class_marginal():
    """correction 'prior', by hand: K uniform on two rows, M = (0.8, 0.2), (0.4, 0.6), tau = 1:
    m = mean_x M = (0.6, 0.4); M / m = (4/3, 1/2) -> (8/11, 3/11) and (2/3, 3/2) -> (4/13, 9/13).
    Without the correction the second row stays (0.4, 0.6)."""
    own = np.full((2, 2), 0.5)
    mean = np.array([[0.8, 0.2], [0.4, 0.6]])
    np.testing.assert_allclose(student_target(own, mean, temperature=1.0, correction="prior"),
                               [[8 / 11, 3 / 11], [4 / 13, 9 / 13]], atol=1e-12)
    np.testing.assert_allclose(student_target(own, mean, temperature=1.0), mean, atol=1e-12)
    for consensus in (mean, None):  # refused with or without a consensus yet
        with pytest.raises(ValueError, match="privacy.student-correction must be one of 'off', 'prior'; got 'x'"):
            student_target(own, consensus, temperature=1.0, correction="x")


def test_under_dp_with_students_the_global_student_distils_the_consensus_not_the_abstaining_fusion():
    """DP sites with a student (privacy.student auto = consensus for expert): three senders put
    0.5 on the public label y(x) and 0.5/9 elsewhere on 40 public rows. Their evidence has
    entropy 1.79 > 0.25 log 10 = 0.58, so every F_i(x) abstains (uniform); the consensus G is
    ERA's sharpened mean, near one-hot at y(x). The global student (30 epochs, lr 0.05) then
    learns y on those rows; with privacy.student off it distils mean_i F_i = uniform rows and
    stays near chance on them."""
    flat = {"data.num-clients": 3, "fusion.method": "expert", "privacy.enabled": True,
            "global-student.enabled": True, "global-student.model": "mlp-small", "global-student.epochs": 30,
            "train.lr": 0.05}
    config = load_config(overrides=flat)
    assert config.dp_knowledge == "evidence" and config.dp_student
    split = load_federation(config.data, config.seed)
    release = np.arange(40)
    labels = np.asarray(split.public.y[release])
    rows = np.full((40, 10), 0.5 / 9)
    rows[np.arange(40), labels] = 0.5
    learnt = {}
    for student in ("consensus", "off"):
        state = ServerState()
        run = load_config(overrides={**flat, "privacy.student": student})
        server_round(config=run, split=split, state=state, round_number=1, release=release,
                     accepted={j: rows for j in range(3)})
        np.testing.assert_allclose(state.fused[0][1], np.full((40, 10), 0.1))  # F_i abstains in both runs
        predicted = predict_logits(state.student, split.public.x[release]).argmax(-1)
        learnt[student] = float((predicted == labels).mean())
    assert learnt["consensus"] >= 0.9
    assert learnt["off"] <= 0.4
