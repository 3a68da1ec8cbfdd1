"""Unit tests for the deployment pieces that need no running Flower processes:
certificates and keys (fedkd.ops.deploy), site-local data files (fedkd.data), node configs
(fedkd.ops.node), checkpoints (fedkd.checkpoint), the site-state mod (clients.site_state)."""

from __future__ import annotations

import dataclasses
import json
import stat
import subprocess

import numpy as np
import pytest

from fedkd.reporting import trim_events
from fedkd.checkpoint import (
    CheckpointError,
    SiteStateStore,
    load_checkpoint,
    read_server_checkpoint,
    resume_problems,
    save_checkpoint,
    write_server_checkpoint,
)
from fedkd.config import ConfigError, load_config
from fedkd.data import SiteDataError, load_federation, load_public_file, load_site_file
from fedkd.ops.deploy import (
    Deployment,
    certificate_hosts,
    connection_toml,
    export_partitions,
    front_command,
    guard_command,
    node_config_string,
    superlink_command,
    supernode_command,
    write_certificates,
    write_supernode_keys,
)
from fedkd.ops.node import load_site_split, site_settings


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ certificates, keys


def test_certificates_chain_to_the_ca_with_the_sans_asked_for(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    paths = write_certificates(tmp_path, hosts=["server.example.org", "10.0.0.5", "localhost"], days=30)
    # the loopback names are always added: flwr and the front reach the SuperLink on 127.0.0.1
    assert certificate_hosts(paths.server_cert) == ["server.example.org", "localhost", "10.0.0.5", "127.0.0.1"]
    bare = write_certificates(tmp_path / "bare", hosts=["server.example.org"], loopback=False)
    assert certificate_hosts(bare.server_cert) == ["server.example.org"]
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature does not check out
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)
    assert (server.not_valid_after_utc - server.not_valid_before_utc).days == 30
    assert _mode(paths.ca_key) == _mode(paths.server_key) == 0o600
    assert _mode(paths.ca_cert) == _mode(paths.server_cert) == 0o644


def test_openssl_verifies_the_server_certificate(tmp_path):
    paths = write_certificates(tmp_path, hosts=["localhost"])
    done = subprocess.run(["openssl", "verify", "-CAfile", str(paths.ca_cert), str(paths.server_cert)],
                          capture_output=True, text=True, check=False)
    if done.returncode == 127:  # pragma: no cover - no openssl binary
        pytest.skip("openssl not installed")
    assert done.returncode == 0, done.stdout + done.stderr


def test_certificates_refuse_to_overwrite_and_bad_hosts(tmp_path):
    write_certificates(tmp_path, hosts=["localhost"])
    with pytest.raises(FileExistsError, match="--force"):
        write_certificates(tmp_path, hosts=["localhost"])
    write_certificates(tmp_path, hosts=["127.0.0.1"], overwrite=True)
    assert certificate_hosts(tmp_path / "server.pem") == ["localhost", "127.0.0.1"]
    for hosts in ([], ["bad host"], ["a..b"]):
        with pytest.raises(ValueError):
            write_certificates(tmp_path / "x", hosts=hosts)


