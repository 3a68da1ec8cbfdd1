"""Tests of fedkd.cli.deploy (``fedkd deploy ...``) that start no Flower process: the
printed commands (``--dry-run``, ``plan``), the files written, and the
``fedkd: error: ...`` lines for missing inputs. The deployments themselves are in
tests/e2e/test_e2e_deployment.py (marker ``deployment``)."""

from __future__ import annotations

import tomllib

from fedkd.cli import main


def test_deploy_certs_and_keys_write_the_files_they_name(tmp_path, capsys):
    assert main(["deploy", "certs", "--out", str(tmp_path / "certs"), "--host", "server.example.org"]) == 0
    out = capsys.readouterr().out
    assert "server.example.org" in out
    assert {p.name for p in (tmp_path / "certs").iterdir()} >= {"ca.crt", "ca.key", "server.pem", "server.key"}
    assert main(["deploy", "keys", "--out", str(tmp_path / "keys"), "site-a"]) == 0
    assert "fedkd deploy register" in capsys.readouterr().out
    assert (tmp_path / "keys" / "site-a.pub").is_file()
    # a second call refuses to overwrite, with one error line
    assert main(["deploy", "keys", "--out", str(tmp_path / "keys"), "site-a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedkd: error: ")


def test_deploy_superlink_dry_run_prints_tls_and_authentication(capsys):
    assert main(["deploy", "superlink", "--dry-run"]) == 0
    superlink, front, note = capsys.readouterr().out.strip().splitlines()
    assert superlink.startswith("flower-superlink --host 127.0.0.1 --port 9093 ")  # loopback only
    assert "--ssl-certfile certs/server.pem" in superlink and "--enable-supernode-auth" in superlink
    assert front.endswith("deploy front --host 0.0.0.0 --port 9091 --upstream 127.0.0.1:9093 --certs certs")
    assert "fedkd deploy connect --superlink 127.0.0.1:9093 --ca certs/ca.crt" in note
    assert main(["deploy", "superlink", "--insecure", "--dry-run"]) == 0
    assert "--insecure" in capsys.readouterr().out
    assert main(["deploy", "superlink", "--no-front", "--dry-run"]) == 0  # the old way, with a warning
    captured = capsys.readouterr()
    assert captured.out.startswith("flower-superlink --host 0.0.0.0 --port 9091 ")
    assert "Control API" in captured.err
    assert main(["deploy", "superlink", "--control-port", "9091", "--dry-run"]) == 2


def test_deploy_supernode_dry_run_starts_the_app_guard_beside_it(capsys):
    assert main(["deploy", "supernode", "--superlink", "h:9091", "--partition-id", "0", "--insecure",
                 "--runtime-port", "9300", "--allow-plugin", "m.n:Net", "--dry-run"]) == 0
    supernode, guard = capsys.readouterr().out.strip().splitlines()
    assert "--isolation process" in supernode and "--port 9300" in supernode
    assert guard.endswith("-m clients.app_guard --runtime-api-address 127.0.0.1:9300 --allow-plugin m.n:Net")
    assert main(["deploy", "supernode", "--superlink", "h:9091", "--partition-id", "0", "--insecure",
                 "--isolation", "subprocess", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "--isolation subprocess" in captured.out and "runs any app" in captured.err


def test_deploy_superlink_without_certificates_names_what_is_missing(tmp_path, capsys):
    assert main(["deploy", "superlink", "--certs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedkd: error: not found: ca ")


def test_deploy_connect_needs_a_ca_unless_insecure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    assert main(["deploy", "connect", "--superlink", "h:9091"]) == 2
    assert capsys.readouterr().err.strip() == "fedkd: error: --ca: give the CA certificate (ca.crt), or --insecure"
    assert main(["deploy", "connect", "--superlink", "h:9091", "--insecure"]) == 0
    config = tomllib.loads((tmp_path / "flwr" / "config.toml").read_text())
    assert config["superlink"]["fedkd"]["address"] == "h:9091"


def test_deploy_run_dry_run_prints_the_flwr_command(tmp_path, capsys):
    assert main(["deploy", "run", "--set", f"output-dir={tmp_path}", "--set", "run-name=x", "--dry-run"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("flwr run ") and line.endswith("fedkd --format json")


def test_deploy_run_reports_bad_config_keys(capsys):
    assert main(["deploy", "run", "--set", "fusion.method=bogus", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedkd: error: fusion.method")


def test_deploy_plan_names_every_site(capsys):
    assert main(["deploy", "plan", "--superlink", "server.example.org:9091", "--sites", "a", "b"]) == 0
    out = capsys.readouterr().out
    assert "fedkd deploy certs" in out and "fedkd deploy keys --out keys a b" in out
    assert "Site host 'b' (partition 1)" in out


def test_deploy_connect_refuses_an_address_without_a_port(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    for bad in ("server.example.org", "h:", ":9091", "h:99999", "::1:9091"):
        assert main(["deploy", "connect", "--superlink", bad, "--insecure"]) == 2
        assert capsys.readouterr().err.startswith("fedkd: error: --superlink: ")
    assert not (tmp_path / "flwr" / "config.toml").exists()
    assert main(["deploy", "connect", "--superlink", "[::1]:9091", "--insecure"]) == 0


def test_deploy_keys_writes_the_identity_plan_and_run_and_supernode_use_it(tmp_path, monkeypatch, capsys):
    """keys -> keys/sites.toml (partition i = the i-th name); supernode --key signs with it
    (node config identity-key); run adds identity.site-keys by default, refuses a plan that
    lacks a site, and says when identities are off."""
    from fedkd.identity import load_site_keys

    monkeypatch.chdir(tmp_path)
    assert main(["deploy", "keys", "hospital-a", "hospital-b"]) == 0
    assert "partition 0 = hospital-a, partition 1 = hospital-b" in capsys.readouterr().out
    plan = tomllib.loads((tmp_path / "keys" / "sites.toml").read_text())
    assert [(s["partition-id"], s["name"]) for s in plan["site"]] == [(0, "hospital-a"), (1, "hospital-b")]
    assert plan["site"][1]["public-key"] == (tmp_path / "keys" / "hospital-b.pub").read_text().strip()
    assert sorted(load_site_keys(tmp_path / "keys" / "sites.toml", num_clients=2)) == [0, 1]

    assert main(["deploy", "supernode", "--superlink", "h:9092", "--partition-id", "1", "--ca", "ca.crt",
                 "--key", "keys/hospital-b", "--dry-run"]) == 0
    assert f'identity-key="{tmp_path / "keys" / "hospital-b"}"' in capsys.readouterr().out

    run = ["deploy", "run", "--set", f"output-dir={tmp_path}", "--set", "run-name=x", "--dry-run"]
    assert main([*run, "--set", "data.num-clients=2"]) == 0
    assert f"identities on: replies must be signed with the keys in {tmp_path / 'keys' / 'sites.toml'}" \
        in capsys.readouterr().out
    assert main([*run, "--set", "data.num-clients=3"]) == 2  # the plan has no key for partition 2
    assert "no public key for partition-id 2" in capsys.readouterr().err
    assert main([*run, "--set", "data.num-clients=3", "--no-identity"]) == 0
    assert "identities off" in capsys.readouterr().err
