"""Tests for fedkd.reporting: ALMA, run directories, plots and the comparison table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedkd.reporting import (
    RunRecorder,
    alma_summary,
    compare_table,
    plot_run,
    read_events,
    read_summary,
)


def test_alma_summary_known_answer():
    acc = {0: 0.5, 1: 1.0, 2: 0.75}
    examples = {0: 10, 1: 30, 2: 60}
    s = alma_summary(acc, examples)
    assert s["alma"] == pytest.approx(0.75)  # (0.5 + 1 + 0.75) / 3
    assert s["alma-weighted"] == pytest.approx((5 + 30 + 45) / 100)  # 0.8
    assert s["worst"] == 0.5


def test_alma_summary_ignores_nan_clients():
    acc = {0: 0.5, 1: float("nan"), 2: 1.0}
    examples = {0: 10, 1: 1000, 2: 30}
    s = alma_summary(acc, examples)
    assert s["alma"] == pytest.approx(0.75)
    assert s["alma-weighted"] == pytest.approx((5 + 30) / 40)
    assert s["worst"] == 0.5


def test_alma_summary_all_nan_or_empty():
    for acc in ({}, {0: float("nan")}):
        s = alma_summary(acc, {0: 5})
        assert set(s) == {"alma", "alma-weighted", "worst"}
        assert all(math.isnan(v) for v in s.values())


def test_alma_summary_zero_examples_weighted_is_nan():
    s = alma_summary({0: 0.4, 1: 0.6}, {})
    assert s["alma"] == pytest.approx(0.5)
    assert math.isnan(s["alma-weighted"])


def _make_run(run_dir, method="knfu", rounds=3, clients=3, final_alma=0.8):
    recorder = RunRecorder(run_dir, 'seed = 0\n[fusion]\nmethod = "%s"\n' % method)
    rng = np.random.default_rng(0)
    for r in range(1, rounds + 1):
        w = rng.dirichlet(np.ones(clients), size=clients)
        recorder.save_weights(r, range(clients), w)
        for c in range(clients):
            recorder.record("client-eval", round=r, client=c, accuracy=np.float64(0.5 + 0.1 * c),
                            **{"num-examples": np.int64(20)})
        recorder.record("round", round=r, alma=0.5 + 0.1 * r, worst=0.4, **{"global-accuracy": 0.6})
    summary = {
        "method": method,
        "rounds-completed": rounds,
        "final": {"alma": final_alma, "worst": 0.55, "global-accuracy": None},
        "bytes": {"total-per-client-round": 12345.0},
    }
    path = recorder.finish(summary)
    return path, w


def test_run_recorder_and_plots_write_every_file(tmp_path):
    run_dir = tmp_path / "run-a"
    path, last_w = _make_run(run_dir)
    assert path == run_dir / "summary.json"
    for name in ("config.toml", "metrics.jsonl", "summary.json", "alma.png",
                 "client_accuracy.png", "weights_heatmap.png"):
        f = run_dir / name
        assert f.is_file() and f.stat().st_size > 0, name
    for name in ("alma.png", "client_accuracy.png", "weights_heatmap.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # weights: one npz per round, with the matrix and the client ids
    files = sorted(p.name for p in (run_dir / "weights").iterdir())
    assert files == ["round_0001.npz", "round_0002.npz", "round_0003.npz"]
    last = np.load(run_dir / "weights" / "round_0003.npz")
    np.testing.assert_array_equal(last["weights"], last_w)
    np.testing.assert_array_equal(last["clients"], [0, 1, 2])
    # metrics: one JSON object per line, numpy scalars serialised as numbers
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 4
    events = [json.loads(line) for line in lines]
    assert events[0] == {"event": "client-eval", "round": 1, "client": 0, "accuracy": 0.5, "num-examples": 20}
    assert len(read_events(run_dir, "round")) == 3
    assert read_events(run_dir, "round")[-1]["alma"] == pytest.approx(0.8)
    assert read_summary(run_dir)["final"]["alma"] == 0.8


def test_plot_run_on_hand_made_run_dir(tmp_path):
    run_dir = tmp_path / "hand"
    (run_dir / "weights").mkdir(parents=True)
    events = [
        {"event": "client-eval", "round": 1, "client": 0, "accuracy": 0.5},
        {"event": "client-eval", "round": 1, "client": 1, "accuracy": 0.7},
        {"event": "round", "round": 1, "alma": 0.6, "worst": 0.5},
        {"event": "round", "round": 2},  # a round without evaluation
    ]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    np.savez(run_dir / "weights" / "round_0001.npz", weights=np.eye(2), clients=np.array([4, 7]))
    written = plot_run(run_dir)
    assert sorted(p.name for p in written) == ["alma.png", "client_accuracy.png", "weights_heatmap.png"]
    for p in written:
        assert p.is_file() and p.stat().st_size > 0


def test_plot_run_without_weights_skips_heatmap(tmp_path):
    run_dir = tmp_path / "none-method"
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("")
    written = plot_run(run_dir)
    assert sorted(p.name for p in written) == ["alma.png", "client_accuracy.png"]


def _write_summary(run_dir, method, alma):
    run_dir.mkdir(parents=True)
    summary = {
        "method": method,
        "rounds-completed": 3,
        "final": {"alma": alma, "worst": 0.55, "global-accuracy": None},
        "bytes": {"total-per-client-round": 12345.0},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_compare_table_lists_each_run(tmp_path):
    _write_summary(tmp_path / "run-mean", "mean", 0.8125)
    _write_summary(tmp_path / "run-knfu", "knfu", 0.9)
    table = compare_table([tmp_path / "run-mean", tmp_path / "run-knfu"])
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, two runs
    assert lines[0].split()[:2] == ["run", "method"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    mean_row, knfu_row = lines[2].split(), lines[3].split()
    assert mean_row[:5] == ["run-mean", "mean", "3", "0.812", "0.550"]
    assert knfu_row[:5] == ["run-knfu", "knfu", "3", "0.900", "0.550"]
    assert mean_row[5] == "-"  # no global student
    assert mean_row[6] == "-"  # no DP ledger
    assert mean_row[7] == "12,345"


def test_compare_table_unfinished_run_is_a_clear_error(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="not a finished fedkd run"):
        compare_table([tmp_path / "half"])


def test_plots_skip_the_heatmap_of_uninformative_weights_and_a_study_has_one_picture(tmp_path):
    from fedkd.reporting import plot_study

    runs = []
    for method in ("mean", "knfu"):
        run_dir = tmp_path / "study" / method
        (run_dir / "weights").mkdir(parents=True)
        (run_dir / "config.toml").write_text(f'[fusion]\nmethod = "{method}"\n')
        events = [{"event": "client-eval", "round": 1, "client": 0, "accuracy": 0.5},
                  {"event": "excluded", "round": 1, "client": 1, "node": 1, "reason": "site failed: x"},
                  {"event": "round", "round": 1, "alma": 0.5, "worst": 0.5}]
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
        np.savez(run_dir / "weights" / "round_0001.npz", weights=np.full((2, 2), 0.5), clients=np.array([0, 1]))
        runs.append(run_dir)
    assert [p.name for p in plot_run(runs[0])] == ["alma.png", "client_accuracy.png"]  # mean: no heatmap
    assert "weights_heatmap.png" in [p.name for p in plot_run(runs[1])]
    assert plot_study(runs, out_dir=tmp_path / "study").stat().st_size > 0


def test_compare_accepts_a_study_folder_and_skips_other_files(tmp_path):
    from fedkd.reporting import find_runs

    _write_summary(tmp_path / "study" / "b", "mean", 0.5)
    _write_summary(tmp_path / "study" / "a", "knfu", 0.9)
    (tmp_path / "study" / "comparison.txt").write_text("old table\n")
    assert [p.name for p in find_runs([tmp_path / "study"])] == ["a", "b"]
    assert [p.name for p in find_runs(sorted((tmp_path / "study").iterdir()))] == ["a", "b"]  # the glob
    md = compare_table(find_runs([tmp_path / "study"]), format="md").splitlines()
    assert md[0].startswith("| run | method |") and md[2].startswith("| a | knfu | 3 | 0.900 |")


def test_compare_table_of_a_release_only_run(tmp_path):
    """A label-rr run without DP-SGD: its ledger rows carry release-epsilon but no
    epsilon-spent; the table shows no DP epsilon instead of failing (KeyError before)."""
    _write_summary(tmp_path / "rr", "expert", 0.755)
    summary = json.loads((tmp_path / "rr" / "summary.json").read_text())
    summary["privacy"] = {"ledger": {"0": {"release": "label-rr", "release-epsilon": 4.0}}}
    (tmp_path / "rr" / "summary.json").write_text(json.dumps(summary))
    assert compare_table([tmp_path / "rr"]).splitlines()[2].split()[6] == "-"
