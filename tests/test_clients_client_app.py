"""clients/client_app.py: the ClientApp's handlers on hand-built Flower Messages.

The handlers only convert: a train Message -> SiteInbox, context.state -> SiteState, then
back. So the reply to a hand-built message must carry exactly what
:func:`fedkd.federation.site.site_round` returns for the same inbox and state.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Metadata, RecordDict
from flwr.app.message.message import make_message

from fedkd.config import load_config
from fedkd.data import load_federation
from fedkd.federation.site import SiteInbox, SiteState, site_round
from fedkd.wire import encode


@pytest.fixture(scope="module")
def parts():
    config = load_config(overrides={"data.num-clients": 3, "train.local-epochs": 1, "train.distill-epochs": 1,
                                    "train.target-choice": "fused"})
    return config, load_federation(config.data, config.seed)


def _message(kind: str, records: RecordDict):  # noqa: ANN202
    metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="", ttl=60.0, message_type=kind, created_at=0.0)
    return make_message(metadata, records)


def _train_records(config, split, round_number, *, release=None, fused=None, positions=None):  # noqa: ANN001, ANN202
    content = RecordDict({"config": ConfigRecord({"round": round_number, "public-fingerprint": split.public_fingerprint,
                                                  "config-digest": config.digest()})})
    if release is not None:
        content["plan"] = ArrayRecord({"release-positions": Array(release)})
    if fused is not None:
        arrays = {"knowledge": Array(fused)}
        if positions is not None:
            arrays["positions"] = Array(positions)
        content["fused"] = ArrayRecord(arrays)
    return content


def test_train_handler_replies_what_the_site_round_returns(parts):
    from clients.client_app import evaluate, train

    config, split = parts
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(),
                      run_config=config.to_flat())
    release = np.array([2, 4, 6, 8])
    reply = train(_message("train", _train_records(config, split, 1, release=release)), context)
    expected_state = SiteState.fresh(config=config, split=split, client=1)
    expected = site_round(config=config, split=split, client=1, state=expected_state,
                          inbox=SiteInbox(round_number=1, public_fingerprint=split.public_fingerprint,
                                          config_digest=config.digest(), release_positions=release))
    assert set(reply.content.keys()) == {"knowledge", "metrics"}
    np.testing.assert_array_equal(reply.content["knowledge"]["knowledge"].numpy(), expected.arrays["knowledge"])
    assert dict(reply.content["metrics"]) == expected.metrics
    assert reply.content["metrics"]["partition-id"] == 1 and reply.content["metrics"]["rounds-trained"] == 1
    assert {"model", "site"} <= set(context.state.keys())

    # round 2 with F_i on 3 positions: distilled, and the model continues from context.state
    fused = encode(np.full((3, split.num_classes), 1 / split.num_classes))
    message = _message("train", _train_records(config, split, 2, fused=fused, positions=np.array([0, 1, 2])))
    second = train(message, context)
    site_round(config=config, split=split, client=1, state=expected_state,
               inbox=SiteInbox(round_number=2, public_fingerprint=split.public_fingerprint,
                               config_digest=config.digest(), fused=fused, fused_positions=np.array([0, 1, 2])))
    assert second.content["metrics"]["rounds-trained"] == 2 and "distil-loss" in second.content["metrics"]
    assert second.content["knowledge"]["knowledge"].numpy().shape == (len(split.public), split.num_classes)
    scores = evaluate(_message("evaluate", RecordDict({"config": ConfigRecord({"round": 2})})), context)
    assert dict(scores.content["metrics"])["partition-id"] == 1
    from fedkd.distillation import accuracy

    assert scores.content["metrics"]["accuracy"] == accuracy(expected_state.model, split.clients[1].test)


def test_query_handler_says_which_partition(parts):
    from clients.client_app import identify

    config, _ = parts
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2}, state=RecordDict(),
                      run_config=config.to_flat())
    reply = identify(_message("query", RecordDict({"config": ConfigRecord({"question": "partition-id"})})), context)
    assert dict(reply.content["metrics"]) == {"partition-id": 2}


def test_a_deployed_site_keeps_its_noise_secret_and_a_simulated_one_uses_the_run_seed(parts, tmp_path):
    import os

    from clients.client_app import site_noise

    config, _ = parts
    named = load_config(overrides={**config.to_flat(), "run-name": "r"})
    deployed = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "state-dir": str(tmp_path)},
                       state=RecordDict(), run_config=named.to_flat())
    noise = site_noise(deployed, named)
    secret = tmp_path / "r" / "site-1" / "noise-secret"
    assert noise.kind == "site-secret" and secret.is_file()
    assert os.stat(secret).st_mode & 0o777 == 0o600
    assert site_noise(deployed, named).key == noise.key == bytes.fromhex(secret.read_text())  # kept
    simulated = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3},
                        state=RecordDict(), run_config=named.to_flat())
    assert site_noise(simulated, named).kind == "run-seed"
    lowered = load_config(overrides={**named.to_flat(), "privacy.noise-seed": "run-seed"})
    assert site_noise(deployed, lowered).kind == "site-secret"  # the run config cannot lower it
    own = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "noise-seed": "run-seed"},
                  state=RecordDict(), run_config=named.to_flat())
    assert site_noise(own, named).kind == "run-seed"  # the site's own choice


def test_the_server_cannot_rerun_a_deployed_sites_private_round(parts, tmp_path):
    """The attack through the ClientApp: the server reruns round 1 of a DP site with the
    run config's seeds. It reproduces a simulated site's reply exactly, never a deployed
    one's (whose noise comes from its own secret)."""
    from clients.client_app import train

    config, split = parts
    private = load_config(overrides={**config.to_flat(), "privacy.enabled": True, "privacy.target-epsilon": 8.0,
                                     "model.architectures": "mlp-small", "run-name": "r"})
    attack = site_round(config=private, split=split, client=1, state=SiteState.fresh(config=private, split=split, client=1),
                        inbox=SiteInbox(round_number=1, public_fingerprint=split.public_fingerprint,
                                        config_digest=private.digest()))
    replies = {}
    for name, node_config in (("simulated", {"partition-id": 1, "num-partitions": 3}),
                              ("deployed", {"partition-id": 1, "state-dir": str(tmp_path)})):
        context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                          run_config=private.to_flat())
        replies[name] = train(_message("train", _train_records(private, split, 1)), context)
    simulated = replies["simulated"].content["knowledge"]["knowledge"].numpy()
    deployed = replies["deployed"].content["knowledge"]["knowledge"].numpy()
    np.testing.assert_array_equal(simulated, attack.arrays["knowledge"])
    assert not np.array_equal(deployed, attack.arrays["knowledge"])
    assert replies["deployed"].content["metrics"]["dp-noise-seed"] == 1.0  # site-secret, in the ledger


