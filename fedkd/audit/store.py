"""What a run keeps for its audit, in ``<run dir>/audit/`` (only with ``audit.enabled``).

* ``plan.npz``: the target site's candidates (:class:`~fedkd.audit.canaries.AuditPlan`:
  positions, audit labels, inclusion bits, secret digits) plus their inputs ``x`` and
  global ``ids``, written by the server when the run starts (it derives the plan from the
  seed, as the site does).
* ``knowledge/round_NNNN.npz``: the target site's released knowledge as the server
  received it (``positions`` [P_r], ``knowledge`` [P_r, C]) each round: the
  honest-but-curious server's view.

The site's final model is read from its state directory (``checkpoint.site-state-dir``;
``fedkd simulate`` uses ``<run dir>/site-state``) and the global student from the
server's checkpoint. Nothing here is written when auditing is off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedkd.audit.canaries import AuditPlan

AUDIT_DIR = "audit"
PLAN_FILE = "plan.npz"
KNOWLEDGE_DIR = "knowledge"


class AuditDataError(FileNotFoundError):
    """A run directory lacks what an audit needs (message says what and why)."""


def write_plan(run_dir: str | Path, plan: AuditPlan, *, x: np.ndarray, ids: np.ndarray) -> Path:
    """Record the plan and the candidates' inputs and ids."""
    folder = Path(run_dir) / AUDIT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PLAN_FILE
    np.savez(path, x=x, ids=ids, **plan.to_arrays())
    return path


def save_released(run_dir: str | Path, round_number: int, *, positions: np.ndarray, knowledge: np.ndarray) -> Path:
    """Record the target site's released knowledge of one round."""
    folder = Path(run_dir) / AUDIT_DIR / KNOWLEDGE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round_{round_number:04d}.npz"
    np.savez(path, positions=np.asarray(positions, np.int64), knowledge=np.asarray(knowledge, np.float32))
    return path


def load_plan(run_dir: str | Path) -> tuple[AuditPlan, np.ndarray, np.ndarray]:
    """``(plan, x, ids)`` of a run recorded with auditing on."""
    path = Path(run_dir) / AUDIT_DIR / PLAN_FILE
    if not path.is_file():
        raise AuditDataError(
            f"{run_dir} was not recorded with auditing on (no {AUDIT_DIR}/{PLAN_FILE}); run it "
            "again with --set audit.enabled=true (see docs/audit.md)"
        )
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    return AuditPlan.from_arrays(arrays), arrays["x"], arrays["ids"]


def load_released(run_dir: str | Path) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``[(round, positions, knowledge), ...]`` in round order."""
    folder = Path(run_dir) / AUDIT_DIR / KNOWLEDGE_DIR
    out = []
    for path in sorted(folder.glob("round_*.npz")):
        with np.load(path, allow_pickle=False) as archive:
            out.append((int(path.stem.split("_")[1]), archive["positions"], archive["knowledge"]))
    return out


def load_site_state_arrays(state_dir: str | Path, *, run_name: str, site: int,
                           record: str = "model") -> dict[str, np.ndarray] | None:
    """The named array record (a torch state dict as arrays) of the site's latest saved
    state (clients/site_state.py's file layout), or None when there is none."""
    from fedkd.checkpoint import SiteStateStore

    if not state_dir or not run_name:
        return None
    store = SiteStateStore(state_dir, run_key=run_name, client=site)
    latest = store.latest(before=10**9)
    if latest is None:
        return None
    arrays, meta = store.load(latest)
    for index, entry in enumerate(meta.get("records", [])):
        if entry.get("name") == record and entry.get("type") == "array":
            return {key: arrays[f"{index}/{i}"] for i, key in enumerate(entry["keys"])}
    return None


def start_audit(config, split, run_dir: str | Path):  # noqa: ANN001, ANN201 (Config, FederatedSplit)
    """Server side, before round 1: derive the target site's plan from the seed (as the
    site does), record it with the candidates' inputs, and return the split as the audited
    site holds it (for the privacy plan check)."""
    from fedkd.audit.canaries import plan_for, with_audit

    plan = plan_for(config, split)
    train = split.clients[config.audit.site].train
    write_plan(run_dir, plan, x=train.x[plan.positions], ids=train.ids[plan.positions])
    return with_audit(config, split)
