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


def test_ctrl_c_stops_simulate_and_resume_ends_as_an_uninterrupted_run(tmp_path):
    """SIGINT during `fedkd simulate` (a real process): exit 130 within a few seconds, the
    checkpoint readable, and `--resume` ends exactly where an uninterrupted run ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fedkd.checkpoint import read_server_checkpoint

    runs = tmp_path / "runs"
    common = ["--set", f"output-dir={runs}", "--set", "data.num-clients=3", "--set", "train.local-epochs=1",
              "--set", "train.distill-epochs=1", "--set", "global-student.epochs=1",
              "--set", "knowledge.public-subset=100", "--set", "num-server-rounds=4"]
    command = [sys.executable, "-m", "fedkd.cli", "simulate", *common, "--set", "run-name=cut"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        checkpoint = runs / "cut" / "checkpoint.npz"
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert checkpoint.exists() and process.poll() is None, "the run ended or stalled before round 1"
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
        stopped_in = time.monotonic() - sent
    finally:
        if process.poll() is None:  # only on failure: our own process, by its id
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, err[-2000:]
    print(f"SIGINT to exit: {stopped_in:.2f}s after round {read_server_checkpoint(runs / 'cut')[0]}")
    assert stopped_in < 10, stopped_in
    assert "fedkd: interrupted" in err and "--resume --set run-name=cut" in err
    round_number, _, _ = read_server_checkpoint(runs / "cut")  # intact
    assert 1 <= round_number < 4

    assert cli_main(["simulate", *common, "--set", "run-name=cut", "--resume"]) == 0
    assert cli_main(["simulate", *common, "--set", "run-name=full"]) == 0
    cut, full = read_summary(runs / "cut"), read_summary(runs / "full")
    assert cut["status"] == full["status"] == "completed" and cut["resumed-from"] == [round_number]
    strip = lambda history: [{k: v for k, v in e.items() if k != "seconds"} for e in history]  # noqa: E731
    assert strip(cut["history"]) == strip(full["history"]) and cut["final"] == full["final"]