def test_replies_are_signed_with_the_sites_key_and_verify_through_the_wire(parts, tmp_path):
    """A challenged message to a site with an identity-key: its train and query replies,
    serialised as Flower sends them and unpacked by the ServerApp's transport, verify with
    its public key as the partition it holds, and with no other partition's."""
    from flwr.common.serde import message_from_proto, message_to_proto

    from clients.client_app import identify, train
    from fedkd.identity import Identities, IdentityError, load_site_keys, new_challenge
    from fedkd.ops.deploy import write_supernode_keys
    from server.server_app import GridTransport

    config, split = parts
    write_supernode_keys(tmp_path, [f"site-{i}" for i in range(3)])
    identities = Identities(load_site_keys(tmp_path, num_clients=3), run_id=5)
    context = Context(run_id=5, node_id=7, node_config={"partition-id": 1, "identity-key": str(tmp_path / "site-1")},
                      state=RecordDict(), run_config=config.to_flat())
    transport = GridTransport(None, config, challenges=True)
    for kind, handler, content in (
        ("query", identify, RecordDict({"config": ConfigRecord({"question": "partition-id", "round": 2})})),
        ("train", train, _train_records(config, split, 1, release=np.array([2, 4, 6, 8]))),
    ):
        challenge = new_challenge()
        content["identity"] = ConfigRecord({"challenge": challenge})
        transport.sent_challenge[7] = challenge
        reply = handler(_message(kind, content), context)
        wire = message_from_proto(message_to_proto(reply))  # as it crosses the network
        parsed = transport._reply(7, wire)
        assert parsed.signature and "identity" not in parsed.records and parsed.challenge == challenge
        round_number = 2 if kind == "query" else 1
        fields = {"kind": kind, "round_number": round_number, "challenge": parsed.challenge,
                  "signature": parsed.signature, "metrics": parsed.metrics, "arrays": parsed.arrays}
        identities.verify(partition_id=1, **fields)
        with pytest.raises(IdentityError):
            identities.verify(partition_id=2, **fields)

    unsigned = Context(run_id=5, node_id=7, node_config={"partition-id": 1}, state=RecordDict(),
                       run_config=config.to_flat())
    reply = identify(_message("query", RecordDict({"config": ConfigRecord({"question": "partition-id", "round": 2}),
                                                   "identity": ConfigRecord({"challenge": new_challenge()})})),
                     unsigned)
    assert set(reply.content.keys()) == {"metrics"}  # no key: no signature (refused by a server with a plan)


def test_an_unreadable_identity_key_is_one_line(parts, tmp_path):
    from fedkd.config import ConfigError
    from fedkd.ops.node import site_settings

    with pytest.raises(ConfigError) as err:
        site_settings({"partition-id": 0, "identity-key": str(tmp_path / "site-0")}, num_clients=3)
    assert err.value.problems == [f"node config identity-key: {tmp_path / 'site-0'}: cannot be read "
                                  "(No such file or directory)"]


def test_a_dp_student_sites_models_survive_context_state(parts):
    """A DP site with the student and the iterate average (privacy.ema-decay, the default):
    save_state writes its model, student and average as array records and load_state gives
    them back tensor for tensor."""
    import torch

    from clients.client_app import load_state, save_state

    config, split = parts
    private = load_config(overrides={**config.to_flat(), "privacy.enabled": True, "privacy.target-epsilon": 8.0,
                                     "model.architectures": "mlp-small"})
    state = SiteState.fresh(config=private, split=split, client=1)
    site_round(config=private, split=split, client=1, state=state,
               inbox=SiteInbox(round_number=1, public_fingerprint=split.public_fingerprint,
                               config_digest=private.digest()))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(),
                      run_config=private.to_flat())
    save_state(context, state)
    assert {"model", "student", "average", "privacy", "site"} <= set(context.state.keys())
    again = load_state(context, private, split, 1)
    for name in ("model", "student", "average"):
        for key, tensor in getattr(state, name).state_dict().items():
            torch.testing.assert_close(getattr(again, name).state_dict()[key], tensor, rtol=0, atol=0)
    assert int(again.average.n_averaged) == 1
