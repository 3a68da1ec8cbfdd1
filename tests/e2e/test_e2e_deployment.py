"""fedkd on Flower's deployment engine: real flower-superlink / flower-supernode / flwr
processes on 127.0.0.1, TLS, SuperNode authentication and identities (signed replies) on.

One federation (SuperLink + 3 SuperNodes, each with its own node config: partition id,
its own data files exported from the embedded split, a state directory) is shared by
the module. Ports are picked free at run time, FLWR_HOME is temporary, every process
runs in its own process group and is killed at teardown, and each test has a hard time
limit. About 4-5 minutes on 2 busy cores (most of it Flower starting one Python process
per message on each site). The tests that kill or unregister a site have a federation of
their own, test_e2e_deployment_faults.py (the shared parts: deploy_harness.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy_harness import (  # noqa: F401  hard_timeout: every test's time limit (autouse)
    ROUNDS, SITES, LocalFederation, events, hard_timeout, run_to_summary, running_federation, small_config,
    time_limit, wait_for,
)
from fedkd.config import Config
from fedkd.reporting import read_summary

pytestmark = pytest.mark.deployment


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    with running_federation(tmp_path_factory.mktemp("deployment"), intruders=True,
                            extra_keys=("unregistered", "impostor")) as fed:
        yield fed


def strip_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


def assert_same_outcome(a: dict, b: dict) -> None:
    """Same final metrics and same per-round history (accepted sites, ALMA, student), to 1e-9."""
    assert a["final"].keys() == b["final"].keys()
    for key in a["final"]:
        assert a["final"][key] == pytest.approx(b["final"][key], abs=1e-9), key
    ha, hb = strip_seconds(a["history"]), strip_seconds(b["history"])
    assert [e["accepted"] for e in ha] == [e["accepted"] for e in hb]
    for ea, eb in zip(ha, hb, strict=True):
        assert ea.keys() == eb.keys()
        for key in ea:
            assert ea[key] == pytest.approx(eb[key], abs=1e-9), (ea["round"], key)


def stop_after_round(federation: LocalFederation, config: Config, round_number: int) -> dict:
    """Submit ``config`` and, from a thread, ``flwr stop`` it as soon as its round
    ``round_number`` is recorded; the returned dict gets "run-id", then "stopped" (the
    ``flwr stop`` result) or "error"."""
    outcome: dict = {"run-id": federation.submit(config)}
    run_dir = Path(config.output_dir) / config.run_name

    def watch() -> None:
        try:
            wait_for(lambda: any(e["round"] == round_number for e in events(run_dir, "round")),
                     timeout=240, what=f"round {round_number} of {config.run_name}")
            outcome["stopped"] = federation.flwr("stop", str(outcome["run-id"]),
                                                 federation.deployment.connection)
        except Exception as err:  # noqa: BLE001  reported by the test
            outcome["error"] = err

    outcome["thread"] = threading.Thread(target=watch, daemon=True)
    outcome["thread"].start()
    return outcome


@pytest.fixture(scope="module")
def uninterrupted(federation):
    """The 3-round TLS + auth run, started once. Beside it (the machine has idle time
    while Flower polls): a simulation of the same config in a subprocess (Ray), and the
    first part of the run that the resume test stops after round 2."""
    config = small_config(federation.root, "uninterrupted")
    sim_config = small_config(federation.root / "simulation", "uninterrupted",
                              **{"checkpoint.site-state-dir": str(federation.root / "simulation" / "state")})
    sim_toml = federation.root / "simulation.toml"
    sim_toml.write_text(sim_config.to_toml())
    simulation = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fedkd.config import load_config; "
         "from simulations.runner import simulate; print(simulate(load_config(sys.argv[1])))", str(sim_toml)],
        env=federation.env, cwd=Path(__file__).resolve().parents[1], start_new_session=True,
        stdout=(federation.root / "simulation.log").open("wb"), stderr=subprocess.STDOUT,
    )
    federation.processes["simulation"] = simulation
    federation.logs["simulation"] = federation.root / "simulation.log"
    with time_limit(360, "the uninterrupted run"):  # 3 rounds beside a simulation and a 2-round run, on 2 shared cores
        to_stop = stop_after_round(federation, small_config(federation.root, "resumed"), 2)
        run_id, summary = run_to_summary(federation, config, timeout=240)
    return {"config": config, "summary": summary, "run-id": run_id,
            "simulation": simulation, "sim-config": sim_config, "to-stop": to_stop}


# --------------------------------------------------------------------------- security


@pytest.mark.limit(60)
def test_plaintext_connections_to_the_tls_superlink_fail(federation):
    with pytest.raises(OSError):  # plain HTTP to the HTTPS port: the TLS server hangs up
        urllib.request.urlopen(f"http://127.0.0.1:{federation.port}/health", timeout=10)
    import ssl

    context = ssl.create_default_context(cafile=str(federation.certs / "ca.crt"))
    with urllib.request.urlopen(f"https://localhost:{federation.port}/health", timeout=10,
                                context=context) as ok:  # the same endpoint over TLS answers
        assert ok.status == 200

    plain = federation.processes["plaintext-supernode"]
    assert plain.wait(timeout=45) != 0
    log = federation.log_text("plaintext-supernode")
    assert "Failed to initialize the connection to the SuperLink" in log
    assert federation.online_nodes() == SITES


@pytest.mark.limit(60)
def test_supernode_without_a_registered_key_is_refused(federation):
    rogue = federation.processes["unregistered-supernode"]
    assert rogue.wait(timeout=45) != 0
    assert "Failed to activate SuperNode" in federation.log_text("unregistered-supernode")
    assert "No SuperNode found with the given public key" in federation.log_text("superlink")
    assert federation.online_nodes() == SITES


FOREIGN_SERVER = '''
import json, time
from pathlib import Path
from flwr.app import Context, Message, RecordDict, ConfigRecord
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(context.run_config["out"])
    deadline = time.monotonic() + 60
    nodes = []
    while len(nodes) < int(context.run_config["sites"]) and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query")
                for n in nodes]
    replies = grid.send_and_receive(messages, timeout=float(context.run_config["timeout"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.json").write_text(json.dumps(
        {"nodes": nodes, "errors": [r.error.reason for r in replies if r.has_error()],
         "contents": sum(1 for r in replies if r.has_content())}))
'''

FOREIGN_CLIENT = '''
from pathlib import Path
from flwr.app import Context, Message, RecordDict, ConfigRecord
from flwr.clientapp import ClientApp

app = ClientApp()

@app.query()
def query(msg: Message, context: Context) -> Message:
    out = Path(context.run_config["out"])
    out.mkdir(parents=True, exist_ok=True)  # what a foreign app could do: read the site's private data
    (out / f"executed-on-{context.node_id}").write_text(str(sorted(context.node_config)))
    return Message(RecordDict({"c": ConfigRecord({"node": str(context.node_config)})}), reply_to=msg)
'''


def write_foreign_app(root: Path) -> Path:
    app = root / "foreign-app"
    (app / "foreign").mkdir(parents=True, exist_ok=True)
    (app / "foreign" / "__init__.py").write_text("")
    (app / "foreign" / "server.py").write_text(FOREIGN_SERVER)
    (app / "foreign" / "client.py").write_text(FOREIGN_CLIENT)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "foreign"\nversion = "1.0.0"\ndependencies = []\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n'
        '[tool.flwr.app]\npublisher = "someone"\n'
        '[tool.flwr.app.components]\nserverapp = "foreign.server:app"\nclientapp = "foreign.client:app"\n'
        '[tool.flwr.app.config]\nout = ""\nsites = 3\ntimeout = 40.0\n')
    return app


def network_connection(federation: LocalFederation) -> str:
    """A flwr connection to the sites' address (the front) with only the public ca.crt: an
    outsider's view. Returns its name."""
    import dataclasses

    from fedkd.ops.deploy import connection_toml

    path = federation.home / "config.toml"
    outsider = dataclasses.replace(federation.deployment, connection="network")
    path.write_text(connection_toml(outsider, existing=path.read_text()))
    return "network"


