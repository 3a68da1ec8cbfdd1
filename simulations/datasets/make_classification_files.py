"""A 20-class, image-like dataset from scikit-learn's ``make_classification``, written as an
``.npz`` file that fedkd's own-data path reads (``data.dataset = "file"``, ``data.path``;
:func:`fedkd.data.own.read_own_data`): issue 14's second dataset, one the project never tuned on.

    python -m simulations.datasets.make_classification_files --out data/classification20
    fedkd simulate --config simulations/digits.toml --set data.dataset=file \\
        --set data.path=data/classification20/classification20.npz --set data.standardize=public

What it writes, ``OUT/classification20.npz``: ``x`` float32 ``[examples, 8, 8]`` in [0, 1]
(each feature min-max scaled over the generated rows: the affine map is part of the
generator, a function of the seed, fitted on no split) and ``y`` int64 ``[examples]``.
An ``[n, H, W]`` array is an image to fedkd (``is_image_like``); with values in [0, 1] it is
not divided by 255. The pixels carry no spatial structure (``cnn-small`` reads them as an
8x8 image all the same). Generator: ``make_classification(n_samples=examples,
n_features=64, n_informative=informative, n_redundant=0, n_repeated=0,
n_classes=classes, n_clusters_per_class=2, class_sep=separation, flip_y=0,
random_state=seed)``; the same arguments and seed give the same file on one
scikit-learn/NumPy version. The data itself is not kept in git.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FILE_NAME = "classification20.npz"


def make_images(*, examples: int = 4000, classes: int = 20, side: int = 8, informative: int = 16,
                separation: float = 2.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x float32 [examples, side, side] in [0, 1], y int64 [examples])``, generated (module doc)."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=examples, n_features=side * side, n_informative=informative, n_redundant=0,
        n_repeated=0, n_classes=classes, n_clusters_per_class=2, class_sep=separation, flip_y=0.0,
        shuffle=True, random_state=seed,
    )
    low, high = x.min(axis=0), x.max(axis=0)
    x = (x - low) / np.where(high > low, high - low, 1.0)
    return x.astype(np.float32).reshape(examples, side, side), y.astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.datasets.make_classification_files",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write classification20.npz into")
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--informative", type=int, default=16)
    parser.add_argument("--separation", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0, help="make_classification's random_state")
    args = parser.parse_args(argv)
    x, y = make_images(examples=args.examples, classes=args.classes, informative=args.informative,
                       separation=args.separation, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / FILE_NAME
    np.savez(path, x=x, y=y)
    spec = {k: getattr(args, k) for k in ("examples", "classes", "informative", "separation", "seed")}
    (args.out / "classification20.json").write_text(json.dumps({**spec, "shape": list(x.shape)}, indent=2) + "\n")
    print(f"wrote {path}: x {x.shape} {x.dtype} in [{x.min():.1f}, {x.max():.1f}], y {y.shape}, "
          f"{len(np.unique(y))} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
