"""Site identities bound to keys: every reply a site sends is signed with its SuperNode key.

A partition id in a reply is a claim; it becomes an identity when the reply carries a
signature that verifies against the public key the server operator's plan lists for that
id (``identity.site-keys``). The key pair is the one ``fedkd deploy keys`` makes for the
site's SuperNode authentication (EC P-384, OpenSSH encoding); the operator registers the
same public key with the SuperLink.

Construction (version 1). For one reply the site signs, with ECDSA over P-384 and SHA-384
(``ec.ECDSA(hashes.SHA384())``, DER-encoded signature), the canonical byte string

    M = field("fedkd-identity-v1") || field(run id) || field(kind) || field(round)
        || field(partition id) || field(challenge) || field(SHA-384(payload))

where ``field(b) = len(b) as 8 bytes big-endian || b``, text is UTF-8 and integers are
written in decimal; ``kind`` is the message type (``train``, ``evaluate``, ``query``);
``challenge`` is the 32 random bytes the server put in that one message
(:func:`new_challenge`); and the payload encoding is, for each metric in name order,
``field(name) || field(tag:value)`` (``i:<decimal>`` for an integer, ``f:<float.hex()>``
for a float, ``l:[...]`` for a list of those), then ``field("arrays")``, then for each
array in name order ``field(name) || field(dtype.str) || field(shape) || field(C-order
bytes)``. Each field is length-prefixed, so no two different replies encode alike; the
leading label keeps these signatures apart from anything else signed with the same key
(Flower's own SuperNode authentication signs other, differently built messages).

What a verified reply proves: the holder of partition i's private key produced exactly
these metrics and arrays in answer to this message of this run and round. A reply moved
to another message, round or run fails (another challenge, round or run id), as does a
reply whose payload or claimed id was changed by one byte, and a reply for id i signed by
any other key. It says nothing about whether the data behind it are honest.

No Flower imports; the glue only moves the challenge and the signature
(``server/server_app.py``, ``clients/client_app.py``).
"""

from __future__ import annotations

import hashlib
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

DOMAIN = "fedkd-identity-v1"
CHALLENGE_BYTES = 32
MAX_SIGNATURE_BYTES = 128  # DER ECDSA P-384 signatures are at most 104 bytes
PLAN_FILE = "sites.toml"


class IdentityError(ValueError):
    """A reply whose signature is missing or does not verify, or an unusable key or plan."""

    claimed: int | None = None  # the partition id the refused reply claimed (set by the loop)


def new_challenge() -> bytes:
    """A fresh random challenge for one message (32 bytes from the OS)."""
    return secrets.token_bytes(CHALLENGE_BYTES)


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _value(value: Any) -> str:
    if isinstance(value, bool):
        raise ValueError(f"a metric value cannot be a bool; got {value!r}")
    if isinstance(value, (int, np.integer)):
        return f"i:{int(value)}"
    if isinstance(value, (float, np.floating)):
        return f"f:{float(value).hex()}"
    if isinstance(value, (list, tuple)):
        return "l:[" + ",".join(_value(v) for v in value) + "]"
    raise ValueError(f"a metric value must be a number or a list of numbers; got {type(value).__name__}")


def payload_digest(*, metrics: Mapping[str, Any] | None, arrays: Mapping[str, np.ndarray] | None) -> bytes:
    """SHA-384 of the reply's metrics and arrays in the canonical encoding (module doc)."""
    digest = hashlib.sha384()
    for name in sorted(metrics or {}):
        digest.update(_field(str(name).encode()) + _field(_value(metrics[name]).encode()))
    digest.update(_field(b"arrays"))
    for name in sorted(arrays or {}):
        array = np.ascontiguousarray(arrays[name])
        digest.update(_field(str(name).encode()) + _field(array.dtype.str.encode())
                      + _field(",".join(map(str, array.shape)).encode()) + _field(array.tobytes()))
    return digest.digest()


