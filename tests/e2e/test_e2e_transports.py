"""The federation's one loop over its two transports: Flower's simulation engine
(server/server_app.py's GridTransport) and the in-process one (simulations/floor.py).

The benchmarks use the in-process runner as the speed floor and, because it reproduces the
simulation exactly, to run large grids. This test is what justifies that: same config and
seeds -> the same metrics, fusion weights and privacy ledger, number for number.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkd.reporting import read_events, read_summary


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
def test_the_two_transports_give_the_same_run(tmp_path, monkeypatch, small_run_config):
    """Same config, same seeds: the floor and Flower's simulation engine agree on every
    recorded number (per-site metrics, ALMA, worst, global student, fusion weights, bytes,
    privacy ledger). Equality, not closeness: both run the same code on the same inputs.
    One run covers personalised fusion, an adversary, DP-SGD, the 8-bit wire format, the
    sparse top-k uplink and a per-round sample of sites (``fraction-train``: 3 of 4 sites a
    round, so the Grid transport must learn which node holds which site before round 1)."""
    overrides = {"fusion.method": "knfu", "adversary.clients": "3:flip", "privacy.enabled": True,
                 "privacy.target-epsilon": 4.0, "knowledge.wire-format": "uint8", "shield.top-k": 3,
                 "fraction-train": 0.75, "min-clients": 2}
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    from simulations.floor import run_floor
    from simulations.runner import simulate

    threads = torch.get_num_threads()
    sim_dir = simulate(small_run_config("sim", **overrides))
    floor_dir = run_floor(small_run_config("floor", **overrides))
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
    from fedkd.federation.loop import round_clients

    config = small_run_config("x", **overrides)
    samples = [sorted(round_clients(config, r)) for r in (1, 2)]
    assert samples == [[1, 2, 3], [1, 2, 3]]  # seed 0: site 0 is not drawn in rounds 1-2
    assert [h["accepted"] for h in sim["history"]] == samples
    # evaluated: only the sites that have trained (site 0 still holds its initial model)
    assert sorted({c for _, c, _ in sim_evals}) == [1, 2, 3]
    assert not [e for e in read_events(sim_dir, "client-train") if e["client"] == 0]
    assert flo["privacy"] == sim["privacy"]
