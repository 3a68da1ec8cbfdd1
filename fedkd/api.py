"""fedkd's Python API: load a config, run a federation, compare runs, audit one.

>>> import fedkd
>>> cfg = fedkd.load_config(overrides={"data.num-clients": 3, "num-server-rounds": 2})
>>> cfg.data.num_clients
3

``result = fedkd.simulate(cfg, runner="inprocess")`` runs the federation in this process
(no Flower; the same numbers as the simulation engine); ``runner="flower"`` runs it on
Flower's simulation engine, as ``fedkd simulate`` does. Both return a :class:`RunResult`.
Flower is imported only when a ``"flower"`` run starts (through :mod:`fedkd.engine`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedkd.config import Config, load_config

RUNNERS = ("flower", "inprocess")


@dataclass(frozen=True)
class RunResult:
    """A finished run: ``run_dir`` (``summary.json``, ``metrics.jsonl``, plots), ``status``
    (``"completed"`` or why it stopped), ``metrics`` (the final value of each metric: ``alma``,
    ``worst``, ``weighted``, ``global-accuracy``), ``history`` (one dict per round) and the
    whole ``summary``."""

    run_dir: Path
    status: str
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> RunResult:
        """The result of the run recorded in ``run_dir``."""
        from fedkd.reporting import read_summary

        summary = read_summary(run_dir)
        return cls(run_dir=Path(run_dir), status=str(summary["status"]), metrics=dict(summary["final"]),
                   history=list(summary["history"]), summary=summary)


def _config(config: Config | str | Path | Mapping[str, Any] | None) -> Config:
    if isinstance(config, Config):
        return config
    if config is None or isinstance(config, Mapping):
        return load_config(overrides=config or {})
    return load_config(config)


def simulate(config: Config | str | Path | Mapping[str, Any] | None = None, *, runner: str = "flower",
             verbose: bool = False, ray_address: str | None = None) -> RunResult:
    """Run one federation of ``config`` (a :class:`Config`, a TOML file's path, or overrides
    such as ``{"fusion.method": "mean"}``) with ``runner`` (``"flower"``: Flower's simulation
    engine; ``"inprocess"``: this process, no Flower) and return its :class:`RunResult`. A run
    that stops early returns with its ``status``; a config or a model that cannot work raises
    :class:`fedkd.config.ConfigError` before the run starts. ``ray_address`` (``"flower"``
    only): a running Ray cluster's ``HOST:PORT`` to run the sites on (default: the
    ``RAY_ADDRESS`` environment variable, else a Ray instance of this process)."""
    from fedkd.config import ConfigError
    from fedkd.engine import launch_inprocess, launch_simulation
    from fedkd.reporting import default_run_name

    if runner not in RUNNERS:
        raise ConfigError([f"runner: must be one of {', '.join(RUNNERS)}; got {runner!r}"])
    if ray_address and runner != "flower":
        raise ConfigError([f"ray-address: only the flower runner runs on a Ray cluster; runner is {runner!r}"])
    config = _config(config)
    if not config.run_name:
        config = dataclasses.replace(config, run_name=default_run_name(config))
    if runner == "flower":
        run_dir = launch_simulation(config, verbose=verbose, ray_address=ray_address)
    else:
        run_dir = launch_inprocess(config)
    return RunResult.from_run_dir(run_dir)


def compare(run_dirs: Iterable[str | Path] | str | Path, *, format: str = "text") -> str:  # noqa: A002
    """A table over finished runs (run directories, or a study folder holding them) in
    ``format`` ``"text"``, ``"csv"``, ``"md"`` or ``"json"``."""
    from fedkd.reporting import compare_table, find_runs

    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    return compare_table(find_runs(run_dirs), format=format)


def audit(run_dir: str | Path, *, overrides: Mapping[str, Any] | None = None, progress: bool = False) -> Any:
    """The privacy-leakage audit of a run recorded with ``audit.enabled`` (as ``fedkd audit
    RUN_DIR``): writes ``RUN_DIR/audit/`` (``audit.json``, ``audit.md``, plots) and returns the
    audit's result."""
    from fedkd.audit.report import write_audit_report
    from fedkd.audit.run import audit_run

    result, scores = audit_run(Path(run_dir), overrides=dict(overrides or {}), progress=progress)
    write_audit_report(Path(run_dir) / "audit", result, scores)
    return result
