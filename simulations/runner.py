"""Launch a fedkd federation on Flower's simulation engine from Python or the CLI.

``flwr run .`` reads the run config from this project's ``pyproject.toml``; the fedkd
CLI instead resolves a config from any TOML file plus ``--set`` overrides. To hand that
resolved config to Flower exactly as ``flwr run`` would (as ``context.run_config`` on
the server and on every simulated site), the runner writes it into a minimal Flower
app directory and starts the simulation engine on it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import tomli_w

from fedkd.config import Config
from fedkd.data import load_federation
from fedkd.federation.preflight import check_site_models
from fedkd.ops.tempdirs import owned_temp_dir
from fedkd.plugins import config_plugins, export_search_path, plugin_search_path
from fedkd.privacy import check_privacy_plans
from fedkd.reporting import read_summary, run_directory

APP_DIR_PREFIX = "fedkd-app-"
"""The simulation's app folders, ``<tmp>/fedkd-app-<pid>-*``: a killed run's is removed at the next start."""

RAY_INIT_ARGS = {"include_dashboard": False, "_system_config": {"prestart_worker_first_driver": False}}
"""``ray.init`` arguments of the local Ray instance (Flower's backend config ``init_args``):
no dashboard (its HTTP server and agent), and no idle Python workers prestarted when the
first driver connects: Ray starts one per CPU for tasks without a runtime environment,
but Flower's actors all carry one (``PYTHONPATH``), so Ray never hands them those workers
and starts its own; the prestarted ones (each a Python process importing Ray) only took
CPU from the actors' start-up (docs/benchmarks.md, "Start-up"). Ray 2.55 binds its core gRPC servers (GCS, raylet's node and object
managers, every worker's core-worker server) to 0.0.0.0 and its runtime-env agent to the
host's primary address, whatever ``_node_ip_address`` says (measured with ``ss -ltnp``):
:func:`ray_token_auth` is what keeps other hosts out of them (docs/deployment.md)."""


def ray_token_auth(environ: dict | None = None) -> bool:
    """Turn on Ray's token authentication for the local Ray cluster the simulation starts
    (``RAY_AUTH_MODE=token`` and a fresh random ``RAY_AUTH_TOKEN`` in ``environ``, default
    ``os.environ``, which Ray's processes inherit), unless ``RAY_AUTH_MODE`` is set already
    (the caller's choice stands). Returns whether it turned it on."""
    import secrets

    environ = os.environ if environ is None else environ
    if "RAY_AUTH_MODE" in environ:
        return False
    environ["RAY_AUTH_MODE"] = "token"
    environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    environ.pop("RAY_AUTH_TOKEN_PATH", None)
    return True


# Each simulated site gets one CPU so that sites run side by side on small machines.
CLIENT_CPUS = 1


def _write_app_dir(directory: Path, config: Config) -> None:
    project = {
        "project": {"name": "fedkd-simulation", "version": "0.0.0"},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedkd",
                    "components": {
                        "serverapp": "server.server_app:app",
                        "clientapp": "clients.client_app:app",
                    },
                    "config": config.to_nested(),
                }
            }
        },
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(project))


