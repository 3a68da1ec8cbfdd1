"""A Ray cluster of a head node and worker nodes on this machine, started and stopped by a test.

``ray start`` daemonises its processes and ``ray stop`` ends every Ray process of the
machine's user, other clusters' included, so :class:`LocalRayCluster` does neither: each
node is one ``ray start --block`` in a process group of its own, on free ports and under a
temporary folder of its own, and :meth:`LocalRayCluster.stop` ends those process groups
(SIGTERM, then SIGKILL), then any process still naming the cluster's folders in its command
line, and reports what it could not end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray() -> list[str]:
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    return [ray] if ray else [sys.executable, "-m", "ray.scripts.scripts"]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (process group, command line) of every process of this machine."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found[int(entry)] = (os.getpgid(int(entry)), cmdline)
        except (OSError, ProcessLookupError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


STARTED = "Ray runtime started."  # what `ray start` prints once its node is up


class LocalRayCluster:
    """``with LocalRayCluster(workers=1, cpus=1) as cluster:`` a head node and ``workers``
    worker nodes with ``cpus`` CPUs each on 127.0.0.1; ``cluster.address`` is the head's
    ``HOST:PORT``. ``env``: extra environment of the nodes (their workers inherit it)."""

    def __init__(self, *, workers: int = 1, cpus: int = 1, env: dict[str, str] | None = None,
                 timeout: float = 60.0) -> None:
        self.workers, self.cpus, self.timeout = workers, cpus, timeout
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        # Short: Ray's Unix sockets live under it (a socket path has at most 107 bytes).
        self.root = Path(tempfile.mkdtemp(prefix="fkray-", dir="/tmp"))
        self.nodes: list[subprocess.Popen] = []
        self.address = ""

    def _node(self, name: str, args: list[str]) -> subprocess.Popen:
        folder = self.root / name
        folder.mkdir()
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115  closed with the process
        command = [*_ray(), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
                   "--num-gpus=0", f"--temp-dir={folder}", "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
                   f"--metrics-export-port={free_port()}", *args]
        proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.nodes.append(proc)
        return proc

    def _wait_until_started(self) -> None:
        """Until every node's ``ray start`` said it started (a worker node: it joined the
        head), or the timeout."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for proc in self.nodes:
                if proc.poll() is not None:
                    raise RuntimeError(f"a Ray node exited with status {proc.returncode}:\n{self.logs()}")
            if all(STARTED in log.read_text() for log in self.root.glob("*.log")):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the Ray nodes did not start in {self.timeout:.0f} s:\n{self.logs()}")

    def start(self) -> LocalRayCluster:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self._node("head", ["--head", f"--port={port}", f"--ray-client-server-port={free_port()}",
                            "--include-dashboard=false", f"--dashboard-port={free_port()}"])
        for i in range(self.workers):
            self._node(f"worker{i}", [f"--address={self.address}"])
        self._wait_until_started()
        return self

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def leftovers(self) -> list[tuple[int, str]]:
        """Processes still alive from this cluster: in a node's process group or naming its folder."""
        groups = {p.pid for p in self.nodes}
        return [(pid, cmd) for pid, (group, cmd) in _processes().items()
                if (group in groups or str(self.root) in cmd) and pid != os.getpid() and _alive(pid)]

    def stop(self, grace: float = 5.0) -> list[tuple[int, str]]:
        """End every process of the cluster; returns those still alive afterwards (none, normally)."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for proc in reversed(self.nodes):  # workers first, the head last
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            for pid, _ in self.leftovers():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.leftovers():
                time.sleep(0.2)
            if not self.leftovers():
                break
        for proc in self.nodes:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        left = self.leftovers()
        if not left:
            shutil.rmtree(self.root, ignore_errors=True)
        return left

    def __enter__(self) -> LocalRayCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
