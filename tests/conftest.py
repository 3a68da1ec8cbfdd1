"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def flower_env(tmp_path, monkeypatch):
    """Flower's environment for a test that runs Flower: no telemetry, no update check,
    and a temporary FLWR_HOME, so tests neither phone home nor touch the user's ~/.flwr."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