def simulate(config: Config, *, verbose: bool = False, num_supernodes: int | None = None,
             ray_address: str | None = None) -> Path:
    """Run ``config`` through Flower's simulation engine with ``num_supernodes`` SuperNodes
    (default ``data.num-clients``; the ServerApp refuses any other number); return the run
    directory.

    ``ray_address`` (default: the ``RAY_ADDRESS`` environment variable, as ``ray.init``
    reads it): the address (``HOST:PORT``) of a running Ray cluster, started with ``ray
    start --head`` and joined by ``ray start --address=HOST:PORT`` on other machines, on
    which the sites then run (:func:`attach_ray`); ``None`` or empty: a Ray instance of
    this process, on this machine. Either way the ServerApp runs in this process."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.common.logger import update_console_handler

    if not sys.stderr.isatty():  # a log file or a pipe: plain text, no colour codes
        update_console_handler(colored=False)

    # Fail here, with a clear message, rather than inside the engine's threads and actors.
    if config.identity.site_keys:  # simulated sites hold no keys: every reply would be refused
        from fedkd.config import ConfigError

        raise ConfigError(["identity.site-keys: simulated sites hold no keys, so every reply would be "
                           "refused; identities are for deployments (fedkd deploy run)"])
    split = load_federation(config.data, config.seed)
    if config.audit.enabled:  # the audit plan (candidates, secret) is refused here, not in the engine
        from fedkd.audit.canaries import with_audit

        split = with_audit(config, split)
    check_privacy_plans(config, [len(c.train) for c in split.clients])
    check_site_models(config=config, split=split)
    export_search_path(plugin_search_path(config_plugins(config)))  # Ray workers import plugins too
    if not config.run_name:  # fix the name here so the caller knows where the run lands
        config = _with_run_name(config, run_directory(config).name)
    run_dir = Path(config.output_dir).resolve() / config.run_name
    if config.checkpoint.resume:  # a resume the checkpoint refuses: say why before starting
        _check_resume(config, run_directory(config))
    started = time.time()
    flat = config.to_flat()
    backend_config = {
        "client_resources": {"num_cpus": CLIENT_CPUS, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(CLIENT_CPUS, os.cpu_count() or 1), **RAY_INIT_ARGS},
    }
    address = os.environ.get("RAY_ADDRESS", "") if ray_address is None else ray_address
    with contextlib.ExitStack() as stack:
        if address:  # the cluster's own settings (its RAY_AUTH_* included) stand
            backend_config["init_args"] = {"address": address}
            stack.enter_context(attach_ray(address))
        else:
            ray_token_auth()
        _run_engine(config, flat=flat, backend_config=backend_config, verbose=verbose,
                    num_supernodes=config.data.num_clients if num_supernodes is None else num_supernodes)
    read_summary(run_dir)  # fails clearly if the server did not finish the run
    if (run_dir / "summary.json").stat().st_mtime < started:  # left by an earlier run there
        raise RuntimeError(f"the run in {run_dir} did not finish; see the log above")
    return run_dir


FORWARDED_ENV = ("FEDKD_", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "HF_", "TOKENIZERS_PARALLELISM")
"""Environment variables (names, or prefixes ending in ``_``) a Ray cluster's workers get
from the process that runs the simulation: the split cache (``FEDKD_CACHE_DIR``), and the
like. A local Ray instance's workers inherit the whole environment; a cluster's workers
inherit that of its ``ray start``, so these travel in the job's runtime environment."""


def forwarded_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of ``environ`` (default ``os.environ``) named by :data:`FORWARDED_ENV`,
    plus ``PYTHONPATH``: this process's ``sys.path`` then the variable's own value, as
    Flower's Ray backend sends it to a local instance (the apps and plugins import from it).

    >>> env = forwarded_environment({"FEDKD_CACHE_DIR": "/c", "HOME": "/root", "PYTHONPATH": "/p"})
    >>> env["FEDKD_CACHE_DIR"], "HOME" in env, env["PYTHONPATH"].endswith(os.pathsep + "/p")
    ('/c', False, True)
    """
    environ = dict(os.environ if environ is None else environ)
    kept = {k: v for k, v in environ.items()
            if any(k.startswith(name) if name.endswith("_") else k == name for name in FORWARDED_ENV)}
    path = [p for p in sys.path if p]
    if environ.get("PYTHONPATH"):
        path.append(environ["PYTHONPATH"])
    kept["PYTHONPATH"] = os.pathsep.join(path)
    return kept


@contextlib.contextmanager
def attach_ray(address: str) -> Iterator[None]:
    """Connect this process to the running Ray cluster at ``address`` for the simulation
    (Flower's Ray backend then uses it instead of starting one: it calls ``ray.init`` only
    when Ray is not initialised) and disconnect at the end; the cluster keeps running.

    The cluster's nodes need the same Python, torch, Flower and fedkd as this one, at paths
    ``sys.path`` names (:func:`forwarded_environment`); this process must run on one of its
    nodes (Ray's drivers connect to their machine's raylet). Each site takes one CPU, so the
    cluster runs as many sites side by side as it has CPUs (``ray status``). Ray's token
    authentication is the cluster's: with ``RAY_AUTH_MODE=token``, this process needs the
    cluster's ``RAY_AUTH_TOKEN`` in its environment (no fresh token is made, unlike a local
    instance, :func:`ray_token_auth`)."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; cannot attach to "
                           f"the cluster at {address}")
    try:
        ray.init(address=address, runtime_env={"env_vars": forwarded_environment()},
                 include_dashboard=False, configure_logging=False)
    except ConnectionError as err:
        from fedkd.config import ConfigError

        raise ConfigError([f"ray-address: no Ray cluster answers at {address!r}: {err}"]) from None
    try:
        yield
    finally:
        if ray.is_initialized():  # Flower's backend shuts down on a finished run; not on a failed one
            ray.shutdown()


