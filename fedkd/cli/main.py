"""The ``fedkd`` command line.

    fedkd simulate [--config FILE] [--set key=value ...]   one federation (simulation engine)
                   [--runner flower|inprocess] [--ray-address HOST:PORT]
    fedkd study    [--config FILE] [--methods none,mean,era,knfu] [--set ...]
                   [--runner ...] [--ray-address ...]     one run per fusion method + table
    fedkd compare  RUN_DIR|STUDY_DIR ... [--format text|csv|md|json]
                                                          table over finished runs
    fedkd options                                         every config key, default, meaning
    fedkd audit    RUN_DIR | --sweep [--config FILE] [--set ...]
                                                          privacy-leakage audit of a run, or the
                                                          shielding / DP trade-off study (docs/audit.md)
    fedkd deploy   certs|keys|export-partitions|connect|superlink|register|supernode|run|plan
                                                          multi-host deployment (docs/deployment.md)

Bad input ends with a one-line ``fedkd: error: ...`` per problem and exit status 2; a run
that did not complete (status other than "completed") with exit status 1; Ctrl-C with 130.

This module holds the parser, :func:`main` and the simulate / study / compare / options /
audit commands; ``fedkd deploy ...`` is in :mod:`fedkd.cli.deploy`, the arguments and
error handling every command shares in :mod:`fedkd.cli.args`. Federations start only
through :mod:`fedkd.engine`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from datetime import datetime
from pathlib import Path

from fedkd.cli.args import (
    add_config_arguments,
    config_from_args,
    config_from_args_with_resume,
    run_reporting_errors,
)
from fedkd.cli.deploy import add_deploy_parsers
from fedkd.config import Config, ConfigError, describe_options, load_config, parse_overrides
from fedkd.engine import launch_audit_sweep, launch_fedavg, launch_inprocess, launch_simulation
from fedkd.reporting import COMPARE_FORMATS, compare_table, default_run_name, find_runs, plot_study, read_summary

FEDAVG = "fedavg"
STUDY_METHODS = ("none", "mean", "era", "knfu", "expert", FEDAVG)
"""The default study: the fusion methods, then FedAvg (``fedavg``: not a fusion method but
the weight-averaging baseline, run in process on one architecture, :func:`fedkd.engine.fedavg_architecture`)."""


def _resumable(config: Config) -> Config:
    """Name the run now and keep the simulated sites' state in its directory, so that
    ``--resume`` can continue it exactly after an interruption."""
    name = config.run_name or default_run_name(config)
    state_dir = config.checkpoint.site_state_dir or str(Path(config.output_dir).resolve() / name / "site-state")
    return dataclasses.replace(
        config, run_name=name, checkpoint=dataclasses.replace(config.checkpoint, site_state_dir=state_dir)
    )


def exit_status(run_dirs: list[Path]) -> int:
    """0 when every run completed; else 1, with one ``fedkd: error:`` line per run that did not."""
    failed = 0
    for run_dir in run_dirs:
        status = read_summary(run_dir)["status"]
        if status != "completed":
            print(f"fedkd: error: run {run_dir.name} did not complete: {status}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


RUNNERS = ("flower", "inprocess")


def _launch(config: Config, args: argparse.Namespace) -> Path:
    """One federation of ``config`` with ``--runner`` (Flower's simulation engine, on the Ray
    cluster of ``--ray-address`` if given; or in this process), its run directory."""
    if args.runner == "inprocess":
        if args.ray_address:
            raise ConfigError(["--ray-address: only the flower runner runs on a Ray cluster; "
                               "--runner is inprocess"])
        return launch_inprocess(config)
    return launch_simulation(config, verbose=args.verbose, ray_address=args.ray_address)


def cmd_simulate(args: argparse.Namespace) -> int:
    config = _resumable(config_from_args_with_resume(args))
    run_dir = _launch(config, args)
    print(compare_table([run_dir]))
    print(f"\nrun directory: {run_dir}")
    return exit_status([run_dir])


def method_folder(method: str) -> str:
    """A study's folder for one method: the name, with a plugin's import path made a plain
    file name (``mypkg.fusion:rule`` -> ``mypkg.fusion-rule``; ':' is not portable in paths).

    >>> method_folder("mypkg.fusion:rule"), method_folder("expert")
    ('mypkg.fusion-rule', 'expert')
    """
    return re.sub(r"[^A-Za-z0-9._-]", "-", method)


def cmd_study(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:  # validate every method before spending minutes on the first
        if method != FEDAVG:
            load_config(args.config, overrides={**parse_overrides(args.overrides), "fusion.method": method})
    study = config.run_name or f"study-{datetime.now():%Y%m%d-%H%M%S}"
    run_dirs = []
    for i, method in enumerate(methods, 1):
        what = ("FedAvg (the baseline: one architecture, weights averaged, in process)" if method == FEDAVG
                else f"fusion method '{method}'")
        print(f"[{i}/{len(methods)}] {what}", file=sys.stderr, flush=True)
        run_config = dataclasses.replace(
            config,
            run_name=f"{study}/{method_folder(method)}",
            fusion=config.fusion if method == FEDAVG else dataclasses.replace(config.fusion, method=method),
        )
        run_dirs.append(launch_fedavg(run_config) if method == FEDAVG else _launch(run_config, args))
    table = compare_table(run_dirs)
    study_dir = run_dirs[0].parent
    (study_dir / "comparison.txt").write_text(table + "\n")
    plot_study(run_dirs, out_dir=study_dir)
    print(table)
    print(f"\nruns and plots under: {study_dir}")
    return exit_status(run_dirs)


def cmd_compare(args: argparse.Namespace) -> int:
    print(compare_table(find_runs(args.run_dirs), format=args.format))
    return 0


def cmd_options(args: argparse.Namespace) -> int:
    print(describe_options())
    return 0


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError([f"{what}: expected comma-separated numbers; got {text!r}"]) from None


def cmd_audit(args: argparse.Namespace) -> int:
    from fedkd.audit.report import write_audit_report

    if args.sweep == bool(args.run_dir):
        raise ConfigError(["fedkd audit: give either a RUN_DIR to audit or --sweep"])
    if not args.sweep:
        from fedkd.audit.run import audit_run

        result, scores = audit_run(args.run_dir, overrides=parse_overrides(args.overrides),
                                   progress=not args.quiet)
        written = write_audit_report(args.run_dir / "audit", result, scores)
        from fedkd.audit.report import audit_markdown

        print(audit_markdown(result))
        print(f"report: {', '.join(str(p) for p in written)}")
        return 0

    from fedkd.audit.sweep import DIGITS_SWEEP, sweep_settings

    overrides = parse_overrides(args.overrides)
    if args.config is None:
        overrides = {**DIGITS_SWEEP, **overrides}
    base = load_config(args.config, overrides={**overrides, "audit.enabled": True})
    settings = sweep_settings(
        temperatures=_floats(args.temperatures, "--temperatures"), noises=_floats(args.noise, "--noise"),
        epsilons=_floats(args.epsilons, "--epsilons"),
        release_epsilons=_floats(args.release_epsilons, "--release-epsilons"),
        kinds=[k.strip() for k in args.settings.split(",") if k.strip()],
    )
    for setting in settings:  # refuse a bad setting (e.g. an unreachable epsilon) before the first run
        from fedkd.audit.sweep import setting_config
        from fedkd.data import load_federation
        from fedkd.privacy import check_privacy_plans

        config = setting_config(base, setting, sweep_name="check")
        check_privacy_plans(config, [len(c.train) for c in load_federation(config.data, config.seed).clients])
    name = base.run_name or f"audit-sweep-{datetime.now():%Y%m%d-%H%M%S}"
    command = "fedkd " + " ".join(sys.argv[1:])
    sweep_dir, _ = launch_audit_sweep(
        base, settings, sweep_name=name, command=command.strip(), progress=not args.quiet,
        prepare=_resumable, verbose=args.verbose,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print((sweep_dir / "sweep.md").read_text())
    print(f"sweep report and plots: {sweep_dir}")
    return exit_status(sorted(p for p in sweep_dir.iterdir() if (p / "summary.json").is_file()))


def _add_runner_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runner", choices=RUNNERS, default="flower",
                        help="flower (default): Flower's simulation engine; inprocess: the same round loop "
                             "in this process, no Flower or Ray (the same numbers; no --resume, audit or "
                             "identities)")
    parser.add_argument("--ray-address", metavar="HOST:PORT", default=None,
                        help="run the sites on the running Ray cluster at HOST:PORT (`ray start --head` "
                             "prints it; default: $RAY_ADDRESS, else a Ray instance of this process)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedkd", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run one federation on Flower's simulation engine")
    add_config_arguments(p)
    _add_runner_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped run named by run-name from its last checkpoint")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("study", help="run one federation per fusion method and compare them")
    add_config_arguments(p)
    _add_runner_arguments(p)
    p.add_argument("--methods", default=",".join(STUDY_METHODS),
                   help="comma-separated fusion methods, and fedavg for the FedAvg baseline "
                        "(in process, one architecture) (default: %(default)s)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("compare", help="table over finished run directories (or study folders)")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run directories, or folders of runs such as a study's")
    p.add_argument("--format", choices=COMPARE_FORMATS, default="text",
                   help="text (default), csv, md (Markdown) or json")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("options", help="list every config key with its default and meaning")
    p.set_defaults(func=cmd_options)

    p = sub.add_parser("audit", help="privacy-leakage audit of a finished run (recorded with "
                       "audit.enabled), or --sweep: the shielding / DP trade-off study")
    p.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR", help="run directory to audit")
    p.add_argument("--sweep", action="store_true",
                   help="run and audit one federation per protection setting, then write the report")
    add_config_arguments(p)
    p.add_argument("--temperatures", default="4,16", help="--sweep: shielding temperatures (default: %(default)s)")
    p.add_argument("--noise", default="1,4", help="--sweep: shielding logit noise levels (default: %(default)s)")
    p.add_argument("--epsilons", default="1,4,16", help="--sweep: DP epsilons (default: %(default)s)")
    p.add_argument("--release-epsilons", default="1,4",
                   help="--sweep: label-rr epsilons per released label and round (default: %(default)s)")
    p.add_argument("--settings", default="none,temperature,noise,shield,dp,both,release,dp-release",
                   help="--sweep: which kinds of settings to run (default: %(default)s; also "
                   "'withhold', text data only: nothing released on rows whose text looks like personal data)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_audit)

    add_deploy_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
