"""fedkd.engine, the one entry from fedkd/ into simulations/ and Flower: the audit sweep
runs each of its federations through launch_simulation (no federation is started here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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
