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
    line = capsys.readouterr().out.strip()
    assert line.startswith("flower-superlink ")
    assert "--ssl-certfile certs/server.pem" in line and "--enable-supernode-auth" in line
    assert main(["deploy", "superlink", "--insecure", "--dry-run"]) == 0
    assert "--insecure" in capsys.readouterr().out


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
