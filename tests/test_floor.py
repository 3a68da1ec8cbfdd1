"""The floor runner (simulations/floor.py) against Flower's simulation engine, and FedAvg.

The floor calls fedkd's pure functions in one process; the benchmarks use it as the speed
floor and, because it reproduces the simulation exactly, to run large grids. The e2e test
here is what justifies that: same config and seeds -> the same metrics, fusion weights
and privacy ledger, number for number.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkd.config import load_config
from fedkd.fedavg import average_weights, parameter_count, weight_bytes
from fedkd.models import build_model
from fedkd.reporting import read_events, read_summary


def test_average_weights_is_example_weighted_mean():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([0.0], dtype=np.float32)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32), "b": np.array([4.0], dtype=np.float32)}
    out = average_weights([a, b], num_examples=[1, 3])  # (1*a + 3*b) / 4
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    np.testing.assert_allclose(out["b"], [3.0])
    assert out["w"].dtype == np.float32


def test_average_weights_of_identical_states_is_that_state():
    rng = np.random.default_rng(0)
    state = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
    out = average_weights([state, state, state], num_examples=[5, 1, 7])
    np.testing.assert_allclose(out["w"], state["w"], rtol=1e-6)


def test_average_weights_refuses_mismatches():
    a = {"w": np.zeros(2)}
    with pytest.raises(ValueError, match="shape"):
        average_weights([a, {"w": np.zeros(3)}], num_examples=[1, 1])
    with pytest.raises(ValueError, match="keys"):
        average_weights([a, {"v": np.zeros(2)}], num_examples=[1, 1])
    with pytest.raises(ValueError, match="not all 0"):
        average_weights([a, a], num_examples=[0, 0])


def test_parameter_count_known_answers():
    # mlp-small on digits: 64*32 + 32 + 32*10 + 10 = 2,410 parameters
    model = build_model("mlp-small", input_shape=(64,), num_classes=10, seed=0)
    assert parameter_count(model) == 2410
    assert weight_bytes(model) == 2410 * 4
    # mlp-large: 64*256 + 256 + 256*128 + 128 + 128*10 + 10 = 50,826
    assert parameter_count(build_model("mlp-large", input_shape=(64,), num_classes=10)) == 50826


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


def _comparable(run_dir):
    summary = read_summary(run_dir)
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in summary["history"]]
    trains = sorted(
        ((e["round"], e["client"]), {k: v for k, v in e.items() if k != "event"})
        for e in read_events(run_dir, "client-train")
    )
    evals = sorted((e["round"], e["client"], e["accuracy"]) for e in read_events(run_dir, "client-eval"))
    weights = {p.name: np.load(p)["weights"] for p in sorted((run_dir / "weights").glob("*.npz"))}
    return summary, history, trains, evals, weights


@pytest.mark.e2e
def test_floor_reproduces_the_simulation_exactly(tmp_path, monkeypatch):
    """Same config, same seeds: the floor and Flower's simulation engine agree on every
    recorded number (per-site metrics, ALMA, worst, global student, fusion weights, bytes,
    privacy ledger). Equality, not closeness: both run the same code on the same inputs.
    One run covers personalised fusion, an adversary, DP-SGD, the 8-bit wire format and
    the sparse top-k uplink."""
    overrides = {"fusion.method": "knfu", "adversary.clients": "3:flip", "privacy.enabled": True,
                 "privacy.target-epsilon": 4.0, "knowledge.wire-format": "uint8", "shield.top-k": 3}
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    from simulations.floor import run_floor
    from simulations.runner import simulate

    threads = torch.get_num_threads()
    sim_dir = simulate(_floor_config(tmp_path, "sim", **overrides))
    floor_dir = run_floor(_floor_config(tmp_path, "floor", **overrides))
    assert torch.get_num_threads() == threads  # the floor restores the caller's setting

    sim, sim_history, sim_trains, sim_evals, sim_weights = _comparable(sim_dir)
    flo, flo_history, flo_trains, flo_evals, flo_weights = _comparable(floor_dir)
    assert flo_history == sim_history
    assert flo["final"] == sim["final"]
    assert flo_evals == sim_evals
    assert [k for k, _ in flo_trains] == [k for k, _ in sim_trains]
    for (_, a), (_, b) in zip(flo_trains, sim_trains, strict=True):
        assert a == b
    assert flo_weights.keys() == sim_weights.keys()
    for name in sim_weights:
        np.testing.assert_array_equal(flo_weights[name], sim_weights[name])
    assert flo["bytes"] == sim["bytes"]
    # top-3 of 10 classes in uint8: 3 class bytes + 3 values + the rest = 7 bytes a row
    assert sim["bytes"]["uplink-per-client-round"] == 540 * 7
    assert sim["history"][-1]["accepted"] == [0, 1, 2, 3]
    assert flo["privacy"] == sim["privacy"]
