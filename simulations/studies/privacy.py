"""Accuracy against privacy: the default study at several whole-run epsilons versus no DP.

    python -m simulations.studies.privacy --config simulations/digits.toml \
        --epsilons none,1,4,8 --methods mean,knfu --out runs/privacy-study

Runs one federation per (method, epsilon) on Flower's simulation engine (or, with
``--runner floor``, with the same functions in one process: simulations/floor.py, equal
to the simulation for the same config and seeds, several times faster), then prints and
writes (``OUT/table.md``) a Markdown table of ALMA, worst-site accuracy, global-student
accuracy and the largest epsilon any site spent. Finished runs in OUT are reused, so an
interrupted study is resumed by running the same command again.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from fedkd.config import load_config, parse_overrides
from fedkd.reporting import read_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--epsilons", default="none,1,4,8", help="comma list; 'none' = without DP")
    parser.add_argument("--methods", default="mean,knfu")
    parser.add_argument("--out", type=Path, default=Path("runs/privacy-study"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--runner", choices=("simulation", "floor"), default="simulation",
                        help="Flower's simulation engine, or the single-process floor (same results)")
    args = parser.parse_args(argv)

    from simulations.floor import run_floor
    from simulations.runner import simulate

    epsilons = [None if e.strip() == "none" else float(e) for e in args.epsilons.split(",") if e.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    for method in methods:
        for eps in epsilons:
            label = "no DP" if eps is None else f"{eps:g}"
            name = f"{method}-eps-{'inf' if eps is None else f'{eps:g}'}"
            print(f"[{len(rows) + 1}/{len(methods) * len(epsilons)}] {method}, epsilon {label}",
                  file=sys.stderr, flush=True)
            overrides = {
                **parse_overrides(args.overrides),
                "output-dir": str(args.out.resolve()),
                "run-name": name,
                "fusion.method": method,
                "privacy.enabled": eps is not None,
            }
            if eps is not None:
                overrides["privacy.target-epsilon"] = eps
            run_dir = args.out.resolve() / name
            finished = (run_dir / "summary.json").is_file() and \
                read_summary(run_dir).get("status") == "completed"
            if finished:  # an interrupted study picks up where it stopped
                print(f"  {name}: already finished, reusing {run_dir}", file=sys.stderr)
            elif args.runner == "floor":
                if run_dir.exists():  # an interrupted floor run cannot resume: start it again
                    shutil.rmtree(run_dir)
                run_dir = run_floor(load_config(args.config, overrides=overrides))
            else:
                run_dir = simulate(load_config(args.config, overrides=overrides))
            summary = read_summary(run_dir)
            ledger = summary["privacy"]["ledger"].values()
            spent = max((e["epsilon-spent"] for e in ledger), default=None)
            final = summary["final"]
            rows.append(
                f"| {method} | {label} | {final['alma']:.3f} | {final['worst']:.3f} | "
                f"{final.get('global-accuracy', float('nan')):.3f} | "
                f"{'-' if spent is None else f'{spent:.2f}'} |"
            )
    table = "\n".join(
        ["| method | target ε | ALMA | worst site | global student | max ε spent |",
         "|---|---|---|---|---|---|", *rows]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
