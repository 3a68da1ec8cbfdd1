"""Flower's simulation engine on an existing Ray cluster: a head node and a worker node on
127.0.0.1, started and stopped here (tests/e2e/ray_cluster.py), as on several machines.

The sites run on the cluster's two nodes (one CPU each: one site at a time on each); the
ServerApp runs in this process. The run must give the in-process runner's numbers, as a
local simulation does (tests/e2e/test_e2e_transports.py), and leave no Ray process behind.
Bounded: the nodes must start within 120 s, the run end within 240 s (SIGALRM), a lost
site is dropped after ``round-timeout`` (120 s); the nodes are stopped whatever happens.
"""

from __future__ import annotations

import pytest

from fedkd.config import load_config
from fedkd.reporting import read_events, read_summary

from ray_cluster import LocalRayCluster
from test_e2e_deployment import time_limit

pytestmark = pytest.mark.e2e

TINY = {  # a tiny synthetic federation: the engine and the cluster, not the learning, are under test
    "data.dataset": "synthetic", "data.num-clients": 3, "data.partitioner": "iid",
    "data.synthetic-examples": 900, "model.architectures": "mlp-small", "num-server-rounds": 2,
    "train.local-epochs": 1, "train.distill-epochs": 1, "global-student.enabled": False,
    "fusion.method": "mean", "round-timeout": 120.0,
}


def _numbers(run_dir):
    summary = read_summary(run_dir)
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in summary["history"]]
    evals = sorted((e["round"], e["client"], e["accuracy"]) for e in read_events(run_dir, "client-eval"))
    return summary["status"], history, summary["final"], evals


def test_a_simulation_on_a_two_node_ray_cluster_matches_the_in_process_run(tmp_path, flower_env, monkeypatch):
    from simulations.floor import run_floor
    from simulations.runner import simulate

    from simulations.runner import ray_token_auth

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Token authentication, as for a local instance: the nodes get this process's token
    # from its environment, and this process uses it when it attaches. Kept for the rest
    # of the process, as a local simulation keeps it: Ray caches a process's token.
    ray_token_auth()
    config = {"output-dir": str(tmp_path / "runs"), **TINY}
    cluster = LocalRayCluster(workers=1, cpus=1, timeout=120)
    try:
        cluster.start()  # bounded by its timeout
        with time_limit(240, "the simulation on the cluster"):
            cluster_dir = simulate(load_config(overrides={**config, "run-name": "cluster"}),
                                   ray_address=cluster.address)
        worker_logs = "".join(p.read_text(errors="replace")
                              for p in (cluster.root / "worker0").glob("session_*/logs/worker-*"))
    finally:
        left = cluster.stop()
    assert left == [], f"Ray processes left running: {left}"

    floor_dir = run_floor(load_config(overrides={**config, "run-name": "floor"}))
    assert _numbers(cluster_dir) == _numbers(floor_dir)
    assert _numbers(cluster_dir)[0] == "completed"
    assert "ClientAppActor" in worker_logs  # the worker node ran sites, not only the head
