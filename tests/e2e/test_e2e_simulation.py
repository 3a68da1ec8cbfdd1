"""End-to-end runs through Flower's real simulation engine (Ray backend).

Each run starts the engine, so these are the slow tests (~30 s each on 2 cores).
"""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest

from fedkd.cli import main as cli_main
from fedkd.config import build_config, load_config
from fedkd.reporting import read_events, read_summary

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _flower_env(flower_env):
    """Every test here runs Flower (tests/conftest.py)."""


def _simulate(tmp_path, **overrides):
    from simulations.runner import simulate

    base = {
        "output-dir": str(tmp_path / "runs"),
        "run-name": "e2e",
        "data.num-clients": 3,
        "num-server-rounds": 2,
        "train.local-epochs": 2,
        "train.distill-epochs": 2,
        "global-student.epochs": 2,
    }
    config = load_config(overrides={**base, **overrides})
    return config, simulate(config)


def test_three_sites_two_rounds_write_a_complete_run_directory(tmp_path):
    config, run_dir = _simulate(tmp_path)

    # resolved config, re-readable
    assert build_config(tomllib.loads((run_dir / "config.toml").read_text())) == config

    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    assert summary["rounds-completed"] == 2
    assert summary["method"] == "expert"  # the default method
    final = summary["final"]
    for key in ("alma", "alma-weighted", "worst", "global-accuracy", "alma-prior"):  # alma-prior: through Flower too
        assert 0.0 <= final[key] <= 1.0
    assert final["worst"] <= final["alma"]
    # knowledge is 540 x 10 float16 = 10,800 bytes up; down, round 2 sends F_i and the
    # consensus G (the default expert method), round 1 nothing
    assert summary["bytes"]["uplink-per-client-round"] == 540 * 10 * 2
    assert summary["bytes"]["downlink-per-client-round"] == 2 * 540 * 10 * 2 / 2

    trains = read_events(run_dir, "client-train")
    assert sorted((e["round"], e["client"]) for e in trains) == [
        (r, c) for r in (1, 2) for c in range(3)
    ]
    # the model survives across rounds in the client's persistent state
    assert {e["rounds-trained"] for e in trains if e["round"] == 2} == {2}
    # round 2: every site chose its target on validation (expert's default); round 1: no F_i yet
    assert all("target-lambda" in e and "val-nll" in e for e in trains if e["round"] == 2)
    assert not any("target-lambda" in e or "distil-loss" in e for e in trains if e["round"] == 1)

    evals = read_events(run_dir, "client-eval")
    assert sorted((e["round"], e["client"]) for e in evals) == [(r, c) for r in (1, 2) for c in range(3)]
    rounds = read_events(run_dir, "round")
    last = rounds[-1]
    accs = [e["accuracy"] for e in evals if e["round"] == 2]
    assert last["alma"] == pytest.approx(np.mean(accs))
    assert last["worst"] == pytest.approx(min(accs))

    for r in (1, 2):
        w = np.load(run_dir / "weights" / f"round_{r:04d}.npz")
        assert w["weights"].shape == (3, 3)
        np.testing.assert_allclose(w["weights"].sum(axis=1), 1.0)
        assert list(w["clients"]) == [0, 1, 2]
    for png in ("alma.png", "client_accuracy.png", "weights_heatmap.png"):
        assert (run_dir / png).stat().st_size > 1000
    assert not read_events(run_dir, "excluded")


def test_bad_payloads_exclude_their_sites_and_the_rounds_complete(tmp_path):
    bad = {1: "nan", 2: "wrong-shape", 3: "negative", 4: "extra-key"}
    _, run_dir = _simulate(
        tmp_path,
        **{
            "data.num-clients": 6,
            "adversary.clients": ",".join(f"{c}:{k}" for c, k in bad.items()),
            "global-student.enabled": False,
            "knowledge.public-subset": 100,
        },
    )
    summary = read_summary(run_dir)
    assert summary["bytes"]["uplink-per-client-round"] == 100 * 10 * 2
    assert summary["status"] == "completed"
    assert summary["rounds-completed"] == 2
    for entry in summary["history"]:
        assert entry["accepted"] == [0, 5]  # honest sites only, every round

    excluded = read_events(run_dir, "excluded")
    assert sorted((e["round"], e["client"]) for e in excluded) == [
        (r, c) for r in (1, 2) for c in sorted(bad)
    ]
    expected = {"nan": "non-finite", "wrong-shape": "shape (100, 10)", "negative": "negative",
                "extra-key": "exactly ['knowledge']"}
    for e in excluded:
        assert expected[bad[e["client"]]] in e["reason"], e


