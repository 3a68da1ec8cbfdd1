"""fedkd.identity: replies signed with the site's SuperNode key, checked against the plan.

Real keys from :func:`fedkd.ops.deploy.write_supernode_keys` (the ones ``fedkd deploy
keys`` writes), real ECDSA: one changed byte anywhere the signature covers is refused."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.identity import (
    CHALLENGE_BYTES,
    Identities,
    IdentityError,
    load_private_key,
    load_public_key,
    load_site_keys,
    new_challenge,
    plan_toml,
    sign_reply,
    verify_reply,
)
from fedkd.ops.deploy import write_supernode_keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    pairs = write_supernode_keys(folder, ["site-0", "site-1"])
    private = [load_private_key(p.private) for p in pairs]
    public = [load_public_key(p.public.read_text(), where=str(p.public)) for p in pairs]
    return folder, private, public


def _reply(challenge: bytes) -> dict:
    k = np.full((3, 4), 0.25, dtype=np.float16)
    return {"run_id": 7, "kind": "train", "round_number": 2, "partition_id": 0, "challenge": challenge,
            "metrics": {"partition-id": 0, "num-examples": 12, "train-loss": 0.5, "curve": [1.0, 2.5]},
            "arrays": {"knowledge": k}}


def test_the_right_key_is_accepted_and_every_changed_field_refused(keys):
    _, private, public = keys
    reply = _reply(new_challenge())
    signature = sign_reply(private[0], **reply)
    verify_reply(public[0], signature, **reply)  # accepted

    knowledge = reply["arrays"]["knowledge"].copy()
    knowledge.reshape(-1).view(np.uint8)[5] ^= 1  # one byte of the payload
    challenge = bytearray(reply["challenge"])
    challenge[0] ^= 1
    tampered = {
        "payload byte": {**reply, "arrays": {"knowledge": knowledge}},
        "metric": {**reply, "metrics": {**reply["metrics"], "train-loss": 0.5000001}},
        "nonce": {**reply, "challenge": bytes(challenge)},
        "round": {**reply, "round_number": 3},
        "partition id": {**reply, "partition_id": 1},
        "kind": {**reply, "kind": "evaluate"},
        "run id": {**reply, "run_id": 8},
        "dtype": {**reply, "arrays": {"knowledge": reply["arrays"]["knowledge"].astype(np.float32)}},
    }
    for what, changed in tampered.items():
        with pytest.raises(IdentityError, match="does not verify"):
            verify_reply(public[0], signature, **changed)
        assert what  # (named for the reader: each case above must be refused)
    with pytest.raises(IdentityError, match="does not verify"):  # another site's key
        verify_reply(public[1], signature, **reply)
    with pytest.raises(IdentityError, match="does not verify"):  # signed by site 1, claimed as site 0
        verify_reply(public[0], sign_reply(private[1], **reply), **reply)
    with pytest.raises(IdentityError, match="unsigned"):
        verify_reply(public[0], None, **reply)
    flipped = bytearray(signature)
    flipped[-1] ^= 1
    with pytest.raises(IdentityError):
        verify_reply(public[0], bytes(flipped), **reply)


def test_a_reply_replayed_into_another_message_is_refused(keys):
    _, private, public = keys
    first, second = new_challenge(), new_challenge()
    assert len(first) == CHALLENGE_BYTES and first != second
    signature = sign_reply(private[0], **_reply(first))
    with pytest.raises(IdentityError, match="does not verify"):
        verify_reply(public[0], signature, **_reply(second))


def test_the_plan_from_a_folder_and_from_a_toml_file(keys, tmp_path):
    folder, private, _ = keys
    from_folder = load_site_keys(folder, num_clients=2)
    lines = {i: (folder / f"site-{i}.pub").read_text() for i in range(2)}
    (tmp_path / "sites.toml").write_text(plan_toml(lines, names={0: "site-0", 1: "site-1"}))
    from_plan = load_site_keys(tmp_path / "sites.toml", num_clients=2)
    identities = Identities(from_plan, run_id="r")
    reply = _reply(new_challenge())
    reply.pop("run_id")
    signature = sign_reply(private[0], run_id="r", **reply)
    identities.verify(signature=signature, **reply)
    Identities(from_folder, run_id="r").verify(signature=signature, **reply)
    with pytest.raises(IdentityError, match="does not verify"):
        identities.verify(signature=signature, **{**reply, "partition_id": 1})

    with pytest.raises(IdentityError, match="no public key for partition-id 2"):
        load_site_keys(folder, num_clients=3)
    (tmp_path / "twice.toml").write_text(plan_toml({0: lines[0], 1: lines[0]}))
    with pytest.raises(IdentityError, match="same key"):
        load_site_keys(tmp_path / "twice.toml", num_clients=2)
    with pytest.raises(IdentityError, match="neither a plan file nor a folder"):
        load_site_keys(tmp_path / "absent.toml", num_clients=2)


def test_unusable_private_keys_are_refused_in_one_line(tmp_path):
    with pytest.raises(IdentityError, match="cannot be read"):
        load_private_key(tmp_path / "missing.key")
    (tmp_path / "junk.key").write_text("not a key\n")
    with pytest.raises(IdentityError, match="not an unencrypted private key"):
        load_private_key(tmp_path / "junk.key")
