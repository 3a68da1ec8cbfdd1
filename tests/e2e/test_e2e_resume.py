"""`fedkd simulate --resume` through Flower's simulation engine: a run stopped after round 1
and resumed ends exactly where an uninterrupted run ends (the deployment-engine version of
this check is in test_e2e_deployment.py)."""

from __future__ import annotations

import pytest

from fedkd.cli import main as cli_main
from fedkd.reporting import read_events, read_summary

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _flower_env(flower_env):
    """Every test here runs Flower (tests/conftest.py)."""


def test_simulate_resume_ends_in_the_same_state_as_an_uninterrupted_run(tmp_path, capsys):
    common = ["--set", f"output-dir={tmp_path / 'runs'}", "--set", "data.num-clients=3",
              "--set", "train.local-epochs=1", "--set", "train.distill-epochs=1",
              "--set", "global-student.epochs=1", "--set", "knowledge.public-subset=100"]
    assert cli_main(["simulate", *common, "--set", "run-name=full", "--set", "num-server-rounds=2"]) == 0
    assert cli_main(["simulate", *common, "--set", "run-name=part", "--set", "num-server-rounds=1"]) == 0
    assert cli_main(["simulate", *common, "--set", "run-name=part", "--set", "num-server-rounds=2",
                     "--resume"]) == 0

    full, part = read_summary(tmp_path / "runs" / "full"), read_summary(tmp_path / "runs" / "part")
    assert part["resumed-from"] == [1] and full["resumed-from"] == []
    assert part["final"] == full["final"]  # exactly
    strip = lambda history: [{k: v for k, v in e.items() if k != "seconds"} for e in history]  # noqa: E731
    assert strip(part["history"]) == strip(full["history"])
    # simulated sites kept their state in the run directory, and reloaded it in round 2
    assert (tmp_path / "runs" / "part" / "site-state" / "part" / "site-0" / "round-0002.npz").is_file()
    trained = {e["client"]: e["rounds-trained"] for e in read_events(tmp_path / "runs" / "part", "client-train")
               if e["round"] == 2}
    assert trained == {0: 2, 1: 2, 2: 2}

    assert cli_main(["simulate", *common, "--set", "run-name=part", "--set", "seed=1", "--resume"]) == 2
    assert "seed: the stopped run had 0, this one has 1" in capsys.readouterr().err