def test_cli_simulate_prints_the_table(tmp_path, capsys):
    code = cli_main(
        [
            "simulate",
            "--set", f"output-dir={tmp_path / 'cli-runs'}",
            "--set", "run-name=cli",
            "--set", "data.num-clients=3",
            "--set", "num-server-rounds=1",
            "--set", "fusion.method=era",
            "--set", "global-student.enabled=false",
            "--set", "knowledge.wire-format=uint8",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "era" in out and "ALMA" in out
    summary = json.loads((tmp_path / "cli-runs" / "cli" / "summary.json").read_text())
    assert summary["method"] == "era"
    # 8-bit wire format: one byte a probability, and the server accepted every uint8 reply
    assert summary["bytes"]["uplink-per-client-round"] == 540 * 10
    assert summary["history"][-1]["accepted"] == [0, 1, 2]


def test_dp_sites_accumulate_epsilon_within_target(tmp_path):
    _, run_dir = _simulate(
        tmp_path,
        **{"privacy.enabled": True, "privacy.target-epsilon": 2.0, "num-server-rounds": 3,
           "global-student.enabled": False},
    )
    trains = read_events(run_dir, "client-train")
    for client in range(3):
        eps = [e["epsilon"] for e in sorted(trains, key=lambda e: e["round"]) if e["client"] == client]
        assert len(eps) == 3
        assert eps[0] < eps[1] < eps[2] <= 2.0  # accumulates over the run, never past the target
    ledger = read_summary(run_dir)["privacy"]["ledger"]
    assert sorted(ledger) == ["0", "1", "2"]
    for entry in ledger.values():
        assert entry["steps"] == entry["planned-steps"]
        assert entry["noise-multiplier"] > 0 and entry["accountant"] == "prv" and entry["certified-by"] in ("prv", "rdp") and entry["delta"] <= 1e-5
        assert not entry["stopped"]
    assert (run_dir / "epsilon.png").stat().st_size > 1000


def test_unreachable_privacy_target_is_refused_before_the_run(tmp_path, capsys):
    code = cli_main(
        [
            "simulate",
            "--set", f"output-dir={tmp_path / 'never'}",
            "--set", "data.num-clients=2",
            "--set", "privacy.enabled=true",
            "--set", "privacy.target-epsilon=0.001",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "fedkd: error: privacy (site 0" in err and "unreachable" in err
    assert not (tmp_path / "never").exists()


RAY_PROBE = """
import json, os, subprocess, sys
from simulations.runner import RAY_INIT_ARGS, ray_token_auth
assert ray_token_auth()
import ray
gcs = ray.init(num_cpus=1, **RAY_INIT_ARGS).address_info["gcs_address"]
join = "import ray; ray.init(address=%r); print('JOINED')" % gcs
outsider = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
children = [subprocess.Popen([sys.executable, "-c", join], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for env in (outsider, dict(os.environ))]
results = [(c.wait(timeout=120), "JOINED" in c.communicate()[0]) for c in children]
listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
print(json.dumps({"gcs": gcs, "outsider": results[0], "with-token": results[1],
                  "listening": [l.split()[3] for l in listening if "pid=%d," % os.getpid() in l]}))
ray.shutdown()
"""


def test_the_simulations_ray_cluster_refuses_a_process_without_its_token(tmp_path):
    """What ``fedkd simulate`` gives ray.init (simulations.runner.RAY_INIT_ARGS, token
    authentication on): a process without the run's token cannot join the local Ray
    cluster (as another host reaching Ray's 0.0.0.0 ports could not); one with it can."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    done = subprocess.run([sys.executable, "-c", RAY_PROBE], env=env, capture_output=True, text=True,
                          timeout=240, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print("\nRay:", json.dumps(result))
    assert result["outsider"][1] is False and result["outsider"][0] != 0
    assert result["with-token"] == [0, True]