def test_supernode_keys_load_the_way_flower_loads_them(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    pairs = write_supernode_keys(tmp_path, ["site-a", "site_b"])
    for pair in pairs:
        private = load_ssh_private_key(pair.private.read_bytes(), None)  # flower-supernode
        public = load_ssh_public_key(pair.public.read_bytes())  # flwr supernode register
        assert isinstance(private, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(public)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert _mode(pair.private) == 0o600
    with pytest.raises(FileExistsError):
        write_supernode_keys(tmp_path, ["site-a"])
    with pytest.raises(ValueError, match="distinct"):
        write_supernode_keys(tmp_path / "y", ["a", "a"])
    with pytest.raises(ValueError):
        write_supernode_keys(tmp_path / "y", ["../evil"])


# ------------------------------------------------------------------ commands


def test_commands_turn_tls_and_authentication_on_unless_insecure(tmp_path):
    secure = Deployment(address="server.example.org:9091", certs_dir=tmp_path)
    cmd = superlink_command(secure)
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    # the SuperLink (Control API included) on loopback; the front on the sites' address
    assert cmd[cmd.index("--host") + 1:cmd.index("--port") + 2] == ["127.0.0.1", "--port", "9093"]
    front = front_command(secure)
    assert front[front.index("deploy"):] == ["deploy", "front", "--host", "0.0.0.0", "--port", "9091",
                                             "--upstream", "127.0.0.1:9093", "--certs", str(tmp_path)]
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(tmp_path / "server.pem")
    assert "--disable-runtime-dependency-installation" in cmd
    insecure = superlink_command(Deployment(insecure=True))
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure

    node = supernode_command(superlink="h:1", node_config={"partition-id": 0},
                             root_certificates=tmp_path / "ca.crt", private_key=tmp_path / "k")
    assert node[node.index("--auth-supernode-private-key") + 1] == str(tmp_path / "k")
    assert node[node.index("--isolation") + 1] == "process"  # the app guard runs the tasks
    assert guard_command(runtime_port=9200, allow_plugins=["m.n:Net"])[1:] == [
        "-m", "clients.app_guard", "--runtime-api-address", "127.0.0.1:9200", "--allow-plugin", "m.n:Net"]
    with pytest.raises(ValueError, match="insecure"):
        supernode_command(superlink="h:1", node_config={"partition-id": 0})


def test_node_config_string_round_trips_through_flowers_parser():
    from flwr.common.config import parse_config_args

    values = {"partition-id": 3, "data-path": "/srv/my data/site-3.npz", "model": "mlp-large"}
    assert parse_config_args([node_config_string(values)]) == values


def test_connection_toml_keeps_other_connections(tmp_path):
    import tomllib

    existing = '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    text = connection_toml(Deployment(address="h:9091", certs_dir=tmp_path), existing=existing)
    config = tomllib.loads(text)
    assert config["superlink"]["local"] == {"address": ":local:"}
    assert config["superlink"]["fedkd"] == {"address": "h:9091",
                                            "root-certificates": str((tmp_path / "ca.crt").resolve())}
    insecure = tomllib.loads(connection_toml(Deployment(address="h:1", insecure=True)))
    assert insecure["superlink"]["fedkd"]["insecure"] is True


# ------------------------------------------------------------------ site-local data


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    config = load_config(overrides={"data.num-clients": 3})
    out = tmp_path_factory.mktemp("sites")
    files = export_partitions(config, out)
    return config, out, files


def test_exported_files_reproduce_the_split_exactly(exported):
    config, out, files = exported
    assert [f.path.name for f in files] == ["public.npz", "site-0.npz", "site-1.npz", "site-2.npz"]
    assert _mode(out / "site-0.npz") == 0o600
    split = load_federation(config.data, config.seed)
    for client in range(3):
        settings = site_settings({"partition-id": client, "public-path": str(out / "public.npz"),
                                  "data-path": str(out / f"site-{client}.npz")}, num_clients=3)
        view = load_site_split(config, settings)
        assert view.public_fingerprint == split.public_fingerprint
        np.testing.assert_array_equal(view.public.x, split.public.x)
        for part in ("train", "val", "test"):
            a, b = getattr(view.clients[client], part), getattr(split.clients[client], part)
            np.testing.assert_array_equal(a.x, b.x)
            np.testing.assert_array_equal(a.y, b.y)
            np.testing.assert_array_equal(a.ids, b.ids)
        assert (view.num_classes, view.input_shape) == (split.num_classes, split.input_shape)


def test_a_site_reading_the_files_draws_the_simulations_jittered_copies(tmp_path):
    """data.public-copies: export writes the public set without the copies; a site reading
    public.npz draws the same copies as the simulation's split (same fingerprint), before
    the same standardisation."""
    config = load_config(overrides={"data.num-clients": 3, "data.public-copies": 2, "data.standardize": "public"})
    export_partitions(config, tmp_path)
    split = load_federation(config.data, config.seed)
    plain = load_federation(dataclasses.replace(config.data, public_copies=0), config.seed)
    with np.load(tmp_path / "public.npz") as f:
        assert len(f["ids"]) == len(plain.public) == len(split.public) // 3
    node = {"partition-id": 1, "public-path": str(tmp_path / "public.npz"), "data-path": str(tmp_path / "site-1.npz")}
    view = load_site_split(config, site_settings(node, num_clients=3))
    assert view.public_fingerprint == split.public_fingerprint
    np.testing.assert_allclose(view.public.x, split.public.x, atol=1e-5)
    np.testing.assert_allclose(view.clients[1].train.x, split.clients[1].train.x, atol=1e-5)


def test_exported_files_are_unscaled_and_a_site_scales_them_as_the_simulation(tmp_path):
    """data.standardize: export writes the data as read; a site reading the files with
    "public" gets exactly the simulation's scaled data (the statistics of the shared
    public set), and with "private" is scaled by its own training part alone."""
    config = load_config(overrides={"data.num-clients": 3, "data.standardize": "public"})
    export_partitions(config, tmp_path)
    raw = load_federation(dataclasses.replace(config.data, standardize="none"), config.seed)
    scaled = load_federation(config.data, config.seed)
    with np.load(tmp_path / "site-1.npz") as f:
        np.testing.assert_array_equal(f["train_x"], raw.clients[1].train.x)
    node = {"partition-id": 1, "public-path": str(tmp_path / "public.npz"), "data-path": str(tmp_path / "site-1.npz")}
    view = load_site_split(config, site_settings(node, num_clients=3))
    np.testing.assert_allclose(view.clients[1].train.x, scaled.clients[1].train.x, atol=1e-5)
    np.testing.assert_allclose(view.public.x, scaled.public.x, atol=1e-5)
    own = dataclasses.replace(config, data=dataclasses.replace(config.data, standardize="private"))
    view = load_site_split(own, site_settings(node, num_clients=3))
    train = raw.clients[1].train.x.reshape(len(raw.clients[1].train.x), -1).astype(np.float64)
    std = train.std(axis=0)
    std[std == 0] = 1.0  # by hand: the site's own mean and std
    expected = (raw.clients[1].val.x.reshape(len(raw.clients[1].val.x), -1) - train.mean(axis=0)) / std
    np.testing.assert_allclose(view.clients[1].val.x.reshape(len(expected), -1), expected, atol=1e-4)


def test_a_site_file_of_its_own_records_is_split_locally(tmp_path, exported):
    config, out, _ = exported
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "own.npz", x=rng.random((60, 64)).astype(np.float32), y=np.arange(60) % 10)
    public, num_classes = load_public_file(out / "public.npz")
    data = load_site_file(tmp_path / "own.npz", partition_id=0, num_classes=num_classes,
                          input_shape=(64,), seed=1)
    assert len(data.train) + len(data.val) + len(data.test) == 60
    assert len(data.test) == 12 and len(data.val) > 0


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((5, 63)), "y": np.zeros(5, int)}, "shape"),
        ({"x": np.zeros((5, 64)), "y": np.full(5, 10)}, "labels must be in 0..9"),
        ({"x": np.full((5, 64), np.nan), "y": np.zeros(5, int)}, "non-finite"),
        ({"x": np.zeros((5, 64)), "y": np.zeros(5)}, "integer"),
        ({"z": np.zeros(3)}, "must hold x and y"),
        ({"x": np.zeros((5, 64)), "y": np.zeros(5, int), "partition_id": np.int64(2)}, "holds partition 2"),
    ],
)
def test_bad_site_files_are_refused_with_a_reason(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SiteDataError, match=message):
        load_site_file(tmp_path / "bad.npz", partition_id=0, num_classes=10, input_shape=(64,))


