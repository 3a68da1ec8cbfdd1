"""fedkd/plugins.py and what uses it: models, datasets and fusion rules named by import
path; refusals before the run (an unimportable plugin, a model that cannot read the data),
a site that fails the same way twice stopping the run, and the Python API's in-process run.
The example plugin package is examples/fedkd_plugins (its engine run: tests/e2e/test_e2e_api.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedkd
from fedkd.config import ConfigError, load_config
from fedkd.fusion import fuse
from fedkd.plugins import PluginError, is_plugin_path, load_plugin, plugin_search_path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_import_paths_are_told_from_names():
    assert is_plugin_path("a.b:C") and is_plugin_path("pkg:f")
    assert not any(map(is_plugin_path, ["mlp-small", "hf:/models/x", "a.b", "a:b:c", ""]))


def test_an_unimportable_plugin_is_refused_by_the_config_in_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"model.architectures": "mlp-small,nopkg.nets:Net",
                               "fusion.method": "math:no_such_rule"})
    assert err.value.problems == [
        "model.architectures: model plugin 'nopkg.nets:Net' cannot be imported: "
        "ModuleNotFoundError: No module named 'nopkg'",
        "fusion.method: fusion plugin 'math:no_such_rule': module 'math' has no attribute 'no_such_rule'",
    ]
    with pytest.raises(PluginError, match="is a float, not a callable"):
        load_plugin("math:pi", kind="model")


def test_the_example_plugins_load_and_their_folder_is_exported(examples_on_path):
    config = load_config(overrides={"model.architectures": "fedkd_plugins.nets:TinyNet",
                                    "fusion.method": "fedkd_plugins.fusion:median_rule",
                                    "global-student.model": "fedkd_plugins.nets:TinyNet"})
    assert config.architecture_for(1) == "fedkd_plugins.nets:TinyNet"
    assert plugin_search_path(["fedkd_plugins.nets:TinyNet", "mlp-small"]) == [str(EXAMPLES)]


def test_a_fusion_plugin_result_is_checked(examples_on_path):
    knowledge = np.array([[[0.9, 0.1]], [[0.8, 0.2]], [[0.1, 0.9]]])
    result = fuse(knowledge=knowledge, method="fedkd_plugins.fusion:median_rule")
    assert np.allclose(result.fused[0, 0], [0.8, 0.2])  # median of each class, rows sum to 1
    assert np.allclose(result.weights, 1 / 3)
    with pytest.raises(PluginError, match="must return a FusionResult or \\(fused, weights\\)"):
        fuse(knowledge=knowledge, method="numpy:add")  # returns an array


def test_a_dataset_plugin_feeds_the_federation(examples_on_path):
    from fedkd.data import load_federation, split_cache_path

    config = load_config(overrides={"data.dataset": "fedkd_plugins.data:load_breast_cancer",
                                    "data.num-clients": 3, "data.partitioner": "iid"})
    split = load_federation(config.data, 0)
    assert split.input_shape == (30,) and split.num_classes == 2
    assert split_cache_path(config.data, 0) is None


def test_a_model_that_cannot_read_the_data_is_refused_before_the_run(small_run_config, tmp_path):
    """cnn-small (site 2's turn) on 13 tabular features: one line naming the site and the cause,
    and no run directory."""
    from sklearn.datasets import load_wine

    wine = load_wine()
    np.savez(tmp_path / "wine.npz", x=wine.data, y=wine.target)
    config = small_run_config("wine", **{"data.dataset": "file", "data.path": str(tmp_path / "wine.npz"),
                                         "data.num-clients": 3})
    with pytest.raises(ConfigError) as err:
        fedkd.simulate(config, runner="inprocess")
    assert err.value.problems == [
        "site 2's model 'cnn-small' cannot read the data (inputs [13], 3 classes): ValueError: "
        "cnn-small needs square images; got a flat input of 13 features"]
    assert not (Path(config.output_dir) / "wine").exists()


def test_a_site_failing_the_same_way_twice_stops_the_run(small_run_config, examples_on_path, tmp_path):
    """A model plugin that reads the data (the preflight passes) but fails in training: the
    run stops in round 2 with one line naming the site and the cause; status is not completed,
    so `fedkd simulate` exits 1 (exit_status)."""
    from fedkd.cli.main import exit_status

    module = tmp_path / "failing_net.py"
    module.write_text(
        "from torch import nn\n"
        "class Net(nn.Linear):\n"
        "    def __init__(self, *, input_shape, num_classes):\n"
        "        super().__init__(input_shape[0], num_classes)\n"
        "    def forward(self, x):\n"
        "        if self.training:\n"
        "            raise RuntimeError('no training today')\n"
        "        return super().forward(x)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        config = small_run_config("fails", **{"model.architectures": "mlp-small,failing_net:Net"})
        result = fedkd.simulate(config, runner="inprocess")
    finally:
        sys.path.remove(str(tmp_path))
    assert result.status == ("stopped in round 2: site 1 failed twice the same way: "
                             "RuntimeError: no training today")
    assert not result.completed and result.summary["rounds-completed"] == 1
    dropouts = result.summary["dropouts"]
    assert [d["client"] for d in dropouts] == [1, 3, 1] or {d["client"] for d in dropouts} == {1, 3}
    assert all("\n" not in d["reason"] and "\x1b" not in d["reason"] for d in dropouts)
    assert exit_status([result.run_dir]) == 1


def test_python_api_inprocess_run_and_compare(small_run_config):
    result = fedkd.simulate(small_run_config("api", **{"data.num-clients": 3}), runner="inprocess")
    assert result.completed and result.run_dir.name == "api"
    assert [h["round"] for h in result.history] == [1, 2]
    assert result.metrics["alma"] == result.history[-1]["alma"]
    rows = json.loads(fedkd.compare(result.run_dir.parent, format="json"))
    assert [(r["run"], r["status"], r["sites-responding"]) for r in rows] == [("api", "completed", 3)]
    assert rows[0]["alma-prior"] == result.metrics["alma-prior"]
    assert fedkd.compare([result.run_dir], format="csv").splitlines()[0].startswith("run,method,rounds,ALMA")
    with pytest.raises(ConfigError, match="runner: must be one of flower, inprocess; got 'ray'"):
        fedkd.simulate(small_run_config("x"), runner="ray")


def test_importing_fedkd_imports_no_flower():
    code = "import sys, fedkd; print(fedkd.__version__, 'flwr' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"] and out[0].count(".") >= 1
