"""fedkd.federation.loop: one exchange's checks, retries, min-clients, eval-every, checkpoints.

The loop is driven here by a scripted transport (replies built by hand for each round):
the loop is what is tested; the two real transports are compared in tests/e2e/test_e2e_transports.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedkd.checkpoint import read_server_checkpoint
from fedkd.config import load_config
from fedkd.data import load_federation
from fedkd.federation.loop import Reply, collect_knowledge, round_clients, run_federation
from fedkd.federation.server import ServerState
from fedkd.reporting import RunRecorder, read_events, read_summary

CLASSES = 10


@pytest.fixture(scope="module")
def parts():
    config = load_config(overrides={"data.num-clients": 4, "fusion.method": "mean", "min-clients": 2,
                                    "global-student.enabled": False, "knowledge.public-subset": 6,
                                    "round-retries": 1, "num-server-rounds": 3, "eval-every": 2})
    return config, load_federation(config.data, config.seed)


def _knowledge(site: int, rows: int = 6) -> np.ndarray:
    k = np.full((rows, CLASSES), 0.02, dtype=np.float64)
    k[:, site] = 1.0 - 0.02 * (CLASSES - 1)
    return k.astype(np.float16)


def _train(site: int, **metrics) -> Reply:  # noqa: ANN003
    return Reply(node=100 + site, metrics={"partition-id": site, **metrics},
                 arrays={"knowledge": _knowledge(site)}, records=frozenset({"knowledge", "metrics"}))


class Scripted:
    """A transport whose sites answer what ``train_replies(round, attempt)`` says."""

    def __init__(self, train_replies, evaluations=None, sites=4) -> None:  # noqa: ANN001
        self.train_replies, self.evaluations, self.sites = train_replies, evaluations, sites
        self.nodes: dict[int, int] = {}
        self.inboxes: list[tuple[int, int | None, int]] = []
        self.attempts: dict[int, int] = {}
        self.evaluated: list[int] = []
        self.sampled: dict[int, frozenset[int] | None] = {}
        self.evaluated_clients: dict[int, frozenset[int] | None] = {}

    def wait_for_sites(self) -> int:
        return self.sites

    def train(self, round_number, inbox_for, *, clients=None):  # noqa: ANN001, ANN201
        attempt = self.attempts.get(round_number, 0)
        self.attempts[round_number] = attempt + 1
        self.sampled[round_number] = clients
        for node in range(self.sites):
            inbox = inbox_for(self.nodes.get(100 + node))
            self.inboxes.append((round_number, self.nodes.get(100 + node), inbox.nbytes))
        return self.train_replies(round_number, attempt)

    def evaluate(self, round_number, *, clients=None):  # noqa: ANN001, ANN201
        self.evaluated.append(round_number)
        self.evaluated_clients[round_number] = clients
        if self.evaluations is not None:
            return self.evaluations(round_number)
        return [Reply(node=100 + s, metrics={"partition-id": s, "accuracy": 0.25 * s, "num-examples": 10.0 * (s + 1)})
                for s in range(self.sites)]

    def query(self, round_number):  # noqa: ANN001, ANN201
        return []

    def identified(self, node, client):  # noqa: ANN001, ANN201
        self.nodes[node] = client

    def client_of(self, node):  # noqa: ANN001, ANN201
        return self.nodes.get(node)


def _collect(parts, tmp_path, replies):  # noqa: ANN001, ANN202
    config, split = parts
    recorder = RunRecorder(tmp_path / "run", config.to_toml())
    state = ServerState()
    accepted = collect_knowledge(config=config, split=split, state=state, transport=Scripted(lambda r, a: replies),
                                 recorder=recorder, round_number=1, release=np.arange(6))
    return accepted, state, {e["node"]: e["reason"] for e in read_events(recorder.run_dir, "excluded")}


def test_one_bad_reply_excludes_only_that_site(parts, tmp_path):
    replies = [
        _train(0),
        _train(1, round=3.0),  # a metric named like a record field
        _train(2, epsilon=0.5),  # epsilon without the dp-* figures
        Reply(node=105, error="site failed: boom"),
        Reply(node=104, metrics={"partition-id": 0}, arrays={"knowledge": _knowledge(0)},
              records=frozenset({"knowledge", "metrics"})),  # a second reply for site 0
        _train(3, client=1.0),
    ]
    accepted, state, reasons = _collect(parts, tmp_path, replies)
    assert sorted(accepted) == [0]
    assert "reserved" in reasons[101] and "round" in reasons[101]
    assert "'epsilon' without" in reasons[102]
    assert reasons[105] == "site failed: boom"
    assert "partition-id 0 already replied" in reasons[104]
    assert "reserved" in reasons[103] and "client" in reasons[103]
    assert state.bytes_up == [6 * CLASSES * 2]  # only the accepted reply counts
    assert len(state.dropouts) == 5


def test_run_stops_with_a_status_when_too_few_sites_reply_after_retries(parts, tmp_path):
    config, split = parts

    def replies(round_number, attempt):  # noqa: ANN001, ANN202
        if round_number == 2:  # round 2: one valid reply, on both attempts
            return [_train(0), Reply(node=101, error="no reply within 600s")]
        return [_train(s) for s in range(4)]

    transport = Scripted(replies)
    recorder = RunRecorder(tmp_path / "run", config.to_toml())
    summary = run_federation(config=config, split=split, transport=transport, recorder=recorder)
    assert summary["status"] == "stopped in round 2: 1 valid replies, min-clients is 2"
    assert transport.attempts == {1: 1, 2: 2}  # round-retries = 1: two attempts
    assert summary["rounds-completed"] == 1 and [h["round"] for h in summary["history"]] == [1]
    assert read_summary(recorder.run_dir)["status"] == summary["status"]
    round_number, _, state = read_server_checkpoint(recorder.run_dir)
    assert round_number == 1 and state["fused-clients"] == [0, 1, 2, 3]


def test_eval_every_and_the_last_round_are_evaluated(parts, tmp_path):
    config, split = parts
    transport = Scripted(lambda r, a: [_train(s) for s in range(4)])
    recorder = RunRecorder(tmp_path / "run", config.to_toml())
    summary = run_federation(config=config, split=split, transport=transport, recorder=recorder)
    assert summary["status"] == "completed" and transport.evaluated == [2, 3]  # eval-every 2, and round 3
    # accuracies 0, .25, .5, .75 over 10, 20, 30, 40 examples: ALMA .375, weighted 50/100, worst 0
    final = summary["final"]
    assert final["alma"] == pytest.approx(0.375) and final["alma-weighted"] == pytest.approx(0.5)
    assert final["worst"] == 0.0
    # downlink: round 1 sends the 6 subset positions (int64) only; later rounds add F_i
    # (6 x 10 float16) and the 6 positions it covers (last round's subset)
    per_round = {r: [b for rr, _, b in transport.inboxes if rr == r] for r in (1, 2, 3)}
    assert per_round[1] == [48] * 4 and per_round[2] == [48 + 6 * CLASSES * 2 + 48] * 4
    assert summary["bytes"]["uplink-per-client-round"] == 6 * CLASSES * 2


def test_a_sampled_round_sends_the_sample_refuses_others_and_evaluates_who_trained(parts, tmp_path):
    config, split = parts
    config = dataclasses.replace(config, fraction_train=0.5)  # 2 of 4 sites a round (min-clients 2)
    samples = {r: round_clients(config, r) for r in (1, 2, 3)}
    assert all(len(s) == 2 for s in samples.values())

    def replies(round_number, attempt):  # noqa: ANN001, ANN202
        outsider = next(c for c in range(4) if c not in samples[round_number])
        return [_train(c) for c in sorted(samples[round_number])] + [_train(outsider)]

    transport = Scripted(replies)
    recorder = RunRecorder(tmp_path / "run", config.to_toml())
    summary = run_federation(config=config, split=split, transport=transport, recorder=recorder)
    assert summary["status"] == "completed"
    assert transport.sampled == samples  # the loop told the transport whom to message
    assert [h["accepted"] for h in summary["history"]] == [sorted(samples[r]) for r in (1, 2, 3)]
    refused = [e for e in read_events(recorder.run_dir, "excluded")]
    assert len(refused) == 3 and all("not in this round's sample" in e["reason"] for e in refused)
    # evaluated (rounds 2 and 3): the sites that have trained so far, not the never-sampled
    assert transport.evaluated_clients[2] == samples[1] | samples[2]
    assert transport.evaluated_clients[3] == samples[1] | samples[2] | samples[3]
    # a site keeps the fused knowledge of the last round it took part in
    _, arrays, state = read_server_checkpoint(recorder.run_dir)
    assert set(state["fused-clients"]) == samples[1] | samples[2] | samples[3]
    assert round_clients(dataclasses.replace(config, fraction_train=1.0), 1) is None


def test_duplicate_and_malformed_evaluations_are_left_out(parts, tmp_path):
    config, split = parts

    def evaluations(round_number):  # noqa: ANN001, ANN202
        return [Reply(node=100, metrics={"partition-id": 0, "accuracy": 1.0, "num-examples": 5.0}),
                Reply(node=999, metrics={"partition-id": 0, "accuracy": 0.0, "num-examples": 500.0}),
                Reply(node=101, metrics={"partition-id": 1, "accuracy": 2.0, "num-examples": 5.0}),
                Reply(node=102, error="node unavailable")]

    one_round = load_config(overrides={**config.to_flat(), "num-server-rounds": 1})
    transport = Scripted(lambda r, a: [_train(s) for s in range(4)], evaluations=evaluations)
    summary = run_federation(config=one_round, split=split, transport=transport,
                             recorder=RunRecorder(tmp_path / "run", one_round.to_toml()))
    assert summary["final"]["alma"] == 1.0 and summary["final"]["worst"] == 1.0  # only site 0's first reply
    assert "alma-prior" not in summary["final"]  # no site reported a prior-accuracy


def test_alma_prior_is_the_mean_of_every_sites_prior_accuracy(parts, tmp_path):
    config, split = parts

    def evaluations(round_number):  # noqa: ANN001, ANN202
        return [Reply(node=100 + s, metrics={"partition-id": s, "accuracy": 0.5, "num-examples": 5.0,
                                             "prior-accuracy": p})
                for s, p in enumerate((0.2, 0.4, 0.9, float("nan")))]

    one_round = load_config(overrides={**config.to_flat(), "num-server-rounds": 1})
    transport = Scripted(lambda r, a: [_train(s) for s in range(4)], evaluations=evaluations)
    recorder = RunRecorder(tmp_path / "run", one_round.to_toml())
    summary = run_federation(config=one_round, split=split, transport=transport, recorder=recorder)
    assert summary["final"]["alma-prior"] == pytest.approx(0.5)  # (0.2 + 0.4 + 0.9) / 3, the NaN left out
    recorded = {e["client"]: e.get("prior-accuracy") for e in read_events(recorder.run_dir, "client-eval")}
    assert recorded[0] == 0.2 and recorded[2] == 0.9


def test_an_out_of_range_prior_accuracy_refuses_the_reply(parts, tmp_path):
    config, split = parts

    def evaluations(round_number):  # noqa: ANN001, ANN202
        return [Reply(node=100, metrics={"partition-id": 0, "accuracy": 1.0, "num-examples": 5.0,
                                         "prior-accuracy": 0.7}),
                Reply(node=101, metrics={"partition-id": 1, "accuracy": 0.0, "num-examples": 5.0,
                                         "prior-accuracy": 1.5})]

    one_round = load_config(overrides={**config.to_flat(), "num-server-rounds": 1})
    transport = Scripted(lambda r, a: [_train(s) for s in range(4)], evaluations=evaluations)
    summary = run_federation(config=one_round, split=split, transport=transport,
                             recorder=RunRecorder(tmp_path / "run", one_round.to_toml()))
    assert summary["final"]["alma"] == 1.0 and summary["final"]["alma-prior"] == pytest.approx(0.7)
    assert summary["history"][0]["evaluated-sites"] == 1  # ALMA over 1 of the round's 4 sites, said so


def test_the_side_accuracies_a_site_reports_are_recorded_and_checked(parts, tmp_path):
    """A DP site reports its DP model's accuracy beside its student's, a teacher site its student's
    and teacher's: each lands in the site's client-eval record; one out of [0, 1] refuses the reply;
    a key that is not an accuracy is not recorded."""
    config, split = parts

    def evaluations(round_number):  # noqa: ANN001, ANN202
        return [Reply(node=100, metrics={"partition-id": 0, "accuracy": 0.6, "num-examples": 5.0,
                                         "private-accuracy": 0.2, "val-loss": 3.0}),
                Reply(node=101, metrics={"partition-id": 1, "accuracy": 0.8, "num-examples": 5.0,
                                         "student-accuracy": 0.8, "teacher-accuracy": 0.4}),
                Reply(node=102, metrics={"partition-id": 2, "accuracy": 0.4, "num-examples": 5.0,
                                         "private-accuracy": -0.1})]

    one_round = load_config(overrides={**config.to_flat(), "num-server-rounds": 1})
    transport = Scripted(lambda r, a: [_train(s) for s in range(4)], evaluations=evaluations)
    recorder = RunRecorder(tmp_path / "run", one_round.to_toml())
    summary = run_federation(config=one_round, split=split, transport=transport, recorder=recorder)
    recorded = {e["client"]: e for e in read_events(recorder.run_dir, "client-eval")}
    assert set(recorded) == {0, 1}  # site 2's reply refused
    assert recorded[0]["private-accuracy"] == 0.2 and "val-loss" not in recorded[0]
    assert recorded[1]["student-accuracy"] == 0.8 and recorded[1]["teacher-accuracy"] == 0.4
    assert summary["final"]["alma"] == pytest.approx(0.7)  # (0.6 + 0.8) / 2


def test_a_failed_run_keeps_its_summary(parts, tmp_path):
    config, split = parts

    def replies(round_number, attempt):  # noqa: ANN001, ANN202
        if round_number == 2:
            raise RuntimeError("the network went away")
        return [_train(s) for s in range(4)]

    recorder = RunRecorder(tmp_path / "run", config.to_toml())
    with pytest.raises(RuntimeError, match="network"):
        run_federation(config=config, split=split, transport=Scripted(replies), recorder=recorder)
    summary = read_summary(recorder.run_dir)
    assert summary["status"] == "failed: the network went away" and summary["rounds-completed"] == 1


def test_every_reply_field_is_checked_before_it_is_recorded(parts, tmp_path):
    """Each bad reply excludes only its own site for the round; site 0 is honest."""
    config, _ = parts
    replies = [
        _train(0, **{"train-loss": 0.5, "num-examples": 40.0}),
        _train(1, **{"val-accuracy": 0.5, "shield-entropy": float("nan")}),  # NaN where it may not be
        _train(2, **{"history": list(range(100_000))}),  # a huge list
        _train(3, **{"num-examples": 1e12}),  # an absurd example count
    ]
    accepted, state, reasons = _collect(parts, tmp_path, replies)
    assert sorted(accepted) == [0]
    assert "metric shield-entropy must be a finite number; got nan" in reasons[101]
    assert "metric history must be one number; got a list of 100000" in reasons[102]
    assert "num-examples must be an integer in 0..1000000000" in reasons[103]
    events = read_events(tmp_path / "run", "client-train")
    assert [e["client"] for e in events] == [0]  # nothing of the bad replies was recorded

    more = [
        _train(0, **{f"m{i}": 1.0 for i in range(80)}),  # too many metrics
        _train(1, **{"x" * 500: 1.0}),  # a huge name
        _train(2, **{"flag": True}),  # a boolean is not a number
        _train(3, node=2.0),  # another reserved name
    ]
    accepted, _, reasons = _collect(parts, tmp_path / "more", more)
    assert accepted == {}
    assert "at most 64 metrics; got 81" in reasons[100]
    assert "metric name must be at most 64" in reasons[101] and len(reasons[101]) < 300
    assert "metric flag must be one number; got bool" in reasons[102]
    assert "'node' is reserved" in reasons[103]


def test_a_private_run_refuses_a_reply_without_its_dp_figures(parts, tmp_path):
    config, split = parts
    private = load_config(overrides={**config.to_flat(), "privacy.enabled": True})
    recorder = RunRecorder(tmp_path / "run", private.to_toml())
    state = ServerState()
    accepted = collect_knowledge(config=private, split=split, state=state,
                                 transport=Scripted(lambda r, a: [_train(0), _train(1, epsilon=float("nan"))]),
                                 recorder=recorder, round_number=1, release=np.arange(6))
    assert accepted == {}
    reasons = {e["node"]: e["reason"] for e in read_events(recorder.run_dir, "excluded")}
    assert "privacy.enabled without epsilon" in reasons[100]
    assert "epsilon must be a finite number" in reasons[101]


# ------------------------------------------------------------------ identities bound to keys


class KeyedSites:
    """An in-process federation of nodes that sign their replies with real SuperNode keys
    (fedkd.identity.sign_reply, as the ClientApp does), with a fresh challenge per message
    as GridTransport sends. ``nodes``: node id -> (partition it claims, its private key or
    None, what it sends: "honest", or "replay" = site 0's first signed train reply again)."""

    def __init__(self, nodes, *, run_id) -> None:  # noqa: ANN001
        self.plan, self.run_id = nodes, run_id
        self.known: dict[int, int] = {}
        self.inboxes: list[tuple[int, int, bool]] = []  # (round, node, F_i sent?)
        self.queried: list[tuple[int, int]] = []
        self.first_reply: Reply | None = None

    def _signed(self, node, kind, round_number, metrics, arrays=None) -> Reply:  # noqa: ANN001
        from fedkd.identity import new_challenge, sign_reply

        claim, key, _ = self.plan[node]
        challenge = new_challenge()  # the server's challenge in this message
        signature = None if key is None else sign_reply(
            key, run_id=self.run_id, kind=kind, round_number=round_number, partition_id=claim,
            challenge=challenge, metrics=metrics, arrays=arrays)
        records = frozenset({"knowledge", "metrics"} if arrays is not None else {"metrics"})
        return Reply(node=node, metrics=metrics, arrays=arrays, records=records, challenge=challenge,
                     signature=signature)

    def wait_for_sites(self) -> int:
        return len(self.plan)

    def query(self, round_number):  # noqa: ANN001, ANN201
        unknown = [n for n in self.plan if n not in self.known] if round_number > 1 else []
        self.queried += [(round_number, n) for n in unknown]
        return [self._signed(n, "query", round_number, {"partition-id": self.plan[n][0]}) for n in unknown]

    def train(self, round_number, inbox_for, *, clients=None):  # noqa: ANN001, ANN201
        replies = []
        for node, (claim, _, behaviour) in self.plan.items():
            inbox = inbox_for(self.known.get(node))
            self.inboxes.append((round_number, node, inbox.fused is not None))
            if behaviour == "replay" and self.first_reply is not None:
                old = self.first_reply  # byte for byte, under this message's new challenge
                replies.append(dataclasses.replace(old, node=node, challenge=self._signed(
                    node, "train", round_number, old.metrics, old.arrays).challenge))
                continue
            reply = self._signed(node, "train", round_number, {"partition-id": claim},
                                 {"knowledge": _knowledge(claim)})
            if claim == 0 and behaviour == "honest" and self.first_reply is None:
                self.first_reply = reply
            replies.append(reply)
        return replies

    def evaluate(self, round_number, *, clients=None):  # noqa: ANN001, ANN201
        return [self._signed(node, "evaluate", round_number,
                             {"partition-id": claim, "accuracy": 0.0 if behaviour != "honest" else 0.25 * claim,
                              "num-examples": 10.0})
                for node, (claim, _, behaviour) in self.plan.items()]

    def identified(self, node, client):  # noqa: ANN001, ANN201
        self.known[node] = client

    def client_of(self, node):  # noqa: ANN001, ANN201
        return self.known.get(node)


@pytest.fixture(scope="module")
def site_keys(tmp_path_factory):
    from fedkd.identity import load_private_key, load_site_keys
    from fedkd.ops.deploy import write_supernode_keys

    folder = tmp_path_factory.mktemp("keys")
    pairs = write_supernode_keys(folder, [f"site-{i}" for i in range(4)] + ["stranger"])
    private = {p.name: load_private_key(p.private) for p in pairs}
    return private, load_site_keys(folder, num_clients=4)  # the plan: site-<i>.pub for partition i


IMPOSTOR, LIAR, REPLAYER = 900, 103, 901


def _attacked(site_keys):  # noqa: ANN001, ANN202
    private, _ = site_keys
    return {
        IMPOSTOR: (1, private["stranger"], "impostor"),  # answers first for site 1, with its own key
        100: (0, private["site-0"], "honest"),
        101: (1, private["site-1"], "honest"),
        102: (2, private["site-2"], "honest"),
        LIAR: (2, private["site-3"], "liar"),  # site 3's own key, saying it is site 2
        REPLAYER: (0, None, "replay"),  # site 0's round-1 reply again, from round 2
    }


def test_impostors_liars_and_replays_are_refused_and_the_honest_sites_served(parts, site_keys, tmp_path):
    from fedkd.identity import Identities

    config, split = parts
    _, plan = site_keys
    transport = KeyedSites(_attacked(site_keys), run_id="run-7")
    recorder = RunRecorder(tmp_path / "run", config.to_toml())
    summary = run_federation(config=config, split=split, transport=transport, recorder=recorder,
                             identities=Identities(plan, run_id="run-7"))
    assert summary["status"] == "completed"
    trained = read_events(recorder.run_dir, "client-train")
    for r in (1, 2, 3):  # the honest sites, every round, whoever answered first
        assert sorted(e["client"] for e in trained if e["round"] == r) == [0, 1, 2]
    assert transport.known == {100: 0, 101: 1, 102: 2}  # only verified replies identify a node

    excluded = read_events(recorder.run_dir, "excluded")
    refused = {(e["round"], e["node"], e["reason"].split(":")[0]): e for e in excluded}
    for r in (1, 2, 3):
        assert refused[(r, IMPOSTOR, "reply refused")]["claimed"] == 1
        assert refused[(r, LIAR, "reply refused")]["claimed"] == 2
    for r in (2, 3):  # asked who they are from round 2: the lie is refused, not believed
        assert refused[(r, LIAR, "query answer refused")]["claimed"] == 2
        assert refused[(r, IMPOSTOR, "query answer refused")]["claimed"] == 1
        assert "does not verify with partition-id 0's key" in refused[(r, REPLAYER, "reply refused")]["reason"]
    assert "unsigned reply" in refused[(2, REPLAYER, "query answer refused")]["reason"]
    for r in (2, 3):
        assert refused[(r, IMPOSTOR, "evaluation reply refused")]["claimed"] == 1
    assert all(e["client"] is None for e in excluded)  # no honest site is logged as a dropout
    assert {d["claimed"] for d in summary["dropouts"]} == {0, 1, 2}

    # fused knowledge went to the honest sites' nodes only, never to the liar or the impostor
    sent = {(r, node) for r, node, fused in transport.inboxes if fused}
    assert sent == {(r, node) for r in (2, 3) for node in (100, 101, 102)}
    # the impostor's evaluation (answered first, accuracy 0) is not counted: site 1's is
    evaluations = read_events(recorder.run_dir, "client-eval")
    assert {(e["round"], e["client"], e["accuracy"]) for e in evaluations} == {
        (r, c, 0.25 * c) for r in (2, 3) for c in (0, 1, 2)}


def test_without_a_plan_the_same_attack_succeeds(parts, site_keys, tmp_path):
    """The control: partition ids taken as claimed (a simulation, no identity.site-keys): the
    impostor answering first displaces site 1, and the liar is sent site 2's fused knowledge."""
    config, split = parts
    transport = KeyedSites(_attacked(site_keys), run_id="run-7")
    summary = run_federation(config=config, split=split, transport=transport,
                             recorder=RunRecorder(tmp_path / "run", config.to_toml()))
    assert summary["status"] == "completed"
    assert transport.known[IMPOSTOR] == 1 and transport.known[LIAR] == 2
    assert any(node == LIAR and fused for _, node, fused in transport.inboxes)
