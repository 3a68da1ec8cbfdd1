"""What the ``fedkd`` commands share: the ``--config`` / ``--set`` / ``--verbose``
arguments, loading the configuration they name, and turning errors into
``fedkd: error: ...`` lines and exit statuses.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from fedkd.checkpoint import CheckpointError
from fedkd.config import Config, ConfigError, load_config, parse_overrides
from fedkd.data import DataUnavailableError
from fedkd.federation.loop import RoundFailed


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="TOML config file (see `fedkd options`)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set fusion.method=mean --set data.alpha=0.5",
    )
    parser.add_argument("--verbose", action="store_true", help="Flower's debug logging")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides=parse_overrides(args.overrides))


def config_from_args_with_resume(args: argparse.Namespace) -> Config:
    overrides = parse_overrides(args.overrides)
    if args.resume:
        overrides["checkpoint.resume"] = True
    return load_config(args.config, overrides=overrides)


def run_reporting_errors(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``command(args)``; bad input ends with a one-line ``fedkd: error: ...`` per problem
    and exit status 2, an interrupt with 130, a closed output pipe quietly with 0."""
    try:
        return command(args)
    except ConfigError as err:
        for problem in err.problems:
            print(f"fedkd: error: {problem}", file=sys.stderr)
    except (DataUnavailableError, FileNotFoundError, FileExistsError, ValueError, TimeoutError,
            CheckpointError, RoundFailed) as err:  # RoundFailed: the run could not start or go on
        print(f"fedkd: error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("fedkd: interrupted; the run directory keeps what was recorded", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 2