def signed_bytes(*, run_id: int | str, kind: str, round_number: int, partition_id: int, challenge: bytes,
                 metrics: Mapping[str, Any] | None, arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """The byte string M a site signs for one reply (module doc)."""
    if not isinstance(challenge, (bytes, bytearray)) or len(challenge) != CHALLENGE_BYTES:
        raise IdentityError(f"the challenge must be {CHALLENGE_BYTES} bytes")
    parts = (DOMAIN, str(run_id), str(kind), str(int(round_number)), str(int(partition_id)))
    return (b"".join(_field(p.encode()) for p in parts) + _field(bytes(challenge))
            + _field(payload_digest(metrics=metrics, arrays=arrays)))


def sign_reply(private_key: Any, *, run_id: int | str, kind: str, round_number: int, partition_id: int,
               challenge: bytes, metrics: Mapping[str, Any] | None,
               arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """ECDSA P-384 / SHA-384 signature (DER) of :func:`signed_bytes` with the site's key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    message = signed_bytes(run_id=run_id, kind=kind, round_number=round_number, partition_id=partition_id,
                           challenge=challenge, metrics=metrics, arrays=arrays)
    return private_key.sign(message, ec.ECDSA(hashes.SHA384()))


def verify_reply(public_key: Any, signature: bytes | None, *, run_id: int | str, kind: str, round_number: int,
                 partition_id: int, challenge: bytes | None, metrics: Mapping[str, Any] | None,
                 arrays: Mapping[str, np.ndarray] | None = None) -> None:
    """Check a reply's ``signature`` against ``public_key`` (partition ``partition_id``'s in
    the plan); raises :class:`IdentityError` saying why it is refused."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    if challenge is None:
        raise IdentityError("no challenge was sent to this node")
    if not signature:
        raise IdentityError(f"unsigned reply for partition-id {partition_id} (identities are on: "
                            "the site's node config needs identity-key)")
    if not isinstance(signature, (bytes, bytearray)) or len(signature) > MAX_SIGNATURE_BYTES:
        raise IdentityError("malformed signature")
    message = signed_bytes(run_id=run_id, kind=kind, round_number=round_number, partition_id=partition_id,
                           challenge=challenge, metrics=metrics, arrays=arrays)
    try:
        public_key.verify(bytes(signature), message, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise IdentityError(f"signature does not verify with partition-id {partition_id}'s key "
                            "(another node, or a changed or replayed reply)") from None


# ------------------------------------------------------------------ keys and the plan


def _p384(key: Any, where: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    curve = getattr(key, "curve", None)
    if not isinstance(curve, ec.SECP384R1):
        raise IdentityError(f"{where}: not an EC P-384 key (make one with fedkd deploy keys)")
    return key


def load_private_key(path: str | Path) -> Any:
    """A site's private key (OpenSSH or PEM PKCS#8, unencrypted, EC P-384) from ``path``."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise IdentityError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise IdentityError(f"{path}: not an unencrypted private key ({err})") from None
    return _p384(key, str(path))


def load_public_key(text: str, *, where: str) -> Any:
    """A public key from an OpenSSH line (``ecdsa-sha2-nistp384 AAAA... comment``)."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError) as err:
        raise IdentityError(f"{where}: not an OpenSSH public key ({err})") from None
    return _p384(key, where)


def plan_toml(public_keys: Mapping[int, str], *, names: Mapping[int, str] | None = None) -> str:
    """The identity plan: partition id -> the site's public key line (OpenSSH), as TOML::

        [[site]]
        partition-id = 0
        name = "site-a"
        public-key = "ecdsa-sha2-nistp384 AAAA... fedkd-site-a"
    """
    import tomli_w

    sites = [{"partition-id": int(i), **({"name": names[i]} if names and i in names else {}),
              "public-key": public_keys[i].strip()} for i in sorted(public_keys)]
    return tomli_w.dumps({"site": sites})


def load_site_keys(source: str | Path, *, num_clients: int) -> dict[int, Any]:
    """Partition id -> public key, for every partition 0..num_clients-1, from ``source``:
    a plan file (:func:`plan_toml`) or a folder holding ``site-<i>.pub`` for each i.
    Raises :class:`IdentityError` listing the partitions without a key."""
    source = Path(source)
    lines: dict[int, tuple[str, str]] = {}
    if source.is_dir():
        for i in range(num_clients):
            path = source / f"site-{i}.pub"
            if path.is_file():
                lines[i] = (path.read_text(), str(path))
    elif source.is_file():
        try:
            plan = tomllib.loads(source.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise IdentityError(f"identity plan {source}: not TOML ({err})") from None
        for entry in plan.get("site", []):
            client = entry.get("partition-id") if isinstance(entry, dict) else None
            if not isinstance(client, int) or isinstance(client, bool) or not 0 <= client < num_clients:
                raise IdentityError(f"identity plan {source}: partition-id must be in 0..{num_clients - 1}; "
                                    f"got {client!r}")
            if client in lines:
                raise IdentityError(f"identity plan {source}: partition-id {client} listed twice")
            lines[client] = (str(entry.get("public-key", "")), f"identity plan {source}, partition-id {client}")
    else:
        raise IdentityError(f"identity.site-keys: {source} is neither a plan file nor a folder")
    missing = [i for i in range(num_clients) if i not in lines]
    if missing:
        raise IdentityError(f"identity.site-keys: no public key for partition-id {', '.join(map(str, missing))} "
                            f"in {source}")
    keys = {i: load_public_key(text, where=where) for i, (text, where) in lines.items()}
    seen: dict[bytes, int] = {}
    for i, key in keys.items():
        from cryptography.hazmat.primitives import serialization

        raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        if raw in seen:
            raise IdentityError(f"identity.site-keys: partitions {seen[raw]} and {i} have the same key")
        seen[raw] = i
    return keys


class Identities:
    """The server's side: the plan's public keys (partition id -> key) and this run's id.

    :meth:`verify` checks one reply for the partition it claims; the loop
    (:mod:`fedkd.federation.loop`) calls it for every train, evaluation and query reply
    when the run config names ``identity.site-keys``, and maps a node to a partition only
    after a reply verified."""

    def __init__(self, keys: Mapping[int, Any], *, run_id: int | str) -> None:
        self.keys, self.run_id = dict(keys), run_id

    def verify(self, *, kind: str, round_number: int, partition_id: int, challenge: bytes | None,
               signature: bytes | None, metrics: Mapping[str, Any] | None,
               arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Raise :class:`IdentityError` unless ``signature`` verifies as partition
        ``partition_id``'s (:func:`verify_reply`) over this run, ``kind``, round and challenge."""
        key = self.keys.get(partition_id)
        if key is None:
            raise IdentityError(f"no public key for partition-id {partition_id} in the plan")
        verify_reply(key, signature, run_id=self.run_id, kind=kind, round_number=round_number,
                     partition_id=partition_id, challenge=challenge, metrics=metrics, arrays=arrays)
