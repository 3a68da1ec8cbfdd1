"""Peak memory and time of one local round of the MiniLM teacher, with and without DP-SGD.

A teacher site's local round (fedkd.federation.site.teacher_steps, step 2) is ``teacher.epochs``
epochs of training over its private text. Here: all-MiniLM-L6-v2 (from the ``text``
extra) + mean pooling + linear head, on ``--examples`` sentences of the embedded topic
corpus (6 classes) tokenised to ``--max-length`` tokens, batch size 32, one epoch, Adam:

* ``plain``: ``fedkd.distillation.train_supervised`` (no privacy);
* ``dp-ghost-frozen``: what a DP teacher site runs by default (``privacy.grad-sample-mode
  = "auto"`` -> ghost clipping, ``privacy.freeze-embeddings = true``):
  ``fedkd.privacy.train_private`` with Poisson batches, per-example clipping, noise,
  accountant;
* ``dp-ghost``: ghost clipping, embeddings trained too;
* ``dp-hooks-frozen``: Opacus hooks (every example's gradient materialised), embeddings
  frozen;
* ``dp-hooks`` (not run by default: ~3 GB of per-example gradients at batch 32).

Each mode runs in a fresh subprocess so its peak resident memory (``ru_maxrss``) is its
own; "after load" is the resident memory once the model and data are loaded, so the
difference is what training adds (torch's allocations are invisible to tracemalloc).
Times are wall-clock on a shared machine: compare modes within one run. No assertions.

Run: ``python simulations/micro/text_teacher.py [--examples 200] [--threads 1] [--modes ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODES = ("plain", "dp-ghost-frozen", "dp-ghost", "dp-hooks-frozen", "dp-hooks")
DEFAULT_MODES = ("plain", "dp-ghost-frozen", "dp-ghost", "dp-hooks-frozen")


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(mode: str, *, examples: int, max_length: int, batch_size: int, threads: int) -> dict:
    import numpy as np
    import torch

    from fedkd.data import ArrayDataset, load_source
    from fedkd.data.text import TOPICS
    from fedkd.distillation import train_supervised
    from fedkd.models import build_model
    from fedkd.models.text import frozen_embeddings
    from fedkd.privacy import PrivacyLedger, plan_privacy, train_private

    torch.set_num_threads(threads)
    x, y, _ = load_source("topics", max_length=max_length, num_examples=examples)
    data = ArrayDataset(x, y, np.arange(len(y)))
    model = build_model("minilm", input_shape=(max_length,), num_classes=len(TOPICS), seed=0)
    trainable = sum(p.numel() for p in model.parameters())
    after_load = _rss_mb()
    lr = 1e-4
    if mode == "plain":
        start = time.perf_counter()
        train_supervised(model, data, epochs=1, batch_size=batch_size, lr=lr, seed=0)
        seconds = time.perf_counter() - start
        steps, epsilon = -(-len(data) // batch_size), 0.0
    else:
        grad_mode = "ghost" if "ghost" in mode else "hooks"
        plan = plan_privacy(target_epsilon=8.0, num_examples=len(data), batch_size=batch_size,
                            epochs_per_round=1, rounds=10)
        ledger = PrivacyLedger(plan)
        with frozen_embeddings(model, enabled=mode.endswith("frozen")):
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            start = time.perf_counter()
            train_private(model, data, plan=plan, ledger=ledger, lr=lr, seed=0, grad_sample_mode=grad_mode)
            seconds = time.perf_counter() - start
        steps, epsilon = ledger.steps, ledger.epsilon()
    return {
        "mode": mode, "examples": len(data), "steps": steps, "seconds": seconds,
        "seconds_per_step": seconds / max(steps, 1), "trainable": trainable,
        "rss_after_load_mb": after_load, "peak_rss_mb": _peak_mb(), "epsilon": epsilon,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES)
    parser.add_argument("--examples", type=int, default=200, help="private sentences (one site)")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (sites use 1)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    settings = dict(examples=args.examples, max_length=args.max_length,
                    batch_size=args.batch_size, threads=args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, **settings)))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--one", mode, "--examples", str(args.examples),
               "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads)]
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            rows.append({"mode": mode, "error": out.stderr.strip().splitlines()[-1]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    ok = [r for r in rows if "error" not in r]
    first = ok[0] if ok else {}
    print(
        f"\nMiniLM teacher (all-MiniLM-L6-v2 + head), one local round = 1 epoch over "
        f"{first.get('examples', args.examples)} private sentences ({args.max_length} tokens), "
        f"batch {args.batch_size}, torch {first.get('torch', '?')}, {args.threads} thread(s), CPU\n"
    )
    header = (f"{'mode':<17} {'trainable':>10} {'steps':>5} {'s/round':>8} {'s/step':>7} "
              f"{'RSS load MB':>11} {'peak MB':>8} {'+train MB':>9} {'epsilon':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<17} failed: {r['error']}")
            continue
        print(f"{r['mode']:<17} {r['trainable'] / 1e6:>9.1f}M {r['steps']:>5} {r['seconds']:>8.1f} "
              f"{r['seconds_per_step']:>7.2f} {r['rss_after_load_mb']:>11.0f} {r['peak_rss_mb']:>8.0f} "
              f"{r['peak_rss_mb'] - r['rss_after_load_mb']:>9.0f} {r['epsilon']:>7.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
