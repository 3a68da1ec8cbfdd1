"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def split_cache(tmp_path_factory):
    """The split cache (fedkd.data.split_cache_path) in a temporary folder for the whole
    session: tests share it (as a user's runs do) but never write to the user's ~/.cache.
    Set in os.environ so the processes tests start (Ray actors, CLI runs) inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDKD_CACHE_DIR", str(tmp_path_factory.mktemp("fedkd-cache")))
        yield



@pytest.fixture
def flower_env(tmp_path, monkeypatch):
    """Flower's environment for a test that runs Flower: no telemetry, no update check,
    and a temporary FLWR_HOME, so tests neither phone home nor touch the user's ~/.flwr."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


@pytest.fixture
def small_run_config(tmp_path):
    """``make(name, **overrides)``: a 4-site, 2-round config (short epochs) whose run goes to
    ``tmp_path/runs/name``: the size of run the runner tests use."""
    from fedkd.config import load_config

    def make(name: str, **overrides):  # noqa: ANN202, ANN003
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

    return make
