"""A local multi-process Flower deployment for tests: one SuperLink, N SuperNodes, the flwr CLI.

Started as the deployment guide starts them: ``fedkd deploy superlink`` (the SuperLink on
loopback at ``control_port``, the operator's ``flwr`` CLI pointed there, and the front on
``port``, where the sites connect, passing the Fleet API only) and ``fedkd deploy
supernode`` (each SuperNode in ``process`` isolation with its app guard).
Everything listens on 127.0.0.1 only, on ports picked free at run time, with a temporary
FLWR_HOME; every process is started in its own process group and the whole group is
killed on :meth:`LocalFederation.close` (SIGTERM, then SIGKILL after a grace period).
The commands are the ones ``fedkd deploy`` prints (fedkd.ops.deploy), so the tests run the
documented deployment path, identities included: ``keys/sites.toml`` is the run's
``identity.site-keys`` and every SuperNode signs with its key (``identity-key``), as
``fedkd deploy run`` / ``fedkd deploy supernode`` set them by default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedkd.config import Config
from fedkd.ops.deploy import (
    CA_CERT,
    Deployment,
    app_pyproject,
    connection_toml,
    export_partitions,
    flower_env,
    free_port,
    public_file_name,
    register_command,
    site_file_name,
    write_certificates,
    write_identity_plan,
    write_supernode_keys,
)


def _group_kill(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # the group also holds the SuperExec and the app processes it started
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class LocalFederation:
    root: Path
    num_sites: int
    identities: bool = True  # runs check every reply's signature against keys/sites.toml
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.certs = self.root / "certs"
        self.keys = self.root / "keys"
        self.data = self.root / "data"
        self.state = self.root / "state"
        self.home = self.root / "flwr-home"
        self.port = free_port()  # the front: the sites' address
        self.control_port = free_port()  # the SuperLink itself, loopback: the operator's flwr CLI
        self.deployment = Deployment(address=f"127.0.0.1:{self.port}", certs_dir=self.certs,
                                     keys_dir=self.keys, control_port=self.control_port)
        self.operator = dataclasses.replace(self.deployment, address=self.deployment.control_address)
        self.env = flower_env(self.home)
        self.runtime_ports = {i: free_port() for i in range(self.num_sites)}

    # --------------------------------------------------------------- set-up

    def prepare(self, config: Config, *, extra_keys: tuple[str, ...] = ()) -> None:
        write_certificates(self.certs, hosts=["localhost", "127.0.0.1"], days=2)
        pairs = write_supernode_keys(self.keys, [self.site_name(i) for i in range(self.num_sites)] + list(extra_keys))
        write_identity_plan(self.keys, pairs[:self.num_sites])  # partition i = site-i
        export_partitions(config, self.data)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(connection_toml(self.operator))

    @staticmethod
    def site_name(client: int) -> str:
        return f"site-{client}"

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        handle = log.open("ab")
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.root, start_new_session=True)
        handle.close()
        self.processes[name], self.logs[name] = proc, log
        return proc

    @staticmethod
    def fedkd_command(*args: str) -> list[str]:
        return [sys.executable, "-m", "fedkd.cli", *args]

    def start_superlink(self, timeout: float = 60.0) -> None:
        """``fedkd deploy superlink``: the SuperLink on 127.0.0.1:control_port, the front on port."""
        self.start("superlink", self.fedkd_command(
            "deploy", "superlink", "--certs", str(self.certs), "--host", "127.0.0.1", "--port", str(self.port),
            "--control-port", str(self.control_port)))
        context = ssl.create_default_context(cafile=str(self.certs / CA_CERT))
        deadline = time.monotonic() + timeout
        waiting = [self.control_port, self.port]
        while waiting and time.monotonic() < deadline:
            if self.processes["superlink"].poll() is not None:
                raise RuntimeError(f"SuperLink exited:\n{self.log_text('superlink')[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", waiting[0]), timeout=2) as sock:
                    with context.wrap_socket(sock, server_hostname="localhost"):
                        waiting.pop(0)
            except OSError:
                time.sleep(0.3)
        if waiting:
            raise TimeoutError(f"SuperLink and its front did not listen within {timeout:.0f}s")

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def register(self, name: str) -> int:
        cmd = register_command(self.operator, self.keys / f"{name}.pub")
        done = subprocess.run([*cmd, "--format", "json"], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"registering {name} failed: {done.stdout}{done.stderr}")
        return int(json.loads(done.stdout[done.stdout.index("{"):])["node-id"])

    def node_config(self, client: int) -> dict:
        return {"partition-id": client, "public-path": str(self.data / public_file_name()),
                "data-path": str(self.data / site_file_name(client)), "state-dir": str(self.state)}

    def start_supernode(self, client: int, *, key_name: str | None = None, insecure: bool = False,
                        max_wait_time: float | None = None, name: str | None = None,
                        state_dir: Path | None = None) -> subprocess.Popen:
        """``fedkd deploy supernode``: the SuperNode (process isolation) and its app guard; with
        a key, the site signs its replies with it (``identity-key``)."""
        node = self.node_config(client)
        runtime_port = self.runtime_ports.get(client) if name is None else free_port()
        cmd = self.fedkd_command(
            "deploy", "supernode", "--superlink", self.deployment.address, "--partition-id", str(client),
            "--public", node["public-path"], "--data", node["data-path"],
            "--state-dir", str(state_dir if state_dir is not None else node["state-dir"]),
            "--runtime-port", str(runtime_port))
        if insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--ca", str(self.certs / CA_CERT), "--key", str(self.keys / (key_name or self.site_name(client)))]
        if max_wait_time is not None:
            cmd += ["--max-wait-time", f"{max_wait_time:g}"]
        return self.start(name or self.site_name(client), cmd)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.processes[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def node_status(self) -> dict[int, str]:
        """Node id -> status ("registered", "online", "offline", ...) as the SuperLink sees it."""
        done = self.flwr("supernode", "ls", self.deployment.connection, "--format", "json")
        try:
            nodes = json.loads(done.stdout[done.stdout.index("{"):])["nodes"]
        except (ValueError, KeyError):
            return {}
        return {int(n["node-id"]): n.get("status", "") for n in nodes}

    def run_status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` shows it, e.g. "running", "finished:stopped"."""
        done = self.flwr("ls", self.deployment.connection, "--format", "json")
        try:
            runs = json.loads(done.stdout[done.stdout.index("{"):])["runs"]
        except (ValueError, KeyError):
            return ""
        return next((r.get("status", "") for r in runs if int(r.get("run-id", 0)) == run_id), "")

    def online_nodes(self) -> int:
        return sum(1 for status in self.node_status().values() if status == "online")

    def wait_online(self, count: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online_nodes() >= count:
                return
            time.sleep(1.0)
        raise TimeoutError(f"{count} SuperNodes not online within {timeout:.0f}s")

    # --------------------------------------------------------------- runs

    def write_app(self, config: Config, name: str) -> Path:
        app = self.root / "apps" / name
        app.mkdir(parents=True, exist_ok=True)
        (app / "pyproject.toml").write_text(app_pyproject(config))
        return app

    def submit(self, config: Config) -> int:
        """``flwr run`` the resolved ``config`` (with the identity plan, as ``fedkd deploy run``
        adds it, unless the config names one or ``identities`` is off); returns the run id."""
        if self.identities and not config.identity.site_keys:
            config = dataclasses.replace(config, identity=dataclasses.replace(
                config.identity, site_keys=str(self.keys / "sites.toml")))
        app = self.write_app(config, f"{config.run_name}-{int(time.time() * 1000)}")
        done = self.flwr("run", str(app), self.deployment.connection, "--format", "json", timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"flwr run failed: {done.stdout}{done.stderr}")
        return int(json.loads(done.stdout[done.stdout.index("{"):])["run-id"])

    def log_text(self, name: str) -> str:
        path = self.logs.get(name)
        return path.read_text(errors="replace") if path and path.is_file() else ""

    def close(self) -> None:
        for name in reversed(list(self.processes)):
            _group_kill(self.processes[name])


def wait_for(predicate, *, timeout: float, what: str, poll: float = 0.2):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def events(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:  # a line being written
            continue
        if event.get("event") == kind:
            out.append(event)
    return out


def python() -> str:
    return sys.executable