def test_missing_and_unreadable_files_are_clear(tmp_path):
    with pytest.raises(SiteDataError, match="not found"):
        load_public_file(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(SiteDataError, match="not a readable"):
        load_public_file(tmp_path / "junk.npz")


def test_node_config_problems_are_listed_together():
    with pytest.raises(ConfigError) as err:
        site_settings({"partition-id": 7, "datapath": "/x", "model": "resnet-9000", "state-dir": 3},
                      num_clients=3)
    text = "\n".join(err.value.problems)
    assert "partition-id: must be an integer in 0..2" in text
    assert "datapath: unknown key; did you mean 'data-path'?" in text
    assert "model: must be one of" in text
    assert "state-dir: must be a string" in text
    with pytest.raises(ConfigError, match="required"):
        site_settings({}, num_clients=3)
    assert site_settings({"partition-id": 1, "num-partitions": 3}, num_clients=3).partition_id == 1


def test_a_site_with_a_different_public_set_has_a_different_fingerprint(tmp_path, exported):
    config, out, _ = exported
    other = load_config(overrides={"data.num-clients": 3, "seed": 5})
    export_partitions(other, tmp_path)
    view = load_site_split(config, site_settings(
        {"partition-id": 0, "public-path": str(tmp_path / "public.npz"),
         "data-path": str(out / "site-0.npz")}, num_clients=3))
    assert view.public_fingerprint != load_federation(config.data, config.seed).public_fingerprint


# ------------------------------------------------------------------ checkpoints


def test_checkpoints_round_trip_exactly_and_atomically(tmp_path):
    arrays = {"a": np.random.default_rng(0).random((3, 4)), "b/c": np.arange(5, dtype=np.int64)}
    meta = {"x": 0.1 + 0.2, "nan": float("nan"), "list": [1, 2.5, "s"]}
    save_checkpoint(tmp_path / "c.npz", arrays=arrays, meta=meta)
    back, meta_back = load_checkpoint(tmp_path / "c.npz")
    for name in arrays:
        np.testing.assert_array_equal(back[name], arrays[name])
        assert back[name].dtype == arrays[name].dtype
    assert meta_back["x"] == 0.1 + 0.2 and np.isnan(meta_back["nan"]) and meta_back["list"] == [1, 2.5, "s"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary file left
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "broken.npz")

    write_server_checkpoint(tmp_path, round_number=4, arrays={"f": np.ones(2)}, state={"history": [1]})
    round_number, arrays_back, state = read_server_checkpoint(tmp_path)
    assert round_number == 4 and state == {"history": [1]}


def test_site_store_keeps_the_latest_rounds_and_drops_superseded_ones(tmp_path):
    store = SiteStateStore(tmp_path, run_key="study/knfu", client=2)
    for r in (1, 2, 3):
        store.save(r, arrays={"w": np.full(2, r)}, meta={})
    assert store.rounds() == [2, 3]  # keep=2
    assert store.latest(before=3) == 2 and store.latest(before=2) is None
    store.save(2, arrays={"w": np.full(2, 20)}, meta={})  # a retried round 2 supersedes round 3
    assert store.rounds() == [2]
    assert store.load(2)[0]["w"][0] == 20
    assert store.directory == tmp_path / "study" / "knfu" / "site-2"
    for bad in ("", "/abs", "../up"):
        with pytest.raises(ValueError):
            SiteStateStore(tmp_path, run_key=bad, client=0)


def test_resume_problems_name_what_changed():
    saved = load_config(overrides={"run-name": "r"}).to_flat()
    same = load_config(overrides={"run-name": "r", "checkpoint.resume": True, "round-timeout": 5.0,
                                  "num-server-rounds": 30}).to_flat()
    assert resume_problems(saved, same, checkpoint_round=3) == []
    changed = load_config(overrides={"run-name": "r", "seed": 1, "num-server-rounds": 2}).to_flat()
    problems = resume_problems(saved, changed, checkpoint_round=3)
    assert any(p.startswith("seed:") for p in problems)
    assert any("below the 3 rounds" in p for p in problems)


def test_trim_events_drops_what_came_after_the_checkpoint(tmp_path):
    lines = [{"event": "client-train", "round": 1}, {"event": "round", "round": 1},
             {"event": "client-train", "round": 2}, {"event": "resumed", "after-round": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert trim_events(tmp_path, through_round=1) == 1
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [lines[0], lines[1], lines[3]]


def test_resume_needs_a_run_name():
    with pytest.raises(ConfigError, match="checkpoint.resume: needs the run-name"):
        load_config(overrides={"checkpoint.resume": True})


# ------------------------------------------------------------------ the site-state mod


def test_site_state_mod_restores_the_state_before_the_round_asked_for(tmp_path):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
    from flwr.app.message.message import make_message

    from clients.site_state import ROUND_RECORD, persist_site_state

    run_config = load_config(overrides={"run-name": "r", "data.num-clients": 3}).to_flat()

    def context() -> Context:
        return Context(run_id=1, node_id=1, node_config={"partition-id": 1, "state-dir": str(tmp_path)},
                       state=RecordDict(), run_config=run_config)

    def message(kind: str, round_number: int) -> Message:
        metadata = Metadata(run_id=1, message_id=f"{kind}-{round_number}", src_node_id=0, dst_node_id=1,
                            reply_to_message_id="", group_id="", ttl=60.0, message_type=kind,
                            created_at=0.0)
        return make_message(metadata, RecordDict({"config": ConfigRecord({"round": round_number})}))

    seen = []

    def handler(msg, ctx):  # noqa: ANN001  a train handler that counts its rounds in context.state
        done = int(ctx.state["site"]["n"]) if "site" in ctx.state else 0
        seen.append((msg.metadata.message_type, int(msg.content["config"]["round"]), done))
        if msg.metadata.message_type == "train":
            ctx.state["site"] = ConfigRecord({"n": done + 1, "blob": b"\x00\x01"})
            ctx.state["model"] = ArrayRecord({"w": Array(np.full(3, done + 1, dtype=np.float32))})
        return make_message(Metadata(run_id=1, message_id="", src_node_id=1, dst_node_id=0,
                                     reply_to_message_id=msg.metadata.message_id, group_id="",
                                     ttl=60.0, message_type=msg.metadata.message_type,
                                     created_at=0.0), RecordDict())

    first = context()
    for r in (1, 2, 3):
        persist_site_state(message("train", r), first, handler)
    assert held_round_of(first, ROUND_RECORD) == 3
    persist_site_state(message("train", 3), first, handler)  # a retried round 3 starts from round 2
    assert seen[-1] == ("train", 3, 2)

    resumed = context()  # a new run (or a restarted SuperNode): empty context.state
    persist_site_state(message("train", 3), resumed, handler)
    assert seen[-1] == ("train", 3, 2)  # continues from its round-2 state on disk
    assert bytes(resumed.state["site"]["blob"]) == b"\x00\x01"
    persist_site_state(message("evaluate", 3), context(), handler)
    assert seen[-1] == ("evaluate", 3, 3)  # evaluation sees the state after round 3

    stateless = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(),
                        run_config=run_config)
    persist_site_state(message("train", 1), stateless, handler)  # no state dir: memory only
    assert "model" in stateless.state


def held_round_of(context, record: str) -> int:  # noqa: ANN001
    return int(context.state[record]["round"])


# ------------------------------------------------------------------ a site's own choices


def test_a_site_can_run_its_own_model():
    from flwr.app import Context, RecordDict

    from clients.client_app import _site, load_state

    config = load_config(overrides={"data.num-clients": 3, "model.architectures": "mlp-small"})

    def site_model(node_config: dict):  # noqa: ANN202
        context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                          run_config=config.to_flat())
        cfg, split, client = _site(context)
        return load_state(context, cfg, split, client).model

    default, own = site_model({"partition-id": 0}), site_model({"partition-id": 0, "model": "mlp-large"})
    widths = lambda m: [p.shape[0] for n, p in m.named_parameters() if n.endswith("bias")]  # noqa: E731
    assert widths(default) == [32, 10] and widths(own) == [256, 128, 10]


def test_a_site_naming_the_dataset_rebuilds_the_same_partition():
    config = load_config(overrides={"data.num-clients": 3})
    split = load_federation(config.data, config.seed)
    view = load_site_split(config, site_settings({"partition-id": 2, "dataset": "digits"}, num_clients=3))
    assert view.public_fingerprint == split.public_fingerprint
    np.testing.assert_array_equal(view.clients[2].train.ids, split.clients[2].train.ids)
    other = load_site_split(config.__class__(data=config.data.__class__(num_clients=3, public_fraction=0.2)),
                            site_settings({"partition-id": 2, "dataset": "digits"}, num_clients=3))
    assert other.public_fingerprint != split.public_fingerprint  # a different copy: refused in round 1


def test_a_site_whose_public_set_differs_refuses_to_train(tmp_path, exported):
    """The ClientApp's train handler, given a node config whose public.npz is not the
    server's, refuses the round with a message naming both fingerprints."""
    from flwr.app import ConfigRecord, Context, Metadata, RecordDict
    from flwr.app.message.message import make_message

    from clients.client_app import train

    config, out, _ = exported
    other = load_config(overrides={"data.num-clients": 3, "seed": 5})
    export_partitions(other, tmp_path)
    server_fingerprint = load_federation(config.data, config.seed).public_fingerprint
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=config.to_flat(),
                      node_config={"partition-id": 0, "public-path": str(tmp_path / "public.npz"),
                                   "data-path": str(out / "site-0.npz")})
    metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="", ttl=60.0, message_type="train", created_at=0.0)
    message = make_message(metadata, RecordDict({"config": ConfigRecord(
        {"round": 1, "public-fingerprint": server_fingerprint, "config-digest": config.digest()})}))
    with pytest.raises(ValueError, match=f"site 0 refuses round 1: its public transfer set .* differs "
                                         f"from the server's \\({server_fingerprint[:12]}\\)"):
        train(message, context)


