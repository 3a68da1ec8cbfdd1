"""What a fresh process pays before its first training step: the fixed start-up of every
simulated site's Ray actor (and of the in-process runner).

    python simulations/micro/startup.py [--repeats 3]

Each measurement runs in a fresh interpreter (so nothing is imported yet) and prints, in
seconds:

* ``import torch``;
* ``import clients.client_app``: everything a ClientApp actor imports (torch, Flower's
  app API, fedkd's site code);
* the first training call (``fedkd.distillation.train_supervised``: 1 epoch of 64
  examples, ``mlp-small``) with fedkd's :class:`fedkd.distillation.Adam` (the default), and
  the same call with ``torch.optim.Adam``, whose ``Optimizer`` base class imports
  ``torch._dynamo`` on first use (``add_param_group``, ``zero_grad``, ``step``);
* a second call in the same process (the steady state), and whether ``torch._dynamo`` was
  imported;
* ``ray.init`` + ``ray.shutdown`` of a local instance with one CPU (the simulation's
  other fixed cost, Ray's processes).

The median over ``--repeats`` fresh processes of each figure is printed with the 1-minute
load average before and after. No assertions: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
optimizer = sys.argv[1]
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import clients.client_app
t2 = time.perf_counter()
import numpy as np
import fedkd.distillation as distillation
from fedkd.data import ArrayDataset
from fedkd.models import build_model
if optimizer == "torch":
    distillation.Adam = lambda params, *, lr: torch.optim.Adam(params, lr=lr)
torch.set_num_threads(1)
data = ArrayDataset(np.random.default_rng(0).random((64, 64), dtype=np.float32), np.arange(64) % 10, np.arange(64))
model = build_model("mlp-small", input_shape=(64,), num_classes=10, seed=0)
t3 = time.perf_counter()
distillation.train_supervised(model, data, epochs=1, batch_size=32, lr=0.01)
t4 = time.perf_counter()
distillation.train_supervised(model, data, epochs=1, batch_size=32, lr=0.01)
t5 = time.perf_counter()
out = {"import torch": t1 - t0, "import clients.client_app": t2 - t1, "first training call": t4 - t3,
       "second training call": t5 - t4, "torch._dynamo imported": "torch._dynamo" in sys.modules}
print("RESULT " + json.dumps(out))
"""

RAY = r"""
import json, os, time
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
t2 = time.perf_counter()
ray.shutdown()
t3 = time.perf_counter()
print("RESULT " + json.dumps({"import ray": t1 - t0, "ray.init": t2 - t1, "ray.shutdown": t3 - t2}))
"""


def _run(code: str, *args: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=600)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child failed (exit {done.returncode}): {done.stderr[-1500:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load = [os.getloadavg()[0]]
    rows: dict[str, list[dict]] = {"fedkd Adam": [], "torch.optim.Adam": [], "ray": []}
    for _ in range(args.repeats):  # interleaved, so that a change of load hits both alike
        rows["fedkd Adam"].append(_run(CHILD, "fedkd"))
        rows["torch.optim.Adam"].append(_run(CHILD, "torch"))
        rows["ray"].append(_run(RAY))
    load.append(os.getloadavg()[0])
    print(f"median of {args.repeats} fresh processes, seconds; load (1 min) {load[0]:.1f}-{load[1]:.1f}, "
          f"{os.cpu_count()} cores\n")
    for name, runs in rows.items():
        print(name)
        for key in runs[0]:
            values = [r[key] for r in runs]
            shown = values[0] if isinstance(values[0], bool) else f"{statistics.median(values):.2f}"
            print(f"  {key:<28} {shown}")


if __name__ == "__main__":
    main()
