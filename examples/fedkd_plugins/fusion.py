"""A fusion-rule plugin: ``rule(knowledge [N, P, C], mask [N, P], **params)`` returning
``(fused [N, P, C], weights [N, N])`` (or a ``fedkd.fusion.FusionResult``)."""

from __future__ import annotations

import numpy as np


def median_rule(knowledge: np.ndarray, mask: np.ndarray, **params: object) -> tuple[np.ndarray, np.ndarray]:
    """Every site receives the coordinate-wise median of all sites' knowledge, renormalised
    to probability rows (robust to a minority of outlying senders); weights are uniform
    (the median has none of its own)."""
    n = knowledge.shape[0]
    median = np.median(knowledge, axis=0)  # [P, C]
    median = median / median.sum(axis=-1, keepdims=True)
    return np.broadcast_to(median, knowledge.shape).copy(), np.full((n, n), 1.0 / n)