def test_site_state_is_private_and_an_unreadable_file_falls_back_to_the_one_before(tmp_path):
    import os

    store = SiteStateStore(tmp_path, run_key="r", client=0)
    store.save(1, arrays={"w": np.ones(2)}, meta={"n": 1})
    store.save(2, arrays={"w": np.zeros(2)}, meta={"n": 2})
    assert all(os.stat(store.path(r)).st_mode & 0o777 == 0o600 for r in (1, 2))  # owner only
    assert store.load_latest(before=3)[0] == 2
    store.path(2).write_bytes(b"PK\x03\x04 truncated")
    found = store.load_latest(before=3)
    assert found[0] == 1 and found[2]["n"] == 1 and found[1]["w"].tolist() == [1.0, 1.0]
    store.path(1).write_bytes(b"")
    assert store.load_latest(before=3) is None


def test_a_corrupt_server_checkpoint_is_one_line_not_a_traceback(tmp_path, capsys):
    from fedkd.cli import main

    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "checkpoint.npz").write_bytes(b"not a checkpoint")
    rc = main(["simulate", "--set", f"output-dir={tmp_path / 'runs'}", "--set", "run-name=x", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("fedkd: error: checkpoint ") and "unreadable" in err[0]


def test_trim_events_drops_a_line_cut_off_mid_write(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"event": "round", "round": 1}\n{"event": "client-tr')
    assert trim_events(tmp_path, through_round=1) == 1
    assert (tmp_path / "metrics.jsonl").read_text() == '{"event": "round", "round": 1}\n'