def _run_engine(config: Config, *, flat: dict, backend_config: dict, verbose: bool, num_supernodes: int) -> None:
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from clients.client_app import app as client_app
    from server.server_app import app as server_app

    with owned_temp_dir(APP_DIR_PREFIX) as app_path, _stop_on_interrupt(config, str(app_path)):
        app_dir = str(app_path)
        _write_app_dir(app_path, config)
        server_context = Context(
            run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=flat
        )
        _run_simulation(
            num_supernodes=num_supernodes,
            client_app=client_app,
            server_app=server_app,
            backend_config=backend_config,
            server_app_context=server_context,
            app_dir=app_dir,
            is_app=True,  # sites read their run config from app_dir, as under `flwr run`
            verbose_logging=verbose,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        )


INTERRUPT_EXIT = 130  # 128 + SIGINT, as shells report a process stopped by Ctrl-C


@contextlib.contextmanager
def _stop_on_interrupt(config: Config, app_dir: str) -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM during the simulation stops the process within seconds,
    with exit status 130.

    Flower's simulation engine runs the ServerApp in a thread the main thread does not
    stop, so a KeyboardInterrupt left the run going to its end. Instead the handler says
    how to continue, removes the temporary app folder and ends the process at once (the
    local Ray cluster's processes share its fate). That is safe at any instant
    because every checkpoint and site state is written to a temporary name and renamed
    into place (:func:`fedkd.checkpoint.save_checkpoint`), and a resumed run drops the
    events recorded past its checkpoint (:func:`fedkd.reporting.trim_events`): ``--resume``
    ends where an uninterrupted run ends. Installed only from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame) -> None:  # noqa: ANN001
        print(f"\nfedkd: interrupted; {Path(config.output_dir).resolve() / config.run_name} keeps its last "
              f"checkpoint: continue with fedkd simulate --resume --set run-name={config.run_name} "
              "(and the same --config / --set)", file=sys.stderr, flush=True)
        shutil.rmtree(app_dir, ignore_errors=True)
        # Exit at once: shutting Ray down here races the engine's threads (a thread that
        # touches Ray after ray.shutdown() makes Ray's core end the process with status 1).
        # The Ray processes a local ray.init started share this process's fate and end with it.
        os._exit(INTERRUPT_EXIT)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_resume(config: Config, run_dir: Path) -> None:
    from fedkd.checkpoint import CheckpointError, read_resumable_checkpoint
    from fedkd.config import ConfigError

    try:
        read_resumable_checkpoint(run_dir, config_flat=config.to_flat())
    except CheckpointError as err:
        raise ConfigError([str(err)]) from None


def _with_run_name(config: Config, name: str) -> Config:
    import dataclasses

    return dataclasses.replace(config, run_name=name)
