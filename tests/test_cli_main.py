"""Tests of fedkd.cli.main that start no federation: bad input to ``fedkd simulate`` /
``study`` / ``audit`` ends with one ``fedkd: error: ...`` line per problem and exit
status 2; ``fedkd options`` lists the keys. (The CLI's runs through Flower are in the e2e
tests: tests/e2e/test_e2e_simulation.py, test_e2e_resume.py, test_e2e_audit.py.)"""

from __future__ import annotations


def test_cli_reports_every_bad_set_value(capsys):
    from fedkd.cli import main

    rc = main(["simulate", "--set", "fusion.method=bogus", "--set", "data.alpha=-1",
               "--set", "fusion.betta=3"])
    assert rc == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 3
    assert all(line.startswith("fedkd: error: ") for line in lines)
    assert "fusion.method" in lines[0] and "bogus" in lines[0]
    assert "data.alpha" in lines[1]
    assert "did you mean 'fusion.beta'" in lines[2]
    assert captured.out == ""


def test_cli_reports_malformed_set(capsys):
    from fedkd.cli import main

    assert main(["study", "--set", "seed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedkd: error: --set 'seed': expected key=value"]


def test_cli_missing_config_file(capsys, tmp_path):
    from fedkd.cli import main

    assert main(["simulate", "--config", str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedkd: error: config file not found")


def test_cli_options_lists_keys(capsys):
    from fedkd.cli import main

    assert main(["options"]) == 0
    out = capsys.readouterr().out
    assert "fusion.method = 'expert'" in out


def test_cli_audit_needs_a_run_dir_or_sweep(capsys):
    from fedkd.cli import main

    assert main(["audit"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fedkd: error: fedkd audit: give either a RUN_DIR to audit or --sweep"]


def test_cli_audit_sweep_refuses_bad_numbers_before_any_run(capsys):
    from fedkd.cli import main

    assert main(["audit", "--sweep", "--epsilons", "1,x"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fedkd: error: --epsilons: expected comma-separated numbers; got '1,x'"]


def test_package_main_is_the_console_script_entry():
    import fedkd.cli
    from fedkd.cli.main import main

    assert fedkd.cli.main is main  # pyproject.toml: fedkd = "fedkd.cli:main"


def test_a_plugin_method_gets_a_portable_study_folder():
    from fedkd.cli.main import method_folder

    assert method_folder("examples.fedkd_plugins.fusion:median") == "examples.fedkd_plugins.fusion-median"
    assert method_folder("expert") == "expert"
    assert method_folder("a b/c:d") == "a-b-c-d"  # nothing that nests folders or needs quoting


def test_simulate_refuses_an_identity_plan_in_one_line(capsys, tmp_path):
    """Simulated sites hold no keys: a plan would refuse every reply, so simulate says so first."""
    from fedkd.cli import main

    assert main(["simulate", "--set", f"output-dir={tmp_path}", "--set", "identity.site-keys=keys/sites.toml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedkd: error: identity.site-keys: simulated sites hold no keys, so every reply would be "
                   "refused; identities are for deployments (fedkd deploy run)"]


def test_runner_and_ray_address_pick_how_simulate_and_study_run(monkeypatch, tmp_path, capsys):
    """--runner inprocess goes to the in-process runner, the default to the simulation engine
    with --ray-address passed on; --ray-address with the in-process runner is refused."""
    import importlib

    cli = importlib.import_module("fedkd.cli.main")  # the module (fedkd.cli.main is also the function)
    calls = []

    def fake(kind):  # noqa: ANN202
        def launch(config, **options):  # noqa: ANN202, ANN003
            calls.append((kind, config.fusion.method, options))
            raise SystemExit(0)  # no run: stop at the launch
        return launch

    monkeypatch.setattr(cli, "launch_inprocess", fake("inprocess"))
    monkeypatch.setattr(cli, "launch_simulation", fake("flower"))
    out = ["--set", f"output-dir={tmp_path}"]
    for argv in (["simulate", "--runner", "inprocess", *out],
                 ["simulate", "--ray-address", "127.0.0.1:6379", *out],
                 ["study", "--runner", "inprocess", "--methods", "mean", *out]):
        try:
            cli.main(argv)
        except SystemExit:
            pass
    assert calls == [("inprocess", "expert", {}),
                     ("flower", "expert", {"verbose": False, "ray_address": "127.0.0.1:6379"}),
                     ("inprocess", "mean", {})]
    assert cli.main(["simulate", "--runner", "inprocess", "--ray-address", "127.0.0.1:6379", *out]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fedkd: error: --ray-address: only the flower runner runs on a Ray cluster; --runner is inprocess")


def test_the_study_runs_fedavg_as_its_baseline_on_the_largest_architecture(monkeypatch, tmp_path):
    """``fedavg`` in a study goes to the FedAvg baseline (not a fusion method), after the
    fusion methods; a mixed federation gives FedAvg its largest architecture (digits:
    mlp-large, 50,826 parameters, against cnn-small's 6,186 and mlp-small's fewer)."""
    import importlib

    from fedkd.config import load_config
    from fedkd.engine import fedavg_architecture

    cli = importlib.import_module("fedkd.cli.main")
    assert cli.STUDY_METHODS[-1] == "fedavg"
    calls = []
    (tmp_path / "s").mkdir()
    run_dir = tmp_path / "s" / "run"
    monkeypatch.setattr(cli, "launch_inprocess", lambda config: calls.append(("kd", config.fusion.method)) or run_dir)
    monkeypatch.setattr(cli, "launch_fedavg", lambda config: calls.append(("fedavg", config.run_name)) or run_dir)
    monkeypatch.setattr(cli, "compare_table", lambda run_dirs: "")
    monkeypatch.setattr(cli, "plot_study", lambda run_dirs, out_dir: None)
    monkeypatch.setattr(cli, "exit_status", lambda run_dirs: 0)
    assert cli.main(["study", "--runner", "inprocess", "--methods", "mean,fedavg", "--set", f"output-dir={tmp_path}",
                     "--set", "run-name=s"]) == 0
    assert calls == [("kd", "mean"), ("fedavg", "s/fedavg")]
    mixed = load_config(overrides={"model.architectures": "mlp-small,mlp-large,cnn-small"})
    assert fedavg_architecture(mixed) == "mlp-large"
    assert fedavg_architecture(load_config(overrides={"model.architectures": "cnn-small"})) == "cnn-small"
