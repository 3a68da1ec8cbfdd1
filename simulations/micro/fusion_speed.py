"""Server fusion time and memory for large federations (issue 7, speed and scale).

For N sites (default 100, 1,000 and 5,000), a public set of P = 500 examples and C = 10
classes, the benchmark builds knowledge [N, P, C] (rows drawn from Dirichlet(0.3): peaked,
as trained models' predictions are; 5% of sites send uniform rows, which fusion masks)
and times one call of :func:`fedkd.fusion.fuse` per method:

* ``mean`` (FedMD), ``era`` (DS-FL): one fused row shared by all receivers;
* ``expert``, the default method as the server runs it (class-expert fusion over each
  receiver's effective neighbours, then the consensus G), and with verified trust over
  every sender;
* ``knfu`` with the ``epd`` measure (KnFu's label-mix neighbours: O(N^2 C) divergences);
* ``knfu`` with the ``agreement`` measure and JS (the default: O(N^2 |S| C) logarithms,
  |S| = P/2, so it is skipped above ``--agreement-max-sites``);
* ``knfu`` with the ``agreement`` measure and the squared Hellinger distance or KL, whose
  pairwise part is one matrix product (BLAS);

each knfu variant also split into its three stages.

Time is the median over ``--repeats`` calls (one where a call takes over 5 s of CPU), as
CPU time of this process (what the call costs; NumPy's elementwise work runs on one core,
its matrix products on BLAS's threads, so CPU time can exceed wall time there) and wall
time (longer when other jobs share the cores);
peak memory is the largest extra memory NumPy allocated during one call (tracemalloc),
the [N, P, C] input excluded. Output: a Markdown table on stdout and ``OUT/fusion.json``,
``OUT/fusion.md``. No assertions: figures depend on the machine and its load (the load
average is printed with them).

    python simulations/micro/fusion_speed.py --out runs/bench/fusion
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedkd.fusion import consensus, effectiveness_matrix, fuse, informative_rows, neighbour_weights, weighted_fusion


def make_knowledge(n: int, p: int, c: int, *, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = rng.dirichlet(np.full(c, 0.3), size=(n, p))
    k[: max(1, n // 20)] = 1.0 / c
    return k


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call of ``fn``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(median wall seconds, median CPU seconds, peak extra MiB) of ``fn``.

    CPU seconds are what the call costs a core; on a machine shared with other jobs the
    wall time is longer (the call waits for a core), so both are reported."""
    tracemalloc.start()  # memory from one traced call; tracemalloc slows it, so it is not timed
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    times = [timed(fn)]
    while len(times) < repeats and times[0][1] < 5.0:
        times.append(timed(fn))
    return (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times), peak / 2**20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="100,1000,5000")
    parser.add_argument("--public", type=int, default=500)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agreement-max-sites", type=int, default=1000,
                        help="largest federation for which the agreement measure's stages are timed")
    parser.add_argument("--agreement-full-max-sites", type=int, default=100,
                        help="largest federation for which fuse(knfu, agreement) is also timed whole")
    parser.add_argument("--verified-max-sites", type=int, default=1000,
                        help="largest federation for which expert with verified trust is timed (O(N^2 P C))")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/fusion"))
    args = parser.parse_args(argv)

    rows = []
    load = os.getloadavg()
    for n in [int(s) for s in args.sites.split(",")]:
        k = make_knowledge(n, args.public, args.classes)
        cases: list[tuple[str, Callable[[], object]]] = [
            ("mean", lambda: fuse(knowledge=k, method="mean")),
            ("era", lambda: fuse(knowledge=k, method="era")),
            ("knfu (epd)", lambda: fuse(knowledge=k, method="knfu", measure="epd")),
            # the default method as the server runs it: F_i over effective neighbours, then G
            ("expert (default: effective, trust off) + G", lambda: (
                fuse(knowledge=k, method="expert", neighbours="effective", trust="off"), consensus(knowledge=k))),
        ]
        if n <= args.verified_max_sites:
            cases.append(("expert (verified trust, all senders)", lambda: fuse(
                knowledge=k, method="expert", neighbours="all", trust="verified")))
            cases.append(("expert (claimed trust, all senders)", lambda: fuse(
                knowledge=k, method="expert", neighbours="all", trust="claimed")))
        if n <= args.agreement_full_max_sites:
            cases.append(("knfu (agreement, js)", lambda: fuse(knowledge=k, method="knfu", measure="agreement")))
        for divergence in ("hellinger", "kl"):
            cases.append((f"knfu (agreement, {divergence})", lambda d=divergence: fuse(
                knowledge=k, method="knfu", measure="agreement", divergence=d)))
        for name, fn in cases:
            seconds, cpu, peak = measure(fn, args.repeats)
            rows.append({"sites": n, "method": name, "seconds": seconds, "cpu-seconds": cpu, "peak-mib": peak})
            print(f"{n:>6} sites  {name:<44} {seconds:9.3f} s wall {cpu:9.3f} s CPU  peak {peak:8.1f} MiB",
                  flush=True)
        # knfu's stages (CPU seconds): epd and the matrix-product agreements always, JS
        # agreement where affordable
        variants = [("epd", "js"), ("agreement", "hellinger"), ("agreement", "kl")]
        if n <= args.agreement_max_sites:
            variants.append(("agreement", "js"))
        for measure_name, divergence in variants:
            mask = informative_rows(k, 0.95)
            d = None

            def eff() -> None:
                nonlocal d
                d = effectiveness_matrix(k, measure=measure_name, divergence=divergence)

            t_eff = timed(eff)
            w = None

            def nw() -> None:
                nonlocal w
                w = neighbour_weights(d)

            t_nw = timed(nw)
            t_wf = timed(lambda: weighted_fusion(k, w, mask))
            label = "epd" if measure_name == "epd" else f"{measure_name}, {divergence}"
            rows.append({"sites": n, "method": f"knfu ({label})", "effectiveness": t_eff[1],
                         "neighbours": t_nw[1], "fusion": t_wf[1],
                         "wall": t_eff[0] + t_nw[0] + t_wf[0]})
            print(f"{n:>6} sites  knfu stages ({label}), CPU s: effectiveness {t_eff[1]:.3f}, "
                  f"neighbours {t_nw[1]:.3f}, weighted fusion {t_wf[1]:.3f}", flush=True)
    load_after = os.getloadavg()
    header = (f"P = {args.public}, C = {args.classes}, {os.cpu_count()} cores; load average "
              f"{load[0]:.2f} before, {load_after[0]:.2f} after (1 min)")
    lines = [header, "", "| sites | method | CPU time (s) | wall time (s) | peak extra memory (MiB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "seconds" in r:
            lines.append(f"| {r['sites']:,} | {r['method']} | {r['cpu-seconds']:.3f} | {r['seconds']:.3f} | "
                         f"{r['peak-mib']:.0f} |")
    lines += ["", "| sites | knfu, CPU time (s) by stage | effectiveness | neighbour selection | "
              "weighted fusion | total (CPU) | total (wall) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "effectiveness" in r:
            total = r["effectiveness"] + r["neighbours"] + r["fusion"]
            lines.append(f"| {r['sites']:,} | {r['method']} | {r['effectiveness']:.3f} | "
                         f"{r['neighbours']:.3f} | {r['fusion']:.3f} | {total:.3f} | {r['wall']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fusion.json").write_text(json.dumps({"rows": rows, "load": [load, load_after]}, indent=2))
    (args.out / "fusion.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
