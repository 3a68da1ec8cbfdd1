"""The site's app guard: the process that runs tasks for a SuperNode in ``process`` isolation,
and only fedkd's app (the checks: :mod:`fedkd.ops.appguard`).

``flower-supernode --isolation process`` runs no app itself: it waits for an outside
process to take each task from its Runtime API (``127.0.0.1:<runtime port>``). In Flower
that process is ``flower-superexec``, which starts ``flwr-clientapp`` for every task,
whatever the app. This guard replaces it: it takes each ClientApp task the same way
(``AcquireTask``) and starts itself with the task's token (``--token``), which runs
Flower's ClientApp runtime (``flwr.supernode.runtime.run_clientapp``) with one step
added: after the task's app (FAB) and run config are pulled, and before the FAB is
installed or any module of it imported, :func:`fedkd.ops.appguard.task_problems` checks
them; a refused task fails with the reason (the ServerApp gets an error reply naming it),
and the guard logs ``fedkd app guard: refused task ...``.

    python -m clients.app_guard --runtime-api-address 127.0.0.1:9094 [--allow-plugin mypkg.nets:Net]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


class AppRefused(RuntimeError):
    """The task's app or run config is not one this site runs."""


def run_task(*, runtime_api_address: str, token: str, parent_pid: int | None,
             allowed_plugins: list[str], pinned_hashes: list[str]) -> None:
    """Flower's ``run_clientapp`` for one task, the app checked before it is installed.

    The check sits between pulling the task (message, context, run, FAB) and installing the
    FAB: a refusal raised there takes Flower's own error path, so the SuperNode sends the
    ServerApp an error reply naming the reason (and goes on with its next task)."""
    import flwr.supernode.runtime.run_clientapp as runtime

    from fedkd.ops.appguard import task_problems

    pull, install = runtime.pull_task_input, runtime.install_from_fab
    refused: list[str] = []

    def checked_pull(client):  # noqa: ANN001, ANN202
        message, context, run, fab = pull(client)
        refused.extend(task_problems(fab=fab.content, fab_hash=fab.hash_str, run_config=dict(context.run_config),
                                     allowed_plugins=allowed_plugins, pinned_hashes=pinned_hashes))
        if refused:
            print(f"fedkd app guard: refused task of run {run.run_id} ({run.fab_id}): " + "; ".join(refused),
                  file=sys.stderr, flush=True)
        return message, context, run, fab

    def checked_install(content, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if refused:
            raise AppRefused("fedkd app guard refused the app: " + "; ".join(refused))
        return install(content, *args, **kwargs)

    runtime.pull_task_input, runtime.install_from_fab = checked_pull, checked_install
    runtime.run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=True,
                          certificates=None, parent_pid=parent_pid, runtime_dependency_install=False)


def serve(*, runtime_api_address: str, extra_args: list[str], poll: float = 0.5) -> None:
    """Take every ClientApp task from the SuperNode's Runtime API and run it in a child
    (:func:`run_task`), until killed."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry.http_retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    print(f"fedkd app guard: serving {runtime_api_address}; only fedkd's app runs here", file=sys.stderr, flush=True)
    while True:
        try:
            response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except Exception as err:  # noqa: BLE001  the SuperNode not (yet, or no longer) up: keep asking
            print(f"fedkd app guard: Runtime API not answering ({type(err).__name__}); retrying",
                  file=sys.stderr, flush=True)
            time.sleep(2.0)
            continue
        if response.HasField("task") and response.token:
            subprocess.Popen([sys.executable, "-m", "clients.app_guard", "--runtime-api-address",  # noqa: S603
                              runtime_api_address, "--token", response.token, "--parent-pid", str(os.getpid()),
                              *extra_args])
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.app_guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, 127.0.0.1:PORT")
    parser.add_argument("--allow-plugin", action="append", default=[],
                        help="an import path (package.module:name) the run config may name; repeat")
    parser.add_argument("--fab-hash", action="append", default=[],
                        help="run only apps with this sha256 (repeat; default: any fedkd app)")
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.token:
        run_task(runtime_api_address=args.runtime_api_address, token=args.token, parent_pid=args.parent_pid,
                 allowed_plugins=args.allow_plugin, pinned_hashes=args.fab_hash)
        return 0
    extra = [a for plugin in args.allow_plugin for a in ("--allow-plugin", plugin)]
    extra += [a for digest in args.fab_hash for a in ("--fab-hash", digest)]
    serve(runtime_api_address=args.runtime_api_address, extra_args=extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
