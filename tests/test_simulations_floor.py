"""simulations/floor.py: the in-process runner and FedAvg (no Flower). The in-process
transport against Flower's is tests/e2e/test_e2e_transports.py."""

from __future__ import annotations

import pytest

from fedkd.config import load_config
from fedkd.reporting import read_summary


def _floor_config(tmp_path, name, **overrides):
    base = {
        "output-dir": str(tmp_path / "runs"),
        "run-name": name,
        "data.num-clients": 4,
        "num-server-rounds": 2,
        "train.local-epochs": 2,
        "train.distill-epochs": 2,
        "global-student.epochs": 2,
    }
    return load_config(overrides={**base, **overrides})


def test_fedavg_runner_runs_and_reports(tmp_path):
    from simulations.floor import run_fedavg

    config = _floor_config(tmp_path, "fedavg", **{"model.architectures": "mlp-small"})
    summary = read_summary(run_fedavg(config))
    assert summary["method"] == "fedavg"
    assert summary["bytes"]["uplink-per-client-round"] == 2410 * 4
    assert 0.0 <= summary["final"]["worst"] <= summary["final"]["alma"] <= 1.0
    with pytest.raises(ValueError, match="one architecture"):
        run_fedavg(_floor_config(tmp_path, "mixed"))
