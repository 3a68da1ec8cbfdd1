"""End to end: a federation recorded with auditing on, through Flower's real simulation
engine (3 sites, 2 rounds), then ``fedkd audit RUN_DIR`` writes the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedkd.cli import main as cli_main
from fedkd.reporting import read_events

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _flower_env(flower_env):
    """Every test here runs Flower (tests/conftest.py)."""


def test_audited_run_then_fedkd_audit_writes_the_report(tmp_path, capsys):
    settings = {
        "output-dir": str(tmp_path / "runs"), "run-name": "audited", "data.num-clients": 3,
        "num-server-rounds": 2, "train.local-epochs": 2, "train.distill-epochs": 2,
        "global-student.epochs": 2, "audit.enabled": "true", "audit.site": 1,
        "audit.canaries": 60, "audit.canary-labels": "mislabeled",
    }
    argv = ["simulate"] + [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    assert cli_main(argv) == 0
    run_dir = tmp_path / "runs" / "audited"

    # what the run kept: the plan and site 1's released knowledge of both rounds
    plan = np.load(run_dir / "audit" / "plan.npz")
    assert int(plan["site"]) == 1 and len(plan["positions"]) == 60 and plan["x"].shape == (60, 64)
    assert sorted(p.name for p in (run_dir / "audit" / "knowledge").iterdir()) == [
        "round_0001.npz", "round_0002.npz"]
    released = np.load(run_dir / "audit" / "knowledge" / "round_0002.npz")
    assert released["knowledge"].shape == (540, 10)
    # the site trained on its non-candidates plus the included candidates only
    from fedkd.config import load_config
    from fedkd.data import load_federation

    config = load_config(run_dir / "config.toml")
    n_train = len(load_federation(config.data, config.seed).clients[1].train)
    trained = {e["num-examples"] for e in read_events(run_dir, "client-train") if e["client"] == 1}
    assert trained == {float(n_train - 60 + plan["included"].sum())}

    capsys.readouterr()
    argv = ["audit", str(run_dir), "--quiet", "--set", "audit.reference-models=2", "--set", "audit.bootstrap=20"]
    assert cli_main(argv) == 0
    assert "Membership inference" in capsys.readouterr().out
    out = run_dir / "audit"
    for name in ("audit.json", "audit.md", "roc.png", "epsilon_bound.png", "audit_scores.npz"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "audit.json").read_text())
    assert result["site"] == 1 and result["candidates"] == 60
    assert result["members"] == int(plan["included"].sum())
    assert result["rounds-released"] == 2 and result["reference-models"] == 2
    for target in ("released-knowledge", "site-model", "global-student"):
        attacks = result["targets"][target]["attacks"]
        assert 0.0 <= attacks["loss"]["auc"] <= 1.0
        assert attacks["loss"]["one-run"]["canaries"] == 60
    assert set(result["targets"]["site-model"]["attacks"]) == {
        "loss", "lira-offline", "lira-online", "rmia", "rmia-online", "trained-rf", "trained-gb"}
    assert set(result["targets"]["global-student"]["attacks"]) == {"loss", "trained-rf", "trained-gb"}
    assert result["targets"]["site-model"]["attacks"]["trained-rf"]["one-run"] is None
    assert result["population"] == len(load_federation(config.data, config.seed).test)
    for target in ("released-knowledge", "site-model", "global-student"):
        best = result["targets"][target]["strongest"]
        assert best["attack"] in result["targets"][target]["attacks"]
        assert best["of"] == len(result["targets"][target]["attacks"])
        low, high = best["tpr_at_1pct_ci_simultaneous"]
        assert low <= best["tpr_at_1pct_ci"][0] and high >= best["tpr_at_1pct_ci"][1]  # wider at 1 - 0.05/k
    assert result["privacy"]["enabled"] is False
    assert "kept no DP student" in result["targets"]["site-student"]["skipped"]  # no DP: one site model

    # audit-time settings only
    assert cli_main(["audit", str(run_dir), "--set", "audit.site=0"]) == 2
    assert "cannot change when auditing a finished run" in capsys.readouterr().err


def test_fedkd_audit_refuses_a_run_recorded_without_auditing(tmp_path, capsys):
    from fedkd.config import Config

    run_dir = tmp_path / "plain"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(Config().to_toml())
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert cli_main(["audit", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "was not recorded with auditing on" in err and "audit.enabled=true" in err
    assert "Traceback" not in err


def test_a_dp_sites_student_is_audited_beside_its_dp_model(tmp_path, capsys):
    """Under DP with a site student (privacy.student, auto for expert), the site keeps two
    models: the DP-trained one whose predictions it releases (site-model) and the public-set
    student it reports (site-student). The audit attacks both; the student has no reference
    models, so LOSS and the trained attacks."""
    settings = {
        "output-dir": str(tmp_path / "runs"), "run-name": "dp", "data.num-clients": 3,
        "num-server-rounds": 2, "global-student.epochs": 1, "privacy.enabled": "true",
        "privacy.target-epsilon": 8, "privacy.student-epochs": 2, "audit.enabled": "true",
        "audit.site": 1, "audit.canaries": 60, "audit.canary-labels": "mislabeled",
    }
    argv = ["simulate"] + [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    assert cli_main(argv) == 0
    run_dir = tmp_path / "runs" / "dp"
    capsys.readouterr()
    argv = ["audit", str(run_dir), "--quiet", "--set", "audit.reference-models=0", "--set", "audit.bootstrap=20"]
    assert cli_main(argv) == 0
    result = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert result["privacy"]["enabled"] is True and result["privacy"]["epsilon"] <= 8.0
    student, model = result["targets"]["site-student"], result["targets"]["site-model"]
    assert "public-set student" in student["threat-model"]
    assert set(student["attacks"]) == {"loss", "trained-rf", "trained-gb"} == set(model["attacks"])
    scores = np.load(run_dir / "audit" / "audit_scores.npz")
    assert not np.allclose(scores["site-student__loss"], scores["site-model__loss"])  # two models
    assert "site-student" in (run_dir / "audit" / "audit.md").read_text()
