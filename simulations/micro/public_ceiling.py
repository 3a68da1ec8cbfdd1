"""What the public set can carry: oracle ceilings of any knowledge-only method (issue 14).

A knowledge method moves information between sites only through predictions on the public
set P. Whatever the fusion, a site's student then learns from at most (its own private
examples) + (P, labelled by the best possible teacher). This script trains one model per
site, centrally and with the *true* labels, on

* ``local``: the site's own training split (what local-only training sees);
* ``public-oracle``: the site's split plus P with its true labels: the ceiling of a
  knowledge-only method whose fused knowledge were perfect (hard labels; soft "dark
  knowledge" can add a little, Hinton et al. 2015, but cannot invent inputs P lacks);
* ``pooled``: every site's training split (what FedAvg approximates by averaging weights);

and prints each one's ALMA (mean over sites of the site's local test accuracy) and its mean
global test accuracy. When ``public-oracle`` sits far
below ``pooled``, a knowledge-only protocol cannot match weight averaging on that
federation, however it fuses: the public set, not the fusion, is the bottleneck.

No assertions; seconds to a minute on a laptop CPU:

    python -m simulations.micro.public_ceiling --config simulations/digits.toml --set data.alpha=1
    python -m simulations.micro.public_ceiling --set data.dataset=file --set data.path=cls20.npz \\
        --set data.standardize=public --set data.public-fraction=0.15 --set data.test-fraction=0.1 \\
        --alphas 0.05,0.1,0.5,1,100
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedkd.config import load_config, parse_overrides
from fedkd.data import ArrayDataset, load_federation
from fedkd.distillation import accuracy, train_supervised
from fedkd.models import build_model


def _concat(parts: list[ArrayDataset]) -> ArrayDataset:
    return ArrayDataset(x=np.concatenate([p.x for p in parts]), y=np.concatenate([p.y for p in parts]),
                        ids=np.concatenate([p.ids for p in parts]))


def ceilings(config, *, model: str, epochs: int, lr: float, batch_size: int) -> dict[str, tuple[float, float]]:  # noqa: ANN001
    """{setting: (ALMA, global test accuracy)} for ``local``, ``public-oracle``, ``pooled``."""
    split = load_federation(config.data, config.seed)
    pooled_train = _concat([c.train for c in split.clients])

    def fit(data: ArrayDataset, seed: int):  # noqa: ANN202
        net = build_model(model, input_shape=split.input_shape, num_classes=split.num_classes, seed=seed,
                          **split.model_options)
        train_supervised(net, data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        return net

    out: dict[str, tuple[float, float]] = {}
    pooled = fit(pooled_train, config.seed)
    for setting in ("local", "public-oracle"):
        site_acc, global_acc = [], []
        for i, site in enumerate(split.clients):
            data = site.train if setting == "local" else _concat([site.train, split.public])
            net = fit(data, config.seed + i)
            site_acc.append(accuracy(net, site.test))
            global_acc.append(accuracy(net, split.test))
        out[setting] = (float(np.mean(site_acc)), float(np.mean(global_acc)))
    out["pooled"] = (float(np.mean([accuracy(pooled, c.test) for c in split.clients])), accuracy(pooled, split.test))
    out["sizes"] = (float(np.mean([len(c.train) for c in split.clients])), float(len(split.public)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="TOML config (default: the embedded digits default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--alphas", default="", help="comma-separated data.alpha values (default: the config's)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--model", default="mlp-large", help="the one architecture trained (FedAvg's in the benchmarks)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    base = parse_overrides(args.overrides)
    alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else [None]
    print("| alpha | seed | site train (mean) | public | local: ALMA / global | public-oracle: ALMA / global "
          "| pooled: ALMA / global | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for alpha in alphas:
        for seed in (int(s) for s in args.seeds.split(",")):
            overrides = {**base, "seed": seed, **({"data.alpha": alpha} if alpha is not None else {})}
            config = load_config(args.config, overrides=overrides)
            start = time.perf_counter()
            r = ceilings(config, model=args.model, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
            cells = " | ".join(f"{r[k][0]:.3f} / {r[k][1]:.3f}" for k in ("local", "public-oracle", "pooled"))
            print(f"| {config.data.alpha:g} | {seed} | {r['sizes'][0]:.0f} | {r['sizes'][1]:.0f} | {cells} "
                  f"| {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
