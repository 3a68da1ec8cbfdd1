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
    assert 0.0 <= attacked["honest-alma"] <= 1.0
    assert (out / "robustness.png").is_file()
