"""``fedkd deploy ...``: the multi-host deployment commands (docs/deployment.md) and
their parsers.

    fedkd deploy certs              CA + the SuperLink's TLS certificate
    fedkd deploy keys               SuperNode authentication key pairs
    fedkd deploy export-partitions  public.npz + one site-<i>.npz per site
    fedkd deploy connect            the SuperLink in the flwr CLI's configuration
    fedkd deploy superlink          start the SuperLink (TLS + SuperNode authentication) on
                                    loopback and its front (the Fleet API only) on the network
    fedkd deploy front              the front alone (fedkd deploy superlink starts it)
    fedkd deploy register           register SuperNode public keys
    fedkd deploy supernode          start this site's SuperNode and its app guard
    fedkd deploy run                submit a run (the resolved config), optionally wait
    fedkd deploy plan               every command of a deployment, host by host

The files and commands themselves come from :mod:`fedkd.ops.deploy`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import datetime
from pathlib import Path

from fedkd.cli.args import add_config_arguments, config_from_args, config_from_args_with_resume
from fedkd.config import ConfigError
from fedkd.reporting import compare_table, default_run_name


def cmd_deploy_certs(args: argparse.Namespace) -> int:
    from fedkd.ops.deploy import certificate_hosts, write_certificates

    paths = write_certificates(args.out, hosts=args.host, days=args.days, overwrite=args.force)
    print(f"CA certificate      {paths.ca_cert}   -> every site and the operator's flwr CLI")
    print(f"CA private key      {paths.ca_key}   -> keep offline (0600)")
    print(f"server certificate  {paths.server_cert}  -> SuperLink host")
    print(f"server private key  {paths.server_key}  -> SuperLink host only (0600)")
    print(f"valid {args.days} days for: {', '.join(certificate_hosts(paths.server_cert))}")
    return 0


def cmd_deploy_keys(args: argparse.Namespace) -> int:
    from fedkd.identity import PLAN_FILE
    from fedkd.ops.deploy import _refuse_overwrite, write_identity_plan, write_supernode_keys

    if not args.no_plan:  # before any key is written: a refused plan leaves no half-made folder
        _refuse_overwrite([args.out / PLAN_FILE], args.force)
    pairs = write_supernode_keys(args.out, args.names, overwrite=args.force)
    for pair in pairs:
        print(f"{pair.name}: private {pair.private} (site host only, 0600); "
              f"public {pair.public} (register it: fedkd deploy register {pair.public})")
    if not args.no_plan:
        plan = write_identity_plan(args.out, pairs, overwrite=args.force)
        print(f"identity plan {plan}: " + ", ".join(f"partition {i} = {p.name}" for i, p in enumerate(pairs))
              + " (server host; fedkd deploy run uses it)")
    return 0


def cmd_deploy_export(args: argparse.Namespace) -> int:
    from fedkd.ops.deploy import export_partitions

    config = config_from_args(args)
    files = export_partitions(config, args.out, overwrite=args.force)
    width = max(len(str(f.path)) for f in files)
    print(f"{'file'.ljust(width)}  examples  sha256")
    for f in files:
        print(f"{str(f.path).ljust(width)}  {f.examples:8d}  {f.sha256}")
    print(f"\npublic set fingerprint (ordered ids and inputs): {_public_fingerprint(files[0].path)}")
    print("copy public.npz to every site and site-<i>.npz to site i only; check the sha256 there")
    return 0


def _public_fingerprint(path: Path) -> str:
    from fedkd.data import load_public_file, public_fingerprint

    public = load_public_file(path)[0]
    return public_fingerprint(public.ids, public.x)


def cmd_deploy_connect(args: argparse.Namespace) -> int:
    from fedkd.ops.deploy import Deployment, address_problem, connection_toml, flwr_home, write_file

    problem = address_problem(args.superlink)
    if problem:
        raise ConfigError([problem])
    if not args.insecure:
        if args.ca is None:
            raise ConfigError(["--ca: give the CA certificate (ca.crt), or --insecure"])
        if not args.ca.is_file():
            raise FileNotFoundError(f"CA certificate not found: {args.ca}")
    path = flwr_home() / "config.toml"
    existing = path.read_text() if path.is_file() else ""
    deployment = Deployment(address=args.superlink, insecure=args.insecure, connection=args.name)
    write_file(path, connection_toml(deployment, root_certificates=args.ca, existing=existing))
    print(f"SuperLink connection '{args.name}' -> {args.superlink} written to {path}")
    return 0


def _run_or_print(cmd: list[str], dry_run: bool, *, exec_: bool = False) -> int:
    import os
    import subprocess

    from fedkd.ops.deploy import flower_env, shell_line

    print(shell_line(cmd), flush=True)
    if dry_run:
        return 0
    if exec_:  # hand the process over to Flower (signals, exit status: as if run directly)
        os.execvpe(cmd[0], cmd, flower_env())
    return subprocess.run(cmd, env=flower_env(), check=False).returncode


def _need_files(**paths: Path | None) -> None:
    missing = [f"{name.replace('_', '-')} {path}" for name, path in paths.items()
               if path is not None and not Path(path).is_file()]
    if missing:
        raise FileNotFoundError("not found: " + "; ".join(missing))


def cmd_deploy_superlink(args: argparse.Namespace) -> int:
    from fedkd.ops.deploy import (
        CA_CERT,
        SERVER_CERT,
        SERVER_KEY,
        Deployment,
        flower_env,
        front_command,
        run_together,
        shell_line,
        superlink_command,
    )

    deployment = Deployment(address=f"{args.host}:{args.port}", certs_dir=args.certs, insecure=args.insecure,
                            control_port=args.control_port)
    if not args.insecure and not args.dry_run:
        _need_files(ca=args.certs / CA_CERT, certificate=args.certs / SERVER_CERT, key=args.certs / SERVER_KEY)
    if args.no_front:
        print("fedkd: warning: --no-front: the Control API (submit runs, register and unregister nodes) is "
              f"open to everyone who reaches {args.host}:{args.port}", file=sys.stderr)
        return _run_or_print(superlink_command(deployment, bind_host=args.host, port=args.port,
                                               database=args.database), args.dry_run, exec_=True)
    if args.control_port == args.port:
        raise ConfigError([f"--control-port: must differ from --port; got {args.control_port} for both"])
    commands = {"superlink": superlink_command(deployment, database=args.database),
                "front": front_command(deployment, bind_host=args.host)}
    for cmd in commands.values():
        print(shell_line(cmd), flush=True)
    print(f"# sites reach {args.host}:{args.port} (Fleet API only); the operator's flwr CLI, on this host: "
          f"fedkd deploy connect --superlink {deployment.control_address}"
          + (" --insecure" if args.insecure else f" --ca {args.certs / CA_CERT}"), flush=True)
    if args.dry_run:
        return 0
    return run_together(commands, env=flower_env())


def cmd_deploy_front(args: argparse.Namespace) -> int:
    from fedkd.ops.deploy import address_problem
    from fedkd.ops.front import serve_front

    problem = address_problem(args.upstream, key="--upstream")
    if problem:
        raise ConfigError([problem])
    serve_front(host=args.host, port=args.port, upstream=args.upstream, certs_dir=args.certs,
                insecure=args.insecure)
    return 0


def cmd_deploy_register(args: argparse.Namespace) -> int:
    from fedkd.ops.deploy import Deployment, register_command

    deployment = Deployment(connection=args.connection)
    if not args.dry_run:
        _need_files(**{f"key_{i}": key for i, key in enumerate(args.keys)})
    codes = [_run_or_print(register_command(deployment, key), args.dry_run) for key in args.keys]
    return max(codes)


def cmd_deploy_supernode(args: argparse.Namespace) -> int:
    from fedkd.data import load_public_file, load_site_file
    from fedkd.ops.deploy import flower_env, guard_command, run_together, shell_line, supernode_command

    node: dict[str, object] = {"partition-id": args.partition_id}
    identity_key = args.key if args.key and not args.insecure and not args.no_identity else None
    for key, value in (("public-path", args.public), ("data-path", args.data), ("state-dir", args.state_dir),
                       ("model", args.model), ("dataset", args.dataset), ("dataset-path", args.dataset_path),
                       ("identity-key", identity_key)):
        if value:
            node[key] = str(Path(value).resolve()) if key.endswith(("path", "dir", "key")) else str(value)
    if not args.dry_run:
        if not args.insecure:
            _need_files(ca=args.ca, key=args.key)
        if args.public:  # fail here, not in round 1, on a missing or foreign data file
            public, num_classes = load_public_file(args.public)
            if args.data:
                load_site_file(args.data, partition_id=args.partition_id, num_classes=num_classes,
                               input_shape=tuple(public.x.shape[1:]))
        if args.state_dir:
            Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    cmd = supernode_command(superlink=args.superlink, node_config=node, root_certificates=args.ca,
                            private_key=args.key, insecure=args.insecure, runtime_port=args.runtime_port,
                            max_wait_time=args.max_wait_time, isolation=args.isolation)
    if args.isolation == "subprocess":
        print("fedkd: warning: --isolation subprocess: this SuperNode runs any app the SuperLink hands out",
              file=sys.stderr)
        return _run_or_print(cmd, args.dry_run, exec_=True)
    commands = {"supernode": cmd, "app-guard": guard_command(runtime_port=args.runtime_port,
                                                             allow_plugins=args.allow_plugin,
                                                             fab_hashes=args.fab_hash)}
    for line in commands.values():
        print(shell_line(line), flush=True)
    if args.dry_run:
        return 0
    return run_together(commands, env=flower_env())


def cmd_deploy_run(args: argparse.Namespace) -> int:
    import json
    import subprocess
    import time

    from fedkd.ops.deploy import (
        Deployment,
        RunEnded,
        app_pyproject,
        flower_env,
        run_command,
        run_status,
        shell_line,
        wait_for_summary,
    )
    from fedkd.ops.tempdirs import owned_temp_dir

    config = config_from_args_with_resume(args)
    config = _with_identities(config, args)
    name = config.run_name or default_run_name(config)
    config = dataclasses.replace(config, run_name=name, output_dir=str(Path(config.output_dir).resolve()))
    run_dir = Path(config.output_dir) / name
    with owned_temp_dir("fedkd-deploy-app-") as app_dir:
        (Path(app_dir) / "pyproject.toml").write_text(app_pyproject(config))
        cmd = run_command(Deployment(connection=args.connection), app_dir, {}) + ["--format", "json"]
        print(shell_line(cmd), flush=True)
        if args.dry_run:
            return 0
        submitted = time.time()
        done = subprocess.run(cmd, env=flower_env(), capture_output=True, text=True, check=False)
    try:
        run_id = json.loads(done.stdout)["run-id"]
    except (ValueError, KeyError, TypeError):
        print(f"fedkd: error: flwr run failed (exit {done.returncode}):\n{done.stdout}{done.stderr}",
              file=sys.stderr)
        return 1
    print(f"run {run_id} submitted ({'resuming ' if config.checkpoint.resume else ''}{name}); "
          f"outputs on the server host in {run_dir}")
    print(f"follow it: flwr log {run_id} {args.connection} --stream;  stop it: flwr stop {run_id} {args.connection}")
    if args.wait:
        def ended() -> str | None:
            status, details = run_status(int(run_id), args.connection)
            return f"{status}: {details}" if status.startswith("finished") else None

        try:
            wait_for_summary(run_dir, newer_than=submitted, timeout=args.timeout, ended=ended)
        except RunEnded as err:
            print(f"fedkd: error: run {run_id} ended without a summary ({err}); "
                  f"see flwr log {run_id} {args.connection}", file=sys.stderr)
            return 1
        print(compare_table([run_dir]))
        from fedkd.reporting import read_summary

        status = read_summary(run_dir)["status"]
        print(f"\nstatus: {status}\nrun directory: {run_dir}")
        return 0 if status == "completed" else 1
    return 0


def _with_identities(config, args: argparse.Namespace):  # noqa: ANN001, ANN202
    """The run config with ``identity.site-keys`` = the plan (``--site-keys``, default
    ``keys/sites.toml`` when it exists), as an absolute path, unless the config names one or
    ``--no-identity``; the plan is checked here, so a bad one is refused before submitting."""
    from fedkd.identity import IdentityError, load_site_keys

    path = config.identity.site_keys
    if not path and not args.no_identity:
        if args.site_keys is not None:
            path = str(args.site_keys.resolve())
        elif Path("keys/sites.toml").is_file():
            path = str(Path("keys/sites.toml").resolve())
    if not path:
        print("fedkd: warning: identities off (no identity plan: keys/sites.toml, --site-keys); "
              "a partition id is then only a claim", file=sys.stderr)
        return config
    try:
        load_site_keys(path, num_clients=config.data.num_clients)
    except IdentityError as err:
        raise ConfigError([str(err)]) from None
    print(f"identities on: replies must be signed with the keys in {path}")
    return dataclasses.replace(config, identity=dataclasses.replace(config.identity, site_keys=path))


def cmd_deploy_plan(args: argparse.Namespace) -> int:
    from fedkd.ops.deploy import Deployment, deployment_plan

    names = args.sites or [f"site-{i}" for i in range(args.num_sites)]
    deployment = Deployment(address=args.superlink, certs_dir=args.certs, keys_dir=args.keys,
                            insecure=args.insecure)
    print(deployment_plan(deployment, sites=names, server_host=args.superlink.rsplit(":", 1)[0],
                          data_dir=args.data_dir, state_dir=args.state_dir))
    return 0


def add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    from fedkd.ops.deploy import DEFAULT_CONNECTION, DEFAULT_CONTROL_PORT, DEFAULT_PORT

    deploy = sub.add_parser("deploy", help="run on Flower's deployment engine: one SuperLink, "
                            "one SuperNode per site host (docs/deployment.md)")
    dsub = deploy.add_subparsers(dest="deploy_command", required=True)

    p = dsub.add_parser("certs", help="create a CA and the SuperLink's TLS certificate")
    p.add_argument("--out", type=Path, default=Path("certs"), help="output folder (default: %(default)s)")
    p.add_argument("--host", action="append", required=True,
                   help="a name or IP address sites use to reach the SuperLink (repeat for each)")
    p.add_argument("--days", type=int, default=365, help="validity (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_deploy_certs)

    p = dsub.add_parser("keys", help="create SuperNode authentication key pairs")
    p.add_argument("names", nargs="+", help="one name per site, e.g. site-a site-b")
    p.add_argument("--out", type=Path, default=Path("keys"), help="output folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.add_argument("--no-plan", action="store_true",
                   help="do not write sites.toml (the identity plan: the i-th name holds partition i)")
    p.set_defaults(func=cmd_deploy_keys)

    p = dsub.add_parser("export-partitions",
                        help="write public.npz and one site-<i>.npz per site from the run config's split")
    add_config_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_deploy_export)

    p = dsub.add_parser("connect", help="add the SuperLink to the flwr CLI's configuration ($FLWR_HOME)")
    p.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    p.add_argument("--ca", type=Path, help="CA certificate (ca.crt) that signed the SuperLink's")
    p.add_argument("--name", default=DEFAULT_CONNECTION, help="connection name (default: %(default)s)")
    p.add_argument("--insecure", action="store_true", help="plaintext connection (test networks only)")
    p.set_defaults(func=cmd_deploy_connect)

    p = dsub.add_parser("superlink", help="start the SuperLink: TLS + SuperNode authentication")
    p.add_argument("--certs", type=Path, default=Path("certs"),
                   help="folder with ca.crt, server.pem, server.key (default: %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="address the front listens on (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="the front's HTTPS port, for the sites (default: %(default)s)")
    p.add_argument("--control-port", type=int, default=DEFAULT_CONTROL_PORT,
                   help="the SuperLink's port on 127.0.0.1, for the operator's flwr CLI (default: %(default)s)")
    p.add_argument("--no-front", action="store_true",
                   help="no front: the SuperLink itself on --host:--port, Control API included (not advised)")
    p.add_argument("--database", help="SQLite file to keep registered nodes and runs across restarts")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication (test networks only)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.set_defaults(func=cmd_deploy_superlink)

    p = dsub.add_parser("front", help="the SuperLink's front alone: the Fleet API forwarded, the rest refused")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTPS port (default: %(default)s)")
    p.add_argument("--upstream", default=f"127.0.0.1:{DEFAULT_CONTROL_PORT}",
                   help="the SuperLink, HOST:PORT (default: %(default)s)")
    p.add_argument("--certs", type=Path, default=Path("certs"),
                   help="folder with ca.crt, server.pem, server.key (default: %(default)s)")
    p.add_argument("--insecure", action="store_true", help="plaintext both ways (test networks only)")
    p.set_defaults(func=cmd_deploy_front)

    p = dsub.add_parser("register", help="register SuperNode public keys with the SuperLink")
    p.add_argument("keys", nargs="+", type=Path, help="<name>.pub files")
    p.add_argument("--connection", default=DEFAULT_CONNECTION, help="flwr connection (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.set_defaults(func=cmd_deploy_register)

    p = dsub.add_parser("supernode", help="start this site's SuperNode")
    p.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    p.add_argument("--partition-id", type=int, required=True, help="this site's id (0-based)")
    p.add_argument("--ca", type=Path, help="CA certificate (ca.crt)")
    p.add_argument("--key", type=Path, help="this site's private key")
    p.add_argument("--public", type=Path, help="public set file (public.npz)")
    p.add_argument("--data", type=Path, help="this site's private data (.npz)")
    p.add_argument("--state-dir", type=Path, help="folder for the site's state after each round")
    p.add_argument("--model", help="this site's architecture (default: the run config's)")
    p.add_argument("--dataset", help="rebuild the split from this dataset name instead")
    p.add_argument("--dataset-path", type=Path, help="this host's copy of that dataset")
    p.add_argument("--no-identity", action="store_true",
                   help="do not sign replies with --key (a server with an identity plan refuses them)")
    p.add_argument("--runtime-port", type=int, default=9094,
                   help="local Runtime API port; distinct per SuperNode on one host (default: %(default)s)")
    p.add_argument("--isolation", choices=("process", "subprocess"), default="process",
                   help="process (default): the app guard runs only fedkd's app; subprocess: Flower runs any app")
    p.add_argument("--allow-plugin", action="append", default=[],
                   help="an import path (package.module:name) the run config may name; repeat")
    p.add_argument("--fab-hash", action="append", default=[],
                   help="run only apps with this sha256 (repeat; default: any app that is fedkd's)")
    p.add_argument("--max-wait-time", type=float, help="give up connecting after this many seconds")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication (test networks only)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.set_defaults(func=cmd_deploy_supernode)

    p = dsub.add_parser("run", help="submit a run (the resolved config) to the SuperLink")
    add_config_arguments(p)
    p.add_argument("--connection", default=DEFAULT_CONNECTION, help="flwr connection (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the stopped run named by run-name")
    p.add_argument("--site-keys", type=Path,
                   help="identity plan on the server host (default: keys/sites.toml when it exists)")
    p.add_argument("--no-identity", action="store_true",
                   help="partition ids taken as claimed (no signatures checked)")
    p.add_argument("--wait", action="store_true", help="wait for the summary (on the server host)")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="--wait limit in seconds")
    p.add_argument("--dry-run", action="store_true", help="print the command only")
    p.set_defaults(func=cmd_deploy_run)

    p = dsub.add_parser("plan", help="print every command of a deployment, host by host")
    p.add_argument("--superlink", required=True, help="HOST:PORT the sites will use")
    p.add_argument("--sites", nargs="*", help="site names (default: site-0 ... site-N-1)")
    p.add_argument("--num-sites", type=int, default=2, help="number of sites without --sites")
    p.add_argument("--certs", type=Path, default=Path("certs"))
    p.add_argument("--keys", type=Path, default=Path("keys"))
    p.add_argument("--data-dir", default="/srv/fedkd/data", help="data folder on the site hosts")
    p.add_argument("--state-dir", default="/srv/fedkd/state", help="state folder on the site hosts")
    p.add_argument("--insecure", action="store_true")
    p.set_defaults(func=cmd_deploy_plan)
