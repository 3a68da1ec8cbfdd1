"""A dataset plugin: ``load(*, path, seed)`` returning ``(x, y)`` or ``(x, y, num_classes)``."""

from __future__ import annotations

import numpy as np


def load_breast_cancer(*, path: str = "", seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's breast cancer table (569 examples, 30 features, 2 classes), offline.
    Standardise it with ``data.standardize = "public"``."""
    from sklearn.datasets import load_breast_cancer as load

    bunch = load()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64), 2
