"""Time per training step, DP-SGD (Opacus) vs non-private, on digits-sized data.

For each model (``mlp-large``, the largest image model in the registry, and ``cnn-small``)
on the embedded digits data (1,797 examples, 64 features, 10 classes) with batch size 32:

* non-DP: Adam on fixed batches of 32 (shuffled DataLoader);
* DP: the objects :func:`fedkd.privacy.train_private` uses (per-example gradients through
  Opacus hooks, per-example clipping, Gaussian noise, Poisson batches of expected size
  q n ~ 31.5, accountant step hook), from :func:`fedkd.privacy.private_training`.

A step is forward + loss + backward + optimizer step, batch already drawn; the median over
``--steps`` steps after ``--warmup`` steps is printed. No assertions: figures depend on the
machine and its load. Run: ``python simulations/micro/dp_step_time.py [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedkd.data import ArrayDataset, load_source
from fedkd.models import build_model
from fedkd.privacy import GRAD_SAMPLE_MODES, PrivacyLedger, plan_privacy, private_training


def _batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def _time_steps(
    step: Callable[[torch.Tensor, torch.Tensor], None],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    warmup: int,
    steps: int,
) -> tuple[float, float]:
    """(median seconds per step, mean batch size) over ``steps`` steps after ``warmup``."""
    times, sizes = [], []
    for i in range(warmup + steps):
        x, y = next(batches)
        start = time.perf_counter()
        step(x, y)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
            sizes.append(len(y))
    return statistics.median(times), statistics.fmean(sizes)


def plain_time(name: str, data: ArrayDataset, *, batch_size: int, warmup: int, steps: int, lr: float) -> float:
    """Median seconds of a non-private Adam step of model ``name`` on batches of ``batch_size``."""
    x = torch.as_tensor(data.x)
    y = torch.as_tensor(data.y)
    model = build_model(name, input_shape=(x.shape[1],), num_classes=10, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()

    def plain_step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()

    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    return _time_steps(plain_step, _batches(loader), warmup=warmup, steps=steps)[0]


def dp_time(name: str, data: ArrayDataset, *, mode: str, batch_size: int, warmup: int, steps: int,
            lr: float) -> tuple[float, float, float]:
    """(median seconds of a DP-SGD step in Opacus mode ``mode``, mean Poisson batch, sigma)."""
    model = build_model(name, input_shape=(data.x.shape[1],), num_classes=10, seed=0)
    model.train()
    plan = plan_privacy(
        target_epsilon=8.0, num_examples=len(data), batch_size=batch_size,
        epochs_per_round=1, rounds=5,
    )
    ledger = PrivacyLedger(plan)
    with private_training(model, data, plan=plan, ledger=ledger, lr=lr, seed=0, grad_sample_mode=mode) as dp:

        def dp_step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            dp.optimizer.zero_grad()
            out = dp.module(xb)
            (dp.criterion(out, yb) if len(yb) else dp.criterion(out, yb) * 0.0 if mode == "ghost"
             else out.sum()).backward()
            dp.optimizer.step()

        private, dp_batch = _time_steps(dp_step, _batches(dp.data_loader), warmup=warmup, steps=steps)
    assert ledger.steps == warmup + steps  # every timed step was accounted
    return private, dp_batch, plan.noise_multiplier


def bench(name: str, data: ArrayDataset, *, modes: list[str], repeats: int, batch_size: int, warmup: int,
          steps: int, lr: float) -> dict:
    """Plain and DP step times of model ``name``: ``repeats`` rounds, each timing the plain
    step and then every mode once (so both sides of a ratio see the same load); the
    median over rounds of each side, and the median of the per-round ratios."""
    params = sum(p.numel() for p in build_model(name, input_shape=(data.x.shape[1],), num_classes=10).parameters())
    plain, dp, ratios, batch = [], {m: [] for m in modes}, {m: [] for m in modes}, {}
    for _ in range(repeats):
        plain.append(plain_time(name, data, batch_size=batch_size, warmup=warmup, steps=steps, lr=lr))
        for mode in modes:
            seconds, batch[mode], sigma = dp_time(name, data, mode=mode, batch_size=batch_size, warmup=warmup,
                                                  steps=steps, lr=lr)
            dp[mode].append(seconds)
            ratios[mode].append(seconds / plain[-1])
    return {
        "model": name, "params": params, "plain_ms": statistics.median(plain) * 1e3,
        "dp_ms": {m: statistics.median(v) * 1e3 for m, v in dp.items()},
        "ratio": {m: statistics.median(v) for m, v in ratios.items()},
        "ratio_range": {m: (min(v), max(v)) for m, v in ratios.items()},
        "dp_batch": batch, "sigma": sigma,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp-large", "cnn-small"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--modes", default=",".join(GRAD_SAMPLE_MODES),
                        help="Opacus per-example gradient modes, comma-separated")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of (plain, every mode); medians over rounds")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    torch.set_num_threads(args.threads)
    x, y, _ = load_source("digits")
    data = ArrayDataset(x, y, np.arange(len(y)))
    rows = [
        bench(m, data, modes=modes, repeats=args.repeats, batch_size=args.batch_size, warmup=args.warmup,
              steps=args.steps, lr=args.lr)
        for m in args.models
    ]
    print(
        f"\nDP-SGD vs non-private step time: digits ({len(y)} x {x.shape[1]}, 10 classes), "
        f"batch {args.batch_size}, median of {args.steps} steps after {args.warmup} warm-up, "
        f"{args.repeats} interleaved repeats, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), CPU, load {os.getloadavg()[0]:.1f}\n"
    )
    header = (f"{'model':<10} {'params':>8} {'mode':<10} {'non-DP ms':>10} {'DP ms':>8} {'DP/non-DP':>10} "
              f"{'(min-max)':>12} {'mean DP batch':>14}")
    print(header)
    print("-" * len(header))
    for r in rows:
        for mode in modes:
            low, high = r["ratio_range"][mode]
            print(
                f"{r['model']:<10} {r['params']:>8,} {mode:<10} {r['plain_ms']:>10.3f} {r['dp_ms'][mode]:>8.3f} "
                f"{r['ratio'][mode]:>9.2f}x {f'{low:.2f}-{high:.2f}':>12} {r['dp_batch'][mode]:>14.1f}"
            )


if __name__ == "__main__":
    main()
