"""The ``fedkd`` command line.

    fedkd simulate [--config FILE] [--set key=value ...]   one federation (simulation engine)
    fedkd study    [--config FILE] [--methods none,mean,era,knfu] [--set ...]
                                                          one run per fusion method + table
    fedkd compare  RUN_DIR [RUN_DIR ...]                  table over finished runs
    fedkd options                                         every config key, default, meaning

Bad input ends with a one-line ``fedkd: error: ...`` per problem and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import datetime
from pathlib import Path

from fedkd.config import Config, ConfigError, describe_options, load_config, parse_overrides
from fedkd.data import DataUnavailableError
from fedkd.reporting import compare_table

STUDY_METHODS = ("none", "mean", "era", "knfu")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="TOML config file (see `fedkd options`)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set fusion.method=mean --set data.alpha=0.5",
    )
    parser.add_argument("--verbose", action="store_true", help="Flower's debug logging")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides=parse_overrides(args.overrides))


def _simulate(config: Config, verbose: bool) -> Path:
    # Flower is imported only here: the rest of fedkd stays importable without it.
    from simulations.runner import simulate

    return simulate(config, verbose=verbose)


def cmd_simulate(args: argparse.Namespace) -> int:
    config = _config(args)
    run_dir = _simulate(config, args.verbose)
    print(compare_table([run_dir]))
    print(f"\nrun directory: {run_dir}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    config = _config(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:  # validate every method before spending minutes on the first
        load_config(args.config, overrides={**parse_overrides(args.overrides), "fusion.method": method})
    study = config.run_name or f"study-{datetime.now():%Y%m%d-%H%M%S}"
    run_dirs = []
    for i, method in enumerate(methods, 1):
        print(f"[{i}/{len(methods)}] fusion method '{method}'", file=sys.stderr, flush=True)
        run_config = dataclasses.replace(
            config,
            run_name=f"{study}/{method}",
            fusion=dataclasses.replace(config.fusion, method=method),
        )
        run_dirs.append(_simulate(run_config, args.verbose))
    table = compare_table(run_dirs)
    study_dir = run_dirs[0].parent
    (study_dir / "comparison.txt").write_text(table + "\n")
    print(table)
    print(f"\nruns and plots under: {study_dir}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    print(compare_table(args.run_dirs))
    return 0


def cmd_options(args: argparse.Namespace) -> int:
    print(describe_options())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedkd", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run one federation on Flower's simulation engine")
    _add_config_arguments(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("study", help="run one federation per fusion method and compare them")
    _add_config_arguments(p)
    p.add_argument("--methods", default=",".join(STUDY_METHODS),
                   help="comma-separated fusion methods (default: %(default)s)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("compare", help="table over finished run directories")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("options", help="list every config key with its default and meaning")
    p.set_defaults(func=cmd_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        for problem in err.problems:
            print(f"fedkd: error: {problem}", file=sys.stderr)
    except (DataUnavailableError, FileNotFoundError, FileExistsError) as err:
        print(f"fedkd: error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("fedkd: interrupted; the run directory keeps what was recorded", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
