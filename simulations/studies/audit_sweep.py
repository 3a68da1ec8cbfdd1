"""The driver of the trade-off study behind ``fedkd audit --sweep``: run and audit one
federation per protection setting, reuse the finished ones, write the sweep report.

The settings and each setting's configuration are fedkd.audit.sweep (pure); the runs
themselves go through a ``simulate`` callable: ``fedkd audit --sweep`` reaches
:func:`run_sweep` through ``fedkd.engine.launch_audit_sweep``, which passes Flower's
simulation engine (``fedkd.engine.launch_simulation``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedkd.audit.sweep import Setting, setting_config
from fedkd.config import Config


def run_sweep(
    base: Config,
    settings: Sequence[Setting],
    *,
    sweep_name: str,
    simulate: Callable[[Config], Path],
    command: str,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run and audit every setting; write each run's audit report and the sweep report
    into ``<output-dir>/<sweep_name>/``. Returns the sweep folder and its rows."""
    from fedkd.audit.report import write_audit_report, write_sweep_report
    from fedkd.audit.run import audit_run
    from fedkd.reporting import read_summary

    rows: list[dict[str, Any]] = []
    sweep_dir = Path(base.output_dir).resolve() / sweep_name
    for i, setting in enumerate(settings, 1):
        config = setting_config(base, setting, sweep_name=sweep_name)
        run_dir = sweep_dir / setting.name
        result = _finished(run_dir, config)
        if result is not None:
            log(f"[{i}/{len(settings)}] {setting.name}: audited run found, reused")
        else:
            if run_dir.exists():  # an unfinished run of this sweep: start it again
                log(f"[{i}/{len(settings)}] {setting.name}: removing the unfinished run {run_dir}")
                shutil.rmtree(run_dir)
            log(f"[{i}/{len(settings)}] {setting.name}: federation")
            run_dir = simulate(config)
            status = read_summary(run_dir).get("status")
            if status != "completed":  # e.g. sites that never started: nothing to audit
                log(f"[{i}/{len(settings)}] {setting.name}: run {status}; not audited (run the "
                    "sweep again to retry it)")
                continue
            log(f"[{i}/{len(settings)}] {setting.name}: audit")
            result, scores = audit_run(run_dir, progress=progress)
            write_audit_report(run_dir / "audit", result, scores)
        rows.append({"setting": setting.name, "kind": setting.kind, **dataclasses.asdict(setting),
                     "run_dir": str(run_dir), "audit": result})
        write_sweep_report(sweep_dir, rows, command=command)  # partial results survive a stop
    return sweep_dir, rows


def _finished(run_dir: Path, config: Config) -> dict[str, Any] | None:
    """The audit result of a completed, audited run of the same configuration in
    ``run_dir`` (a sweep run again after a stop reuses it), else None."""
    from fedkd.config import ConfigError, load_config
    from fedkd.reporting import read_summary

    try:
        if read_summary(run_dir).get("status") != "completed":
            return None
        recorded = load_config(run_dir / "config.toml")
        result = json.loads((run_dir / "audit" / "audit.json").read_text())
    except (FileNotFoundError, ConfigError, ValueError):
        return None
    same = dataclasses.replace(recorded, checkpoint=config.checkpoint, output_dir=config.output_dir)
    return result if same == dataclasses.replace(config, output_dir=config.output_dir) else None
