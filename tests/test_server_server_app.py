"""The ServerApp's own behaviour before any round: input it cannot start with is said in
one line (as `fedkd simulate` says it), not raised as a traceback through Flower."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402

from fedkd.config import Config  # noqa: E402
from server.server_app import main  # noqa: E402


def _context(**overrides: object) -> Context:
    run_config = Config().to_flat()
    run_config.update(overrides)
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_a_bad_run_config_is_one_line_and_no_exception(caplog: pytest.LogCaptureFixture, tmp_path) -> None:  # noqa: ANN001
    caplog.set_level(logging.INFO)
    context = _context(**{"fusion.method": "bogus", "output-dir": str(tmp_path)})
    main(grid=None, context=context)  # the grid is never reached: the config is refused first
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors[0].startswith("fedkd: error: fusion.method: must be one of ")
    assert errors[0].endswith("got 'bogus'")
    assert errors[-1] == "fedkd: the run did not start (nothing was sent to the sites)"
    assert all("\n" not in e and "Traceback" not in e for e in errors)
    assert not list(tmp_path.iterdir())  # nothing was recorded for a run that never started


def test_every_problem_gets_its_own_line(caplog: pytest.LogCaptureFixture, tmp_path) -> None:  # noqa: ANN001
    caplog.set_level(logging.INFO)
    main(grid=None, context=_context(**{"fusion.method": "bogus", "data.alpha": -1.0, "output-dir": str(tmp_path)}))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(e.startswith("fedkd: error: fusion.method:") for e in errors)
    assert any(e.startswith("fedkd: error: data.alpha:") for e in errors)
    assert len(errors) == 3
