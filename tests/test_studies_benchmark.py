"""Tests for the benchmark harness (simulations/studies/benchmark.py, issue 7) on tiny grids.

The studies run real federations through the floor runner (tests/e2e/test_e2e_transports.py checks it
against Flower's simulation engine); these tests check what the harness adds: grid
points, resuming, the statistics of the tables and the adversaries' weight.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedkd.reporting import read_summary
from simulations.studies.benchmark import main

TINY = ["--set", "data.num-clients=3", "--set", "train.local-epochs=1", "--set", "train.distill-epochs=1",
        "--set", "global-student.enabled=false", "--rounds", "1"]


def test_accuracy_grid_runs_resumes_and_reports_mean_and_std(tmp_path, capsys):
    out = tmp_path / "accuracy"
    argv = ["accuracy", "--out", str(out), "--dp", "off", "--seeds", "0,1", "--alphas", "1",
            "--methods", "knfu", *TINY]
    assert main(argv) == 0
    runs = {s: out / "nodp" / "knfu" / "alpha-1" / f"seed-{s}" for s in (0, 1)}
    values = [read_summary(runs[s])["final"]["alma"] for s in (0, 1)]
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert rows["knfu"]["seeds"] == 2
    assert rows["knfu"]["alma"] == pytest.approx(np.mean(values))
    assert rows["knfu"]["alma-std"] == pytest.approx(np.std(values, ddof=1))
    assert rows["knfu"]["label"] == "knfu (agreement, hellinger)"  # from the run's own config
    table = (out / "table.md").read_text()
    assert "knfu (agreement, hellinger)" in table and "±" in table
    assert (out / "accuracy.png").is_file()
    # the shared-test view: each run's alma-prior, their mean in the second table
    priors = [read_summary(runs[s])["final"]["alma-prior"] for s in (0, 1)]
    assert all(0.0 <= p <= 1.0 for p in priors)
    assert rows["knfu"]["alma-prior"] == pytest.approx(np.mean(priors))
    assert "(`alma-prior`" in table and f"{np.mean(priors):.3f} ± {np.std(priors, ddof=1):.3f}" in table

    # a second call runs nothing: finished grid points are skipped, not redone
    stamps = {key: (run / "summary.json").stat().st_mtime_ns for key, run in runs.items()}
    capsys.readouterr()
    assert main(argv) == 0
    assert "2 finished, 0 to run" in capsys.readouterr().err
    assert stamps == {key: (run / "summary.json").stat().st_mtime_ns for key, run in runs.items()}


def test_robustness_reports_the_adversaries_weight(tmp_path):
    out = tmp_path / "robustness"
    argv = ["robustness", "--out", str(out), "--methods", "mean", "--fractions", "0.34",
            "--kinds", "random", *TINY, "--rounds", "2"]
    assert main(argv) == 0
    rows = {r["setting"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {"clean", "random-0.34"}
    attacked = rows["random-0.34"]
    assert attacked["adversaries"] == 1
    # mean gives every sender 1/N of every row, the one adversary included
    assert attacked["adversary-weight"] == pytest.approx(1 / 3)
    assert attacked["adversary-weight-max"] == pytest.approx(1 / 3)
    # mean sends no consensus, and its sites distil F_i: the chosen target's share is F_i's
    assert np.isnan(attacked["adversary-consensus-weight"])
    assert attacked["adversary-chosen-weight"] == pytest.approx(1 / 3)
    assert 0.0 <= attacked["honest-alma"] <= 1.0
    assert (out / "robustness.png").is_file()


def _weights_file(run_dir, round_number, clients, weights, consensus=None):  # noqa: ANN001, ANN202
    (run_dir / "weights").mkdir(parents=True, exist_ok=True)
    extra = {} if consensus is None else {"consensus_weights": np.asarray(consensus)}
    np.savez(run_dir / "weights" / f"round_{round_number:04d}.npz", weights=np.asarray(weights),
             clients=np.asarray(clients), **extra)


def test_adversary_weight_counts_the_target_each_site_chose(tmp_path):
    """Hand-built run: 3 sites, site 2 the adversary, 2 rounds. F_i shares of site 2 in the
    honest rows: round 1 (0.2, 0.4), round 2 (0.1, 0.3); G_i shares: round 1 (0.5, 0.6), round 2
    (0.0, 0.2). In round 2 site 0 chose the 0.5 blend of round 1's F_0 and site 1 the
    consensus: the chosen shares are 0.5 * 0.2 and 0.6 (round 2's fusion is distilled by nobody)."""
    from simulations.studies.benchmark import adversary_weight

    run = tmp_path / "run"
    _weights_file(run, 1, [0, 1, 2], [[0.8, 0.0, 0.2], [0.0, 0.6, 0.4], [0.0, 0.0, 1.0]],
                  [[0.5, 0.0, 0.5], [0.2, 0.2, 0.6], [0.0, 0.0, 1.0]])
    _weights_file(run, 2, [0, 1, 2], [[0.9, 0.0, 0.1], [0.0, 0.7, 0.3], [0.0, 0.0, 1.0]],
                  [[1.0, 0.0, 0.0], [0.4, 0.4, 0.2], [0.0, 0.0, 1.0]])
    events = [{"event": "client-train", "round": 2, "client": 0, "target-lambda": 0.5},
              {"event": "client-train", "round": 2, "client": 1, "target-lambda": -1.0},
              {"event": "client-train", "round": 2, "client": 2, "target-lambda": 1.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    w = adversary_weight(run, {2})
    assert w["fused"] == pytest.approx((0.2 + 0.4 + 0.1 + 0.3) / 4) and w["fused-max"] == pytest.approx(0.4)
    assert w["consensus"] == pytest.approx((0.5 + 0.6 + 0.0 + 0.2) / 4) and w["consensus-max"] == pytest.approx(0.6)
    assert w["chosen"] == pytest.approx((0.5 * 0.2 + 0.6) / 2) and w["chosen-max"] == pytest.approx(0.6)
