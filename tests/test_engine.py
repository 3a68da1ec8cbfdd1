"""fedkd.engine, the one entry from fedkd/ into simulations/ and Flower: the audit sweep
runs each of its federations through launch_simulation (no federation is started here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import fedkd.engine
from fedkd.config import Config


def test_audit_sweep_runs_every_federation_through_launch_simulation(monkeypatch):
    import simulations.studies.audit_sweep as driver

    launched = []
    monkeypatch.setattr(fedkd.engine, "launch_simulation",
                        lambda config, *, verbose=False: launched.append((config, verbose)) or Path("run"))

    def run_sweep(base, settings, *, simulate, **options):
        return Path("sweep"), [simulate(base), options]

    monkeypatch.setattr(driver, "run_sweep", run_sweep)
    base = Config()
    folder, rows = fedkd.engine.launch_audit_sweep(
        base, [], verbose=True, prepare=lambda c: dataclasses.replace(c, run_name="prepared"),
        sweep_name="s", command="c")
    assert folder == Path("sweep") and rows == [Path("run"), {"sweep_name": "s", "command": "c"}]
    assert [(c.run_name, v) for c, v in launched] == [("prepared", True)]


def test_an_audit_plan_the_site_cannot_hold_is_refused_before_the_engine_starts(tmp_path):
    """100 candidates on a site of 37 training examples: ConfigError from the driver (one
    line, exit 2 under the CLI), no run directory, no Flower or Ray started."""
    from fedkd.config import ConfigError, load_config
    from fedkd.engine import launch_simulation

    config = load_config(overrides={"output-dir": str(tmp_path), "run-name": "a", "data.num-clients": 4,
                                    "audit.enabled": True, "audit.site": 1, "audit.canaries": 100})
    with pytest.raises(ConfigError) as err:
        launch_simulation(config)
    assert err.value.problems == ["audit.canaries: site 1 has 37 private training examples; asked for 100 "
                                  "candidates (use at most 37, or 0 for all of them)"]
    assert not (tmp_path / "a").exists()
