"""Large federations on the synthetic dataset through the in-process runner: time and memory.

    python -m simulations.studies.inprocess_scale --sites 100,1000,10000 --rounds 2 --out runs/bench/inprocess-scale
    python -m simulations.studies.inprocess_scale --runner flower --sites 1000 --rounds 3 --out runs/bench/flower-scale

For each federation size N, in a fresh Python process (so that one size's memory does not
carry into the next), the same tiny federation runs through ``fedkd.simulate(config,
runner="inprocess")`` (``--runner flower``: through Flower's simulation engine, its local
Ray instance with one actor a core):

* data: ``data.dataset = "synthetic"`` (64 features, 10 classes), IID split,
  ``--per-site`` private examples a site (train + validation + local test), a public
  transfer set of ``--public`` examples and a global test set of the same size, so
  ``data.synthetic-examples = N * per-site + 2 * public``;
* ``mlp-small`` on every site, 1 epoch each way, ``fusion.method = mean``, no global
  student, evaluation in the last round only (``eval-every = rounds``).

The split is built once per size before the timed run (it lands in the split cache,
``FEDKD_CACHE_DIR``, as every run after a machine's first finds it) and its build time is
printed too. Printed per size: the split's build time, the run's wall time (process start
to exit: imports, reading the cached split, the preflight, all rounds), the time of each
round (``history[].seconds``: the sites' rounds, fusion, the server's checkpoint), and the
peak resident memory of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``; the
in-process runner is one process) and the peak of the process tree's summed RSS (sampled
every 0.2 s: with ``--runner flower``, Ray's processes and actors too). No assertions: the figures depend on the machine and
its load; the 1-minute load average before and after each run is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
import fedkd
from fedkd.data import load_federation
overrides, mode = json.loads(sys.argv[1]), sys.argv[2]
config = fedkd.load_config(overrides=overrides)
if mode == "split":
    load_federation(config.data, config.seed)
    out = {}
else:
    result = fedkd.simulate(config, runner=mode)
    out = {"status": result.status, "rounds": [h.get("seconds") for h in result.history],
           "alma": result.metrics.get("alma")}
out["wall_s"] = time.perf_counter() - start
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
"""


def overrides_for(*, sites: int, rounds: int, per_site: int, public: int, out: Path,
                  fraction_train: float = 1.0) -> dict:
    """The run config of one federation size (see the module doc); ``fraction_train`` below 1
    samples that share of the sites each round (``fraction-train``)."""
    examples = sites * per_site + 2 * public
    suffix = "" if fraction_train >= 1.0 else f"-f{fraction_train:g}"
    return {
        "data.dataset": "synthetic", "data.num-clients": sites, "data.partitioner": "iid",
        "data.synthetic-examples": examples, "data.public-fraction": public / examples,
        "data.test-fraction": public / examples, "model.architectures": "mlp-small",
        "train.local-epochs": 1, "train.distill-epochs": 1, "fusion.method": "mean",
        "global-student.enabled": False, "num-server-rounds": rounds, "eval-every": rounds,
        "min-clients": 1, "output-dir": str(out), "run-name": f"sites-{sites}-r{rounds}{suffix}",
        "fraction-train": fraction_train,
    }


def run_child(overrides: dict, mode: str, *, timeout: float) -> dict:
    """Run CHILD in a fresh interpreter (``mode``: "split", or the runner); its RESULT line
    plus the peak summed RSS of its process tree (``tree_peak_mib``), or the failure."""
    import tempfile
    import threading

    from simulations.studies.speed import _tree_rss

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(overrides), mode], env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        start, peak = time.monotonic(), 0
        while proc.poll() is None and time.monotonic() - start < timeout:
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            return {"status": f"timed out after {timeout:.0f} s"}
        reader.join(timeout=5)
        err.seek(0)
        stderr = err.read()
    for line in lines:
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "tree_peak_mib": peak / 2**20}
    tail = (stderr or "".join(lines)).strip().splitlines()[-3:]
    return {"status": f"failed (exit {proc.returncode}): " + " | ".join(tail)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="100,1000,10000", help="comma-separated federation sizes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-site", type=int, default=50, help="private examples a site")
    parser.add_argument("--public", type=int, default=500, help="public transfer set size")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/inprocess-scale"))
    parser.add_argument("--fraction-train", type=float, default=1.0,
                        help="share of the sites sampled to train each round (1 = every site)")
    parser.add_argument("--runner", choices=("inprocess", "flower"), default="inprocess",
                        help="inprocess (default) or flower: Flower's simulation engine")
    args = parser.parse_args()

    rows = []
    for sites in [int(s) for s in args.sites.split(",")]:
        overrides = overrides_for(sites=sites, rounds=args.rounds, per_site=args.per_site,
                                  public=args.public, out=args.out.resolve(), fraction_train=args.fraction_train)
        run_dir = args.out / overrides["run-name"]
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists; remove it or choose another --out")
        split = run_child(overrides, "split", timeout=args.timeout)
        load = [os.getloadavg()[0]]
        run = run_child(overrides, args.runner, timeout=args.timeout)
        load.append(os.getloadavg()[0])
        row = {"sites": sites, "split_s": split.get("wall_s"), "load": load, **run}
        rows.append(row)
        print(json.dumps(row), flush=True)

    runner = "In-process runner" if args.runner == "inprocess" else "Flower's simulation engine"
    print(f"\n{runner}, synthetic data (64 features, 10 classes, IID), {args.per_site} private "
          f"examples a site, |P| = {args.public}, mlp-small, 1 epoch each way, fusion mean, "
          f"{args.rounds} rounds, fraction-train {args.fraction_train:g}, {os.cpu_count()} cores\n")
    header = (f"{'sites':>7} {'status':>10} {'split build s':>14} {'wall s':>8} {'s per round':>22} "
              f"{'peak RSS MiB':>13} {'tree peak MiB':>14} {'load 1 min':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        per_round = ", ".join(f"{s:.1f}" for s in r.get("rounds", []) if s is not None) or "-"
        split_s = f"{r['split_s']:.1f}" if r.get("split_s") is not None else "-"
        wall = f"{r['wall_s']:.1f}" if "wall_s" in r else "-"
        rss = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "-"
        tree = f"{r['tree_peak_mib']:.0f}" if "tree_peak_mib" in r else "-"
        print(f"{r['sites']:>7} {str(r.get('status'))[:10]:>10} {split_s:>14} {wall:>8} {per_round:>22} "
              f"{rss:>13} {tree:>14} {r['load'][0]:>5.1f}-{r['load'][1]:<5.1f}")
        if r.get("status") != "completed":
            print(f"        {r.get('status')}")


if __name__ == "__main__":
    main()
