"""The Python API and plugins through Flower's real simulation engine (Ray workers import the
plugins themselves), and a SuperNode count that differs from data.num-clients refused."""

from __future__ import annotations

from pathlib import Path

import pytest

import fedkd
from fedkd.config import load_config

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def _flower_env(flower_env):
    """Every test here runs Flower (tests/conftest.py)."""


def _config(tmp_path, name, **overrides):
    base = {"output-dir": str(tmp_path / "runs"), "run-name": name, "data.num-clients": 3,
            "num-server-rounds": 2, "train.local-epochs": 1, "train.distill-epochs": 1,
            "global-student.epochs": 1}
    return load_config(overrides={**base, **overrides})


def test_plugin_model_and_fusion_rule_run_through_the_engine(tmp_path, monkeypatch):
    """Only the driver has examples/ on sys.path; the runner exports the plugins' folder in
    PYTHONPATH so that every Ray worker imports them. Same numbers as the in-process runner."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", str(Path(fedkd.__file__).resolve().parents[1]))  # fedkd, not examples/
    plugins = {"model.architectures": "fedkd_plugins.nets:TinyNet,mlp-small",
               "fusion.method": "fedkd_plugins.fusion:median_rule"}
    engine = fedkd.simulate(_config(tmp_path, "engine", **plugins), runner="flower")
    assert engine.completed, engine.status
    assert engine.summary["method"] == "fedkd_plugins.fusion:median_rule"
    assert [len(h["accepted"]) for h in engine.history] == [3, 3] and engine.summary["dropouts"] == []
    local = fedkd.simulate(_config(tmp_path, "local", **plugins), runner="inprocess")
    assert local.metrics == engine.metrics
    assert local.summary["bytes"] == engine.summary["bytes"]


def test_a_supernode_count_that_differs_from_num_clients_is_refused(tmp_path):
    from fedkd.engine import launch_simulation
    from fedkd.reporting import read_summary

    from fedkd.federation.loop import RoundFailed

    config = _config(tmp_path, "count", **{"num-server-rounds": 1})
    line = ("4 SuperNodes connected but data.num-clients is 3: start 3 "
            "(flwr run . --federation-config \"num-supernodes=3\"), or set data.num-clients=4")
    with pytest.raises(RoundFailed) as err:
        launch_simulation(config, num_supernodes=4)
    assert str(err.value) == line  # the CLI prints it as one `fedkd: error:` line, exit 2
    summary = read_summary(Path(config.output_dir) / "count")
    assert summary["status"] == f"failed: {line}" and summary["rounds-completed"] == 0
