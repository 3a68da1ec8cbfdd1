"""Speed and scale: the simulation engine against the floor, and the largest federation.

    python -m simulations.studies.benchmark speed --out runs/bench/speed --sites 10,100
    python -m simulations.studies.benchmark scale --out runs/bench/scale --sites 100,200,500

``speed``: for each federation size, the same config (digits; 10 sites: the default
study's Dirichlet alpha 0.1, 5 rounds; larger federations: IID split, which is the only
way digits' ~990 private examples go round 100 sites, 2 rounds) runs once through the
floor (``simulations/floor.py``, one process, no Flower) and once through Flower's
simulation engine (``simulations/runner.py``), each in a fresh Python process. Both give
the same numbers (tests/e2e/test_e2e_transports.py); the table gives

* end to end: wall time of the whole process (imports, data, Ray start-up, all rounds);
* rounds: the sum of the per-round times the run recorded (``history[].seconds``), i.e.
  the steady state without start-up;

and their ratios (simulation / floor = the framework's overhead), the peak memory of the
process tree (sum of RSS over the process and all its descendants, Ray's included,
sampled every 0.2 s) and the 1-minute load average before and after. Before a pair runs,
the split is built once here, so both runners find it in the split cache
(``fedkd.data.split_cache_path``), as every run after a machine's first does.

``scale``: tiny federations (mlp-small, 1 epoch each way, no global student, IID) of
growing size, 1 round, through the simulation engine: the largest size that completes
and its peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fedkd.config import parse_overrides
from fedkd.reporting import read_summary

RUNNER_CODE = """
import sys, json
from fedkd.config import load_config
config = load_config(sys.argv[2], overrides=json.loads(sys.argv[3]))
if sys.argv[1] == "floor":
    from simulations.floor import run_floor
    run_floor(config)
else:
    from simulations.runner import simulate
    simulate(config)
"""


def _tree_rss(root: int) -> int:
    """Sum of RSS (bytes) of ``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text().split()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = int(statm[1]) * page
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_measured(kind: str, config_path: Path, overrides: dict, *, timeout: float) -> dict:
    """Run the floor or the simulation in a fresh process; wall time, peak tree RSS, status."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    load = os.getloadavg()[0]
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER_CODE, kind, str(config_path), json.dumps(overrides)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    peak = 0
    lines: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        if time.monotonic() - start > timeout:
            proc.kill()
            break
        time.sleep(0.2)
    proc.wait()
    reader.join(timeout=5)
    wall = time.monotonic() - start
    run_dir = Path(overrides["output-dir"]) / overrides["run-name"]
    result = {"kind": kind, "wall": wall, "peak-rss": peak, "returncode": proc.returncode,
              "load-before": load, "load-after": os.getloadavg()[0]}
    try:
        summary = read_summary(run_dir)
        result["rounds-seconds"] = sum(h["seconds"] for h in summary["history"])
        result["alma"] = summary["final"].get("alma")
        result["status"] = summary["status"]
    except FileNotFoundError:
        result["status"] = "no summary"
        result["log-tail"] = "".join(lines[-30:])
    return result


def speed_overrides(sites: int, out: Path, kind: str, rounds: int) -> dict:
    overrides = {"data.num-clients": sites, "num-server-rounds": rounds,
                 "output-dir": str(out.resolve()), "run-name": f"{kind}-{sites}"}
    if sites > 10:
        overrides["data.partitioner"] = "iid"
    return overrides


def _warm_split_cache(args: argparse.Namespace, sites: int) -> None:
    from fedkd.config import load_config
    from fedkd.data import load_federation

    overrides = {**parse_overrides(args.overrides), **speed_overrides(sites, args.out, "warm", 1)}
    config = load_config(args.config, overrides=overrides)
    load_federation(config.data, config.seed)


def main_speed(args: argparse.Namespace) -> int:
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    for sites in args.sites:
        rounds = args.rounds or (5 if sites <= 10 else 2)
        _warm_split_cache(args, sites)
        for kind in ("floor", "simulation"):
            name = args.out / f"{kind}-{sites}"
            done = args.out / f"{kind}-{sites}.json"
            if done.is_file():
                results.append(json.loads(done.read_text()))
                continue
            if name.exists():
                import shutil

                shutil.rmtree(name)
            overrides = {**parse_overrides(args.overrides), **speed_overrides(sites, args.out, kind, rounds)}
            r = run_measured(kind, args.config, overrides, timeout=3600)
            r.update({"sites": sites, "rounds": rounds})
            print(json.dumps(r), file=sys.stderr, flush=True)
            done.write_text(json.dumps(r, indent=2))
            results.append(r)
    lines = ["| sites | rounds | floor: end to end / rounds (s) | simulation: end to end / rounds (s) | "
             "overhead end to end | overhead rounds | peak memory floor / simulation (GiB) | load (1 min) |",
             "|---|---|---|---|---|---|---|---|"]
    for sites in args.sites:
        f = next((r for r in results if r["sites"] == sites and r["kind"] == "floor"), None)
        s = next((r for r in results if r["sites"] == sites and r["kind"] == "simulation"), None)
        if not f or not s or "rounds-seconds" not in f or "rounds-seconds" not in s:
            continue
        loads = [f["load-before"], f["load-after"], s["load-before"], s["load-after"]]
        lines.append(
            f"| {sites} | {f['rounds']} | {f['wall']:.0f} / {f['rounds-seconds']:.0f} | "
            f"{s['wall']:.0f} / {s['rounds-seconds']:.0f} | {s['wall'] / f['wall']:.2f} | "
            f"{s['rounds-seconds'] / f['rounds-seconds']:.2f} | {f['peak-rss'] / 2**30:.2f} / "
            f"{s['peak-rss'] / 2**30:.2f} | {min(loads):.1f}-{max(loads):.1f} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    return 0


def main_scale(args: argparse.Namespace) -> int:
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    for sites in args.sites:
        done = args.out / f"scale-{sites}.json"
        if done.is_file():
            results.append(json.loads(done.read_text()))
            continue
        overrides = {
            **parse_overrides(args.overrides),
            "data.num-clients": sites, "num-server-rounds": args.rounds or 1, "data.partitioner": "iid",
            "model.architectures": "mlp-small", "train.local-epochs": 1, "train.distill-epochs": 1,
            "global-student.enabled": False, "output-dir": str(args.out.resolve()), "run-name": f"scale-{sites}",
        }
        if (args.out / f"scale-{sites}").exists():
            import shutil

            shutil.rmtree(args.out / f"scale-{sites}")
        r = run_measured("simulation", args.config, overrides, timeout=1800)
        r.update({"sites": sites, "rounds": overrides["num-server-rounds"]})
        print(json.dumps({k: v for k, v in r.items() if k != "log-tail"}), file=sys.stderr, flush=True)
        done.write_text(json.dumps(r, indent=2))
        results.append(r)
        if r["status"] != "completed":
            break  # larger ones will not fare better
    lines = ["| sites | rounds | status | wall time (s) | round time (s) | peak memory, process tree (GiB) | load (1 min) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        rounds_s = f"{r['rounds-seconds']:.0f}" if "rounds-seconds" in r else "-"
        lines.append(f"| {r['sites']} | {r['rounds']} | {r['status']} | {r['wall']:.0f} | {rounds_s} | "
                     f"{r['peak-rss'] / 2**30:.2f} | {r['load-before']:.1f}-{r['load-after']:.1f} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    return 0


def main(args: argparse.Namespace) -> int:
    return main_speed(args) if args.study == "speed" else main_scale(args)