@pytest.mark.limit(120)
def test_the_control_api_refuses_from_the_network_address(federation):
    import ssl

    network = network_connection(federation)
    context = ssl.create_default_context(cafile=str(federation.certs / "ca.crt"))
    for path, status in (("/v1/control/start-run", 403), ("/v1/control/list-runs", 403),
                         ("/v1/runtime/pull-messages", 403), ("/v1/other", 404), ("/docs", 404)):
        request = urllib.request.Request(f"https://localhost:{federation.port}{path}", data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10, context=context)
        assert refused.value.code == status, path
        assert refused.value.read().decode().startswith("fedkd front: "), path
    started = time.monotonic()  # the flwr CLI with ca.crt, at the sites' address: refused, every command
    for args in (("ls", network), ("supernode", "ls", network),
                 ("supernode", "register", str(federation.keys / "impostor.pub"), network),
                 ("supernode", "unregister", str(federation.node_ids[0]), network)):
        done = federation.flwr(*args, "--format", "json")
        answer = json.loads(done.stdout[done.stdout.index("{"):])
        assert answer["success"] is False and "403" in answer["error-message"], (args, answer)
    assert federation.online_nodes() == SITES  # nothing was unregistered; the operator's flwr (loopback) works
    app = write_foreign_app(federation.root)
    done = federation.flwr("run", str(app), network, "--run-config", f'out="{federation.root / "foreign-net"}"',
                           "--format", "json", timeout=90)
    answer = json.loads(done.stdout[done.stdout.index("{"):])
    assert answer["success"] is False and "403" in answer["error-message"], answer
    assert not (federation.root / "foreign-net").exists()
    print(f"\ncontrol API from the network: refused ({time.monotonic() - started:.1f}s for 5 flwr calls)")


