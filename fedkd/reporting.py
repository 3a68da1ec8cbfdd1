"""Run directories: what a run writes, the summary it ends with, plots and comparisons.

A run directory holds

* ``config.toml``      the resolved configuration (re-runnable with ``--config``),
* ``metrics.jsonl``    one JSON object per event (client train/eval metrics, exclusions,
                       round summaries),
* ``weights/round_NNNN.npz``  the fusion weight matrix of each round and its client ids
                       (and, when a consensus is sent, each receiver's sender shares of it),
* ``summary.json``     the final figures (ALMA, worst client, global student, bytes),
* ``alma.png``, ``client_accuracy.png``, ``weights_heatmap.png``, and with DP
  ``epsilon.png`` (epsilon spent per site per round against the target).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedkd.checkpoint import SERVER_CHECKPOINT

if TYPE_CHECKING:
    from fedkd.config import Config

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"
WEIGHTS_DIR = "weights"


def default_run_name(config: Config) -> str:
    """``<method>-<timestamp>``; a fusion plugin's method is its rule's name (``pkg.mod:rule`` -> ``rule``)."""
    return f"{config.fusion.method.rsplit(':', 1)[-1]}-{datetime.now():%Y%m%d-%H%M%S}"


def run_directory(config: Config) -> Path:
    """The run's directory, ``output-dir/run-name`` (a timestamped name when run-name is
    empty). With ``checkpoint.resume`` it must hold the stopped run's checkpoint; otherwise it
    must be new or empty (a finished run is never overwritten)."""
    name = config.run_name or default_run_name(config)
    run_dir = Path(config.output_dir).resolve() / name
    if config.checkpoint.resume:  # continue the stopped run there
        if not (run_dir / SERVER_CHECKPOINT).is_file():
            raise FileNotFoundError(
                f"checkpoint.resume: no checkpoint in {run_dir}; is run-name / output-dir the "
                "stopped run's, and did it complete a round?"
            )
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} is not empty; choose another run-name")
    return run_dir


def alma_summary(accuracy: Mapping[int, float], examples: Mapping[int, float]) -> dict[str, float]:
    """ALMA (unweighted mean of local accuracies, KnFu's headline metric), the
    example-weighted mean and the worst client, over clients with a finite accuracy."""
    valid = sorted(c for c, a in accuracy.items() if math.isfinite(a))  # sums in a fixed order
    if not valid:
        return {"alma": float("nan"), "alma-weighted": float("nan"), "worst": float("nan")}
    acc = np.array([accuracy[c] for c in valid])
    n = np.array([examples.get(c, 0.0) for c in valid])
    weighted = float((acc * n).sum() / n.sum()) if n.sum() > 0 else float("nan")
    return {"alma": float(acc.mean()), "alma-weighted": weighted, "worst": float(acc.min())}


def prior_alma(prior_accuracy: Mapping[int, float]) -> float:
    """ALMA on the shared test set: the unweighted mean over sites of each site's accuracy
    there re-weighted to its own label mix (``prior-accuracy``,
    :func:`fedkd.distillation.prior_weighted_accuracy`), over the finite ones (nan if none).
    It matches ALMA's label mix on the shared test set's examples instead of 4-54 local
    ones; it matches ALMA's inputs only where the sites' inputs are alike (it corrects label
    shift, not feature shift: docs/benchmarks.md, "ALMA on the shared test set")."""
    values = [prior_accuracy[c] for c in sorted(prior_accuracy) if math.isfinite(prior_accuracy[c])]
    return float(np.mean(values)) if values else float("nan")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


class RunRecorder:
    """Appends a run's records to its directory as the run goes (nothing lost on a crash)."""

    def __init__(self, run_dir: str | Path, config_toml: str) -> None:
        self.run_dir = Path(run_dir)
        (self.run_dir / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(config_toml)
        self._metrics = (self.run_dir / METRICS_FILE).open("a")

    def record(self, event: str, **fields: Any) -> None:
        self._metrics.write(json.dumps({"event": event, **fields}, default=_json_default) + "\n")
        self._metrics.flush()

    def save_weights(self, round_number: int, clients: Iterable[int], weights: np.ndarray, *,
                     consensus_weights: np.ndarray | None = None) -> None:
        """``weights`` [receivers, senders] of F_i, and with a consensus its sender shares
        ``consensus_weights`` (same shape), in ``clients`` order."""
        extra = {} if consensus_weights is None else {"consensus_weights": np.asarray(consensus_weights)}
        np.savez(
            self.run_dir / WEIGHTS_DIR / f"round_{round_number:04d}.npz",
            weights=weights,
            clients=np.asarray(list(clients)),
            **extra,
        )

    def finish(self, summary: Mapping[str, Any]) -> Path:
        self._metrics.close()
        path = self.run_dir / SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=2, default=_json_default))
        plot_run(self.run_dir)
        return path


