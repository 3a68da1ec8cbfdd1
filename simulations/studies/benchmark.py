"""Benchmark studies: one command per table, resumable, with plots (docs/benchmarks.md).

    python -m simulations.studies.benchmark accuracy   --out runs/bench/accuracy   [--dp off|on|both]
    python -m simulations.studies.benchmark robustness --out runs/bench/robustness
    python -m simulations.studies.benchmark communication --out runs/bench/communication
    python -m simulations.studies.benchmark speed      --out runs/bench/speed
    python -m simulations.studies.benchmark scale      --out runs/bench/scale --sites 100,200,500

``accuracy`` and ``robustness`` run one federation per grid point with the floor runner
(``simulations/floor.py``: the same computation as ``fedkd simulate``, checked equal by
tests/e2e/test_e2e_transports.py, without Flower's per-run start-up) or, with ``--runner flower``,
through Flower's simulation engine. Each finished run leaves ``summary.json`` in
``OUT/<grid point>/``; a rerun skips those and redoes unfinished ones, so an
interrupted study resumes where it stopped. ``--report`` only rebuilds the tables and
plots from the finished runs. Tables go to ``OUT/table.md`` (and ``OUT/results.json``),
plots to ``OUT/*.png``.

``communication`` needs no training: it counts bytes. ``speed`` times the same
federation through the floor and through Flower's simulation engine. ``scale`` starts
ever larger federations on the simulation engine and records their peak memory.
Fusion time and memory: ``python simulations/micro/fusion_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.config import Config, load_config, parse_overrides
from fedkd.reporting import SUMMARY_FILE, read_summary

KD_METHODS = ("none", "mean", "era", "knfu", "expert")
ALPHAS = (0.05, 0.1, 0.5, 1.0, 100.0)
METHOD_LABELS = {
    "none": "none (local only)",
    "mean": "mean (FedMD)",
    "era": "era (DS-FL)",
    "knfu": "knfu",
    "fedavg": "FedAvg (weights)",
    "expert": "expert (class-expert + consensus, validated): the default",
}


def method_label(method: str, run_dir: Path) -> str:
    """The table's name for ``method``; knfu names the effectiveness measure and divergence
    its finished run in ``run_dir`` used (its saved config), e.g. "knfu (agreement, hellinger)"."""
    if method != "knfu":
        return METHOD_LABELS.get(method, method)
    fusion = load_config(run_dir / "config.toml").fusion
    return f"knfu ({fusion.measure}, {fusion.divergence})"


# ------------------------------------------------------------------ running grid points


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_point(config: Config, *, method: str, runner: str) -> dict[str, Any] | None:
    """Run one grid point unless finished; returns its summary (None when it failed)."""
    run_dir = Path(config.output_dir) / config.run_name
    if (run_dir / SUMMARY_FILE).is_file():
        return read_summary(run_dir)
    if run_dir.exists():  # an interrupted run: start it again
        shutil.rmtree(run_dir)
    try:
        if method == "fedavg":
            from simulations.floor import run_fedavg

            run_fedavg(config)
        elif runner == "floor":
            from simulations.floor import run_floor

            run_floor(config)
        else:
            from simulations.runner import simulate

            simulate(config)
    except Exception:  # noqa: BLE001  one failed point must not stop the study
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "failed.txt").write_text(traceback.format_exc())
        _log(f"FAILED {config.run_name}: see {run_dir / 'failed.txt'}")
        return None
    return read_summary(run_dir)


def _finished(out: Path, name: str) -> dict[str, Any] | None:
    path = out / name / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _cell(mean: float, std: float | None = None, n: int | None = None) -> str:
    if not math.isfinite(mean):
        return "-"
    text = f"{mean:.3f}"
    if std is not None and n and n > 1:
        text += f" ± {std:.3f}"
    return text


# ------------------------------------------------------------------ accuracy


def accuracy_points(args: argparse.Namespace) -> Iterable[tuple[str, str, float, int, bool, dict]]:
    for dp in _dp_modes(args.dp):
        for seed in args.seeds:  # seed outer: a stopped study still covers every alpha
            for alpha in args.alphas:
                for method in args.methods:
                    name = f"{'dp' if dp else 'nodp'}/{method}/alpha-{alpha:g}/seed-{seed}"
                    overrides = {"data.alpha": alpha, "seed": seed, "privacy.enabled": dp}
                    if dp:
                        overrides["privacy.target-epsilon"] = args.epsilon
                    if method == "fedavg":
                        overrides["model.architectures"] = args.fedavg_model
                    else:
                        overrides["fusion.method"] = method
                    yield name, method, alpha, seed, dp, overrides


def _dp_modes(dp: str) -> tuple[bool, ...]:
    return {"off": (False,), "on": (True,), "both": (False, True)}[dp]


def _base_overrides(args: argparse.Namespace) -> dict[str, Any]:
    base = parse_overrides(args.overrides)
    if args.rounds:
        base["num-server-rounds"] = args.rounds
    return base


def _run_grid(args: argparse.Namespace, points: list[tuple[str, str, dict]]) -> None:
    base = _base_overrides(args)
    todo = [(name, method, o) for name, method, o in points if _finished(args.out, name) is None]
    _log(f"{len(points)} grid points, {len(points) - len(todo)} finished, {len(todo)} to run")
    for i, (name, method, overrides) in enumerate(todo, 1):
        config = load_config(args.config, overrides={
            **base, **overrides, "output-dir": str(args.out.resolve()), "run-name": name,
        })
        started = time.monotonic()
        summary = run_point(config, method=method, runner=args.runner)
        if summary is not None:
            f = summary["final"]
            _log(f"[{i}/{len(todo)}] {name}: ALMA {f.get('alma', float('nan')):.3f} "
                 f"worst {f.get('worst', float('nan')):.3f} in {time.monotonic() - started:.0f}s")


def cmd_accuracy(args: argparse.Namespace) -> int:
    points = [(name, method, o) for name, method, _, _, _, o in accuracy_points(args)]
    if not args.report:
        _run_grid(args, points)
    rows = []
    for dp in _dp_modes(args.dp):
        for method in args.methods:
            for alpha in args.alphas:
                names = [f"{'dp' if dp else 'nodp'}/{method}/alpha-{alpha:g}/seed-{seed}" for seed in args.seeds]
                names = [name for name in names if _finished(args.out, name)]
                summaries = [_finished(args.out, name) for name in names]
                if not summaries:
                    continue
                alma = _mean_std([s["final"].get("alma") for s in summaries])
                prior = _mean_std([s["final"].get("alma-prior") for s in summaries])
                rows.append({
                    "dp": dp, "method": method, "label": method_label(method, args.out / names[0]), "alpha": alpha,
                    "seeds": len(summaries),
                    "alma": alma[0], "alma-std": alma[1],
                    "alma-prior": prior[0], "alma-prior-std": prior[1],
                    "worst": _mean_std([s["final"].get("worst") for s in summaries])[0],
                    "global": _mean_std([s["final"].get("global-accuracy") for s in summaries])[0],
                    "max-epsilon": max((e["epsilon-spent"] for s in summaries
                                        for e in s["privacy"]["ledger"].values()), default=None),
                    "rounds": summaries[0]["rounds-completed"],
                })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    table = accuracy_table(rows, args.alphas)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    plot_accuracy(rows, args.out)
    return 0


def accuracy_table(rows: list[dict], alphas: Iterable[float]) -> str:
    """Markdown: one table per DP setting, methods as rows, alpha as column groups; a second
    table of ``alma-prior`` where the runs report it."""
    alphas = list(alphas)
    out = []
    for dp in sorted({r["dp"] for r in rows}):
        subset = [r for r in rows if r["dp"] == dp]
        eps = max((r["max-epsilon"] or 0.0) for r in subset)
        out.append(f"**{'with DP-SGD (max ε spent ' + format(eps, '.2f') + ')' if dp else 'without DP'}** "
                   "— each cell: ALMA mean ± std over seeds / worst site / global student")
        out.append("")
        out += _method_table(subset, alphas, lambda r: f"{_cell(r['alma'], r['alma-std'], r['seeds'])} / "
                                                       f"{_cell(r['worst'])} / {_cell(r['global'])}")
        if any(math.isfinite(r.get("alma-prior", float("nan"))) for r in subset):
            out.append("")
            out.append("ALMA on the shared test set, each site's accuracy re-weighted to its own label mix "
                       "(`alma-prior`; mean ± std over seeds):")
            out.append("")
            out += _method_table(subset, alphas, lambda r: _cell(r.get("alma-prior", float("nan")),
                                                                 r.get("alma-prior-std"), r["seeds"]))
        seeds = sorted({r["seeds"] for r in subset})
        rounds = sorted({r["rounds"] for r in subset})
        out.append("")
        out.append(f"Seeds per cell: {', '.join(map(str, seeds))}; rounds: {', '.join(map(str, rounds))}.")
        out.append("")
    return "\n".join(out).rstrip()


def _method_table(subset: list[dict], alphas: list[float], cell: Callable[[dict], str]) -> list[str]:
    """Markdown lines: methods as rows, one ``cell(row)`` per alpha ("-" where none ran)."""
    lines = ["| method | " + " | ".join(f"α = {a:g}" for a in alphas) + " |", "|---|" + "---|" * len(alphas)]
    for method in dict.fromkeys(r["method"] for r in subset):
        cells = []
        for a in alphas:
            r = next((r for r in subset if r["method"] == method and r["alpha"] == a), None)
            cells.append("-" if r is None else cell(r))
        lines.append(f"| {_label(subset, method)} | " + " | ".join(cells) + " |")
    return lines


def _label(rows: list[dict], method: str) -> str:
    return next((r["label"] for r in rows if r["method"] == method and "label" in r), METHOD_LABELS.get(method, method))


def plot_accuracy(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["dp"] for r in rows})
    if not settings:
        return
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, dp in zip(axes[0], settings, strict=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            own = sorted((r for r in rows if r["dp"] == dp and r["method"] == method), key=lambda r: r["alpha"])
            if own:
                ax.errorbar([r["alpha"] for r in own], [r["alma"] for r in own],
                            yerr=[r["alma-std"] for r in own], marker="o", capsize=3,
                            label=_label(own, method))
        ax.set(xscale="log", xlabel="Dirichlet α (label skew: small = strong)", ylabel="ALMA",
               ylim=(0, 1.02), title="with DP-SGD" if dp else "without DP")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ robustness


def robustness_points(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    n = load_config(args.config, overrides=_base_overrides(args)).data.num_clients
    points = []
    for method in args.methods:
        points.append((f"{method}/clean", method, {"fusion.method": method}))
        for fraction in args.fractions:
            bad = max(1, round(fraction * n))
            # adversaries spread over the federation (ids 0, n/bad, ...), so they run every architecture
            ids = sorted({int(i * n / bad) for i in range(bad)})
            for kind in args.kinds:
                clients = ",".join(f"{i}:{kind}" for i in ids)
                points.append((f"{method}/{kind}-{fraction:g}", method,
                               {"fusion.method": method, "adversary.clients": clients}))
    return points


def adversary_weight(run_dir: Path, adversaries: set[int]) -> dict[str, float]:
    """The adversaries' share of what honest sites are sent and of what they distil.

    Per round and honest receiver i (``weights/round_NNNN.npz``):

    * ``fused``: sum over adversaries j of w_ij, the fusion weight matrix the method saved
      (for ``expert`` w_ij = mean_{x, c} a_j(x, c), the sender's share of every (x, c)
      of F_i's evidence, :func:`fedkd.fusion.class_expert_fusion`; for mean 1/N);
    * ``consensus``: sum over adversaries of their share of the consensus G_i sent beside F_i
      (``consensus_weights``: mean_x g_ij(x)); absent when no consensus is sent;
    * ``chosen``: their share of the target site i distilled from round r's inbox, read from
      its ``target-lambda`` in round r + 1 (lambda x the F_i share for a blend, the G_i share
      for the consensus candidates, 0 for local training); the F_i share when the site does
      not choose (no ``target-lambda``). The last round's fusion is distilled by nobody.

    Returns ``{name: mean, name-max: largest}`` over all (round, honest receiver) pairs.
    """
    from fedkd.reporting import read_events

    lambdas = {(e["round"], e["client"]): e["target-lambda"] for e in read_events(run_dir, "client-train")
               if "target-lambda" in e}
    shares: dict[str, list[float]] = {"fused": [], "consensus": [], "chosen": []}
    paths = sorted((run_dir / "weights").glob("round_*.npz"))
    last = max((int(p.stem.split("_")[1]) for p in paths), default=0)
    for path in paths:
        round_number = int(path.stem.split("_")[1])
        data = np.load(path)
        clients = [int(c) for c in data["clients"]]
        bad = [k for k, c in enumerate(clients) if c in adversaries]
        honest = [k for k, c in enumerate(clients) if c not in adversaries]
        if not bad or not honest:
            continue
        fused = data["weights"][np.ix_(honest, bad)].sum(axis=1)
        shares["fused"].extend(fused)
        g = data["consensus_weights"][np.ix_(honest, bad)].sum(axis=1) if "consensus_weights" in data else None
        if g is not None:
            shares["consensus"].extend(g)
        if round_number == last:
            continue
        for row, k in enumerate(honest):
            lam = lambdas.get((round_number + 1, clients[k]))
            if lam is None:
                shares["chosen"].append(fused[row])
            elif lam < 0:  # -1 / -2 / -3 / -4: G, G under the prior, M, M under the prior (same shares)
                shares["chosen"].append(g[row] if g is not None else float("nan"))
            else:
                shares["chosen"].append(lam * fused[row])
    out: dict[str, float] = {}
    for name, values in shares.items():
        out[name] = float(np.mean(values)) if values else float("nan")
        out[f"{name}-max"] = float(np.max(values)) if values else float("nan")
    return out


def honest_alma(run_dir: Path, adversaries: set[int]) -> tuple[float, float]:
    """ALMA and worst accuracy over honest sites, last evaluated round (in ``run_dir``;
    with the clean run's directory, the same sites' figures without adversaries)."""
    from fedkd.reporting import read_events

    evals = read_events(run_dir, "client-eval")
    last = max(e["round"] for e in evals)
    acc = [e["accuracy"] for e in evals if e["round"] == last and e["client"] not in adversaries
           and math.isfinite(e["accuracy"])]
    return float(np.mean(acc)), float(np.min(acc))


def cmd_robustness(args: argparse.Namespace) -> int:
    points = robustness_points(args)
    if not args.report:
        _run_grid(args, points)
    rows = []
    for name, method, overrides in points:
        run_dir = args.out / name
        if _finished(args.out, name) is None:
            continue
        from fedkd.config import _parse_adversaries

        adversaries = set(_parse_adversaries(overrides.get("adversary.clients", ""), "random"))
        alma, worst = honest_alma(run_dir, adversaries)
        clean_dir = args.out / f"{method}/clean"
        clean_alma = honest_alma(clean_dir, adversaries)[0] if _finished(args.out, f"{method}/clean") else float("nan")
        weight = adversary_weight(run_dir, adversaries)
        setting = name.split("/", 1)[1]
        rows.append({"method": method, "label": method_label(method, run_dir), "setting": setting,
                     "adversaries": len(adversaries),
                     "honest-alma": alma, "honest-worst": worst, "clean-alma-same-sites": clean_alma,
                     "adversary-weight": weight["fused"], "adversary-weight-max": weight["fused-max"],
                     "adversary-consensus-weight": weight["consensus"],
                     "adversary-consensus-weight-max": weight["consensus-max"],
                     "adversary-chosen-weight": weight["chosen"], "adversary-chosen-weight-max": weight["chosen-max"]})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    table = robustness_table(rows)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    plot_robustness(rows, args.out)
    return 0


def robustness_table(rows: list[dict]) -> str:
    """Markdown: one row per method and setting; the adversaries' weight in honest rows
    (:func:`adversary_weight`) in F_i, in the consensus G_i, and in the target each honest
    site chose, each as mean / max over rounds and honest sites."""
    lines = ["| method | adversaries | honest sites' ALMA | same sites, no adversary | change | honest worst | "
             "adversaries' weight: F_i (mean / max) | G_i (mean / max) | chosen target (mean / max) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def pair(r: dict, key: str) -> str:
        mean, top = r.get(key, float("nan")), r.get(f"{key}-max", float("nan"))
        return "-" if not math.isfinite(mean) else f"{mean:.3f} / {top:.3f}"

    for r in rows:
        clean = r["setting"] == "clean"
        setting = "none (clean run)" if clean else f"{r['setting'].split('-')[0]} × {r['adversaries']}"
        weights = ["-"] * 3 if clean else [pair(r, k) for k in ("adversary-weight", "adversary-consensus-weight",
                                                                   "adversary-chosen-weight")]
        ref = "-" if clean else f"{r['clean-alma-same-sites']:.3f}"
        change = "-" if clean else f"{r['honest-alma'] - r['clean-alma-same-sites']:+.3f}"
        lines.append(f"| {_label([r], r['method'])} | {setting} | {r['honest-alma']:.3f} | "
                     f"{ref} | {change} | {r['honest-worst']:.3f} | {' | '.join(weights)} |")
    return "\n".join(lines)


def plot_robustness(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["setting"].split("-")[0] for r in rows if r["setting"] != "clean"})
    if not kinds:
        return
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 7), squeeze=False)
    for col, kind in enumerate(kinds):
        for method in dict.fromkeys(r["method"] for r in rows):
            clean = [r for r in rows if r["method"] == method and r["setting"] == "clean"]
            own = sorted((r for r in rows if r["method"] == method and r["setting"].startswith(kind + "-")),
                         key=lambda r: r["adversaries"])
            pts = [(0, clean[0])] if clean else []
            pts += [(r["adversaries"], r) for r in own]
            if not pts:
                continue
            label = _label([p[1] for p in pts], method)
            axes[0, col].plot([p[0] for p in pts], [p[1]["honest-alma"] for p in pts], marker="o", label=label)
            axes[1, col].plot([p[0] for p in pts if p[0]], [p[1]["adversary-weight"] for p in pts if p[0]],
                              marker="o", label=label)
        axes[0, col].set(title=f"{kind} knowledge", ylabel="honest sites' ALMA", ylim=(0, 1.02))
        axes[1, col].set(xlabel="adversarial sites", ylabel="adversaries' weight in honest rows", ylim=(0, 1.02))
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "robustness.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ CLI


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.studies.benchmark",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="study", required=True)

    def common(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument("--config", type=Path, default=Path("simulations/digits.toml"))
        p.add_argument("--out", type=Path, default=Path(out))
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--rounds", type=int, default=0, help="num-server-rounds (0 = the config's)")
        p.add_argument("--runner", choices=("floor", "flower"), default="floor")
        p.add_argument("--report", action="store_true", help="only rebuild tables and plots")

    p = sub.add_parser("accuracy", help="methods x Dirichlet alpha x seeds, with and without DP")
    common(p, "runs/bench/accuracy")
    p.add_argument("--methods", type=_words, default=[*KD_METHODS, "fedavg"])
    p.add_argument("--alphas", type=_floats, default=list(ALPHAS))
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--dp", choices=("off", "on", "both"), default="both")
    p.add_argument("--epsilon", type=float, default=4.0, help="privacy.target-epsilon of the DP half")
    p.add_argument("--fedavg-model", default="mlp-large", help="FedAvg's one architecture")
    p.set_defaults(func=cmd_accuracy)

    p = sub.add_parser("robustness", help="adversarial sites sending random / flipped knowledge")
    common(p, "runs/bench/robustness")
    p.add_argument("--methods", type=_words, default=["mean", "era", "knfu"])
    p.add_argument("--fractions", type=_floats, default=[0.1, 0.2, 0.3])
    p.add_argument("--kinds", type=_words, default=["random", "flip"])
    p.set_defaults(func=cmd_robustness)

    for name, help_ in (("communication", "bytes per site per round, knowledge vs FedAvg"),
                        ("speed", "simulation time vs the floor (framework overhead)"),
                        ("scale", "largest federation the simulation engine runs")):
        p = sub.add_parser(name, help=help_)
        common(p, f"runs/bench/{name}")
        p.add_argument("--sites", type=_ints, default=[10, 100] if name == "speed" else [100, 200, 500])
        p.set_defaults(func=_lazy(name))

    args = parser.parse_args(argv)
    return args.func(args)


def _lazy(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        module = importlib.import_module(f"simulations.studies.{'speed' if name == 'scale' else name}")
        return module.main(args)

    return run


if __name__ == "__main__":
    sys.exit(main())