@pytest.mark.limit(150)
def test_a_foreign_app_submitted_on_the_server_host_never_runs_on_a_site(federation):
    """Second layer: even submitted through the loopback Control API (the server host), an
    app that is not fedkd's is refused by every site's app guard before it is installed."""
    app = write_foreign_app(federation.root)
    out = federation.root / "foreign-loopback"
    done = federation.flwr("run", str(app), federation.deployment.connection, "--run-config",
                           f'out="{out}" timeout=20.0', "--format", "json", timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    result = wait_for(lambda: (out / "server.json").is_file() and json.loads((out / "server.json").read_text()),
                      timeout=110, what="the foreign ServerApp's result", poll=1.0)
    assert sorted(result["nodes"]) == sorted(federation.node_ids.values())
    assert result["contents"] == 0 and not list(out.glob("executed-on-*"))  # no site ran its ClientApp
    assert len(result["errors"]) == SITES and all("fedkd app guard refused the app" in e for e in result["errors"])
    for i in range(SITES):
        assert "fedkd app guard: refused task" in federation.log_text(federation.site_name(i))
        assert "carries files other than pyproject.toml" in federation.log_text(federation.site_name(i))
    print("\nforeign app via loopback:", json.dumps(result))


# --------------------------------------------------------------------------- runs


@pytest.mark.limit(420)
def test_three_round_run_with_tls_and_auth_matches_the_simulation(federation, uninterrupted):
    summary = uninterrupted["summary"]
    assert summary["status"] == "completed"
    assert summary["rounds-completed"] == ROUNDS
    assert [e["accepted"] for e in summary["history"]] == [[0, 1, 2]] * ROUNDS
    assert summary["dropouts"] == []

    run_dir = Path(uninterrupted["config"].output_dir) / "uninterrupted"
    import tomllib  # identities on (the default deployment): every reply above was signed and verified

    recorded = tomllib.loads((run_dir / "config.toml").read_text())
    assert recorded["identity"]["site-keys"] == str(federation.keys / "sites.toml")
    assert events(run_dir, "excluded") == []
    trains = events(run_dir, "client-train")
    assert sorted((e["round"], e["client"]) for e in trains) == [
        (r, c) for r in range(1, ROUNDS + 1) for c in range(SITES)
    ]
    assert {e["rounds-trained"] for e in trains if e["round"] == ROUNDS} == {ROUNDS}
    assert (run_dir / "checkpoint.npz").is_file()
    for c in range(SITES):  # each site kept its state on its own disk (2 latest rounds), owner only,
        site_dir = federation.state / "uninterrupted" / f"site-{c}"  # and its own noise secret
        kept = sorted(p.name for p in site_dir.iterdir())
        assert kept == ["noise-secret", *(f"round-{r:04d}.npz" for r in (ROUNDS - 1, ROUNDS))]
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in site_dir.iterdir())
    assert {e["event"] for e in events(run_dir, "client-train") if "dp-noise-seed" in e} == set()  # DP off

    simulation = uninterrupted["simulation"]
    assert simulation.wait(timeout=240) == 0, federation.log_text("simulation")[-3000:]
    sim_dir = Path(uninterrupted["sim-config"].output_dir) / "uninterrupted"
    assert_same_outcome(summary, read_summary(sim_dir))
    sim_evals = {(e["round"], e["client"]): e["accuracy"] for e in events(sim_dir, "client-eval")}
    dep_evals = {(e["round"], e["client"]): e["accuracy"] for e in events(run_dir, "client-eval")}
    assert dep_evals == sim_evals
    print("\ndeployment vs simulation final:", json.dumps(summary["final"]),
          json.dumps(read_summary(sim_dir)["final"]))


@pytest.mark.limit(300)
def test_server_stopped_after_round_2_resumes_to_the_same_final_state(federation, uninterrupted):
    run_dir = federation.root / "runs" / "resumed"
    to_stop = uninterrupted["to-stop"]  # submitted beside the uninterrupted run
    to_stop["thread"].join(timeout=200)
    assert "error" not in to_stop, to_stop.get("error")
    stopped = to_stop["stopped"]
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    wait_for(lambda: federation.run_status(to_stop["run-id"]).startswith("finished"), timeout=60,
             what="the stopped run to end")
    assert not (run_dir / "summary.json").exists()  # stopped, not finished
    assert max(e["round"] for e in events(run_dir, "round")) == 2

    resumed_config = small_config(federation.root, "resumed", **{"checkpoint.resume": True})
    _, summary = run_to_summary(federation, resumed_config, timeout=200)
    assert summary["status"] == "completed"
    assert summary["resumed-from"] == [2]
    assert [e["event"] for e in events(run_dir, "resumed")] == ["resumed"]
    assert_same_outcome(summary, uninterrupted["summary"])
    print("\nresumed vs uninterrupted final:", json.dumps(summary["final"]),
          json.dumps(uninterrupted["summary"]["final"]))