def read_events(run_dir: str | Path, event: str | None = None) -> list[dict[str, Any]]:
    lines = (Path(run_dir) / METRICS_FILE).read_text().splitlines()
    events = [json.loads(line) for line in lines if line.strip()]
    return [e for e in events if event is None or e["event"] == event]


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished fedkd run (no {SUMMARY_FILE})")
    return json.loads(path.read_text())


UNINFORMATIVE_WEIGHTS = frozenset({"none", "mean", "era"})
"""Fusion methods whose weight matrix says nothing (identity, or every row uniform): no heatmap."""


def _run_method(run_dir: Path) -> str | None:
    import tomllib

    try:
        return tomllib.loads((run_dir / CONFIG_FILE).read_text())["fusion"]["method"]
    except (OSError, KeyError, ValueError):
        return None


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_outside(ax: Any, **options: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=7, **options)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the run's PNG plots from ``metrics.jsonl`` and the weight files: integer round
    ticks, legends beside the axes (never over the data), the method and run in each title,
    sites excluded in a round marked, and no weight heatmap for methods whose weights carry
    no information (:data:`UNINFORMATIVE_WEIGHTS`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    method = _run_method(run_dir)
    label = f"{method} · {run_dir.name}" if method else run_dir.name
    written = []
    rounds = read_events(run_dir, "round")
    evaluated = [r for r in rounds if r.get("alma") is not None]

    fig, ax = plt.subplots(figsize=(7.5, 4))
    if evaluated:
        x = [r["round"] for r in evaluated]
        ax.plot(x, [r["alma"] for r in evaluated], marker="o", label="ALMA (mean local accuracy)")
        ax.plot(x, [r["worst"] for r in evaluated], marker=".", linestyle="--", label="worst client")
    student = [r for r in rounds if r.get("global-accuracy") is not None]
    if student:
        ax.plot([r["round"] for r in student], [r["global-accuracy"] for r in student],
                linestyle=":", label="global student (global test)")
    ax.set(xlabel="round", ylabel="accuracy", ylim=(0, 1.02), title=f"Accuracy per round: {label}")
    _integer_rounds(ax)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    written.append(run_dir / "alma.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    evals = read_events(run_dir, "client-eval")
    excluded = read_events(run_dir, "excluded")
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for client in sorted({e["client"] for e in evals}):
        own = [e for e in evals if e["client"] == client]
        line, = ax.plot([e["round"] for e in own], [e["accuracy"] for e in own], label=f"client {client}")
        out = sorted({e["round"] for e in excluded if e.get("client") == client})
        if out:
            ax.plot(out, [0.0] * len(out), "x", color=line.get_color(), clip_on=False)
    if excluded:
        ax.plot([], [], "x", color="gray", label="excluded that round")
    ax.set(xlabel="round", ylabel="local test accuracy", ylim=(0, 1.02), title=f"Per-client accuracy: {label}")
    _integer_rounds(ax)
    ax.grid(alpha=0.3)
    _legend_outside(ax, ncol=1 if len({e["client"] for e in evals}) <= 12 else 2)
    fig.tight_layout()
    written.append(run_dir / "client_accuracy.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    trains = [e for e in read_events(run_dir, "client-train") if "epsilon" in e]
    if trains:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for client in sorted({e["client"] for e in trains}):
            own = [e for e in trains if e["client"] == client]
            ax.plot([e["round"] for e in own], [e["epsilon"] for e in own], marker=".",
                    label=f"client {client}")
        target = trains[0]["dp-target-epsilon"]
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target ε = {target:g}")
        ax.set(xlabel="round", ylabel="ε spent (whole run so far)", ylim=(0, target * 1.1),
               title=f"Privacy spent per site: {label}")
        _integer_rounds(ax)
        ax.grid(alpha=0.3)
        _legend_outside(ax)
        fig.tight_layout()
        written.append(run_dir / "epsilon.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    weight_files = sorted((run_dir / WEIGHTS_DIR).glob("round_*.npz"))
    if weight_files and method not in UNINFORMATIVE_WEIGHTS:
        last = np.load(weight_files[-1])
        clients = last["clients"]
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        image = ax.imshow(last["weights"], cmap="viridis", vmin=0)
        ax.set_xticks(range(len(clients)), clients)
        ax.set_yticks(range(len(clients)), clients)
        ax.set(xlabel="neighbour j (knowledge source)", ylabel="client i (receiver)",
               title=f"Fusion weights w_ij, {weight_files[-1].stem.replace('_', ' ')}\n{label}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        written.append(run_dir / "weights_heatmap.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def plot_study(run_dirs: Iterable[str | Path], *, out_dir: str | Path) -> Path:
    """One picture comparing a study's runs: ALMA per round for each method (left) and each
    site's final local accuracy per method (right). Written to ``out_dir/study.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs = [Path(r) for r in run_dirs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(len(run_dirs), 1)
    for i, run_dir in enumerate(run_dirs):
        name = _run_method(run_dir) or run_dir.name
        evaluated = [r for r in read_events(run_dir, "round") if r.get("alma") is not None]
        left.plot([r["round"] for r in evaluated], [r["alma"] for r in evaluated], marker=".", label=name)
        evals = read_events(run_dir, "client-eval")
        if evals:
            last = max(e["round"] for e in evals)
            final = sorted((e["client"], e["accuracy"]) for e in evals if e["round"] == last)
            right.bar([c + (i - (len(run_dirs) - 1) / 2) * width for c, _ in final], [a for _, a in final],
                      width=width, label=name)
    study = run_dirs[0].parent.name if run_dirs else ""
    left.set(xlabel="round", ylabel="ALMA", ylim=(0, 1.02), title=f"ALMA per round by method: {study}")
    _integer_rounds(left)
    right.set(xlabel="site", ylabel="final local test accuracy", ylim=(0, 1.02),
              title=f"Final accuracy per site by method: {study}")
    _integer_rounds(right)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    _legend_outside(right)
    fig.tight_layout()
    path = Path(out_dir) / "study.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


COMPARE_FORMATS = ("text", "csv", "md", "json")


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """The run directories among ``paths``: a run directory (it has ``summary.json``) as
    it is, a folder of runs (a study) as the runs inside it, in name order; other files (a
    study's ``comparison.txt``, plots) are skipped. Raises ``FileNotFoundError`` naming a
    folder that is neither a finished run nor holds one."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if (path / SUMMARY_FILE).is_file():
            runs.append(path)
        elif path.is_dir():
            inside = sorted(p for p in path.iterdir() if (p / SUMMARY_FILE).is_file())
            if not inside:
                raise FileNotFoundError(f"{path} is not a finished fedkd run (no {SUMMARY_FILE}) "
                                        "and holds none")
            runs.extend(inside)
        elif not path.exists():
            raise FileNotFoundError(f"{path}: no such run directory")
    return runs


def _compare_rows(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    rows = []
    for run_dir in run_dirs:
        s = read_summary(run_dir)
        final = s["final"]
        ledger = s.get("privacy", {}).get("ledger", {})
        history = s.get("history") or [{}]
        rows.append({
            "run": Path(run_dir).name,
            "method": s["method"],
            "rounds": s["rounds-completed"],
            "alma": final.get("alma"),
            "worst": final.get("worst"),
            "global-accuracy": final.get("global-accuracy"),
            "alma-prior": final.get("alma-prior"),  # json only: the text table keeps its columns
            # a label-rr run without DP-SGD has ledger rows with no epsilon-spent
            "max-epsilon": max((e["epsilon-spent"] for e in ledger.values() if "epsilon-spent" in e), default=None),
            "bytes-per-client-round": s["bytes"]["total-per-client-round"],
            "sites-responding": len(history[-1].get("accepted", [])) if "history" in s else None,
            "status": s.get("status", "-"),
        })
    return rows


def compare_table(run_dirs: Iterable[str | Path], *, format: str = "text") -> str:  # noqa: A002
    """A table over finished runs: method, rounds, ALMA mean/worst, global accuracy, max
    epsilon, bytes, sites responding in the last round and status, as ``format`` ``"text"``
    (aligned columns), ``"csv"``, ``"md"`` (Markdown) or ``"json"`` (a list of objects with
    the unformatted values)."""
    if format not in COMPARE_FORMATS:
        raise ValueError(f"--format: must be one of {', '.join(COMPARE_FORMATS)}; got {format!r}")
    rows = _compare_rows(run_dirs)
    if format == "json":
        return json.dumps(rows, indent=2, default=_json_default)
    header = ("run", "method", "rounds", "ALMA", "worst", "global acc", "max ε", "bytes/client/round",
              "sites", "status")
    cells = [header] + [
        (r["run"], r["method"], str(r["rounds"]), _fmt(r["alma"], ".3f"), _fmt(r["worst"], ".3f"),
         _fmt(r["global-accuracy"], ".3f"), _fmt(r["max-epsilon"], ".2f"),
         _fmt(r["bytes-per-client-round"], ",.0f"), _fmt(r["sites-responding"], "d"), str(r["status"]))
        for r in rows
    ]
    if format == "csv":
        import csv
        import io

        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(cells)
        return out.getvalue().rstrip("\n")
    if format == "md":
        lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def trim_events(run_dir: str | Path, *, through_round: int) -> int:
    """Drop ``metrics.jsonl`` events of rounds after ``through_round`` (what a stopped run
    recorded past its last checkpoint, which the resumed run records again); returns how
    many were dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run stopped mid-write
            dropped += 1
            continue
        if isinstance(event.get("round"), int) and event["round"] > through_round:
            dropped += 1
        else:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped
