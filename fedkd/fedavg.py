"""FedAvg (weight averaging): the weight-sharing reference the benchmarks compare against.

FedAvg (McMahan et al. 2017, Algorithm 1) needs every site to run the same architecture;
each round the server replaces the global weights by the example-weighted mean of the
sites' locally trained weights:

    w <- sum_i n_i w_i / sum_i n_i

where n_i is site i's number of private training examples. fedkd itself never sends
weights (sites share knowledge only); this module exists so that ``simulations/floor.py``
can run FedAvg on the same data and sites, and so that the communication benchmark can
count what FedAvg would send (:func:`weight_bytes`). Pure NumPy/PyTorch, no Flower.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn


def average_weights(
    states: Sequence[Mapping[str, np.ndarray]], *, num_examples: Sequence[float]
) -> dict[str, np.ndarray]:
    """Example-weighted mean of ``states`` (one ``{name: array}`` per site, same keys and
    shapes), weights ``num_examples`` (n_i >= 0, not all 0). Floating arrays are averaged
    in float64 and cast back to their dtype; integer arrays (counters) must agree and are
    kept. Raises ``ValueError`` naming the first mismatched key or shape."""
    if not states:
        raise ValueError("average_weights needs at least one state")
    if len(states) != len(num_examples):
        raise ValueError(f"{len(states)} states but {len(num_examples)} example counts")
    n = np.asarray(num_examples, dtype=np.float64)
    if (n < 0).any() or not np.isfinite(n).all() or n.sum() <= 0:
        raise ValueError(f"num_examples must be finite, >= 0 and not all 0; got {list(num_examples)}")
    keys = list(states[0])
    for i, state in enumerate(states[1:], 1):
        if list(state) != keys:
            raise ValueError(f"state {i} has keys {sorted(state)}; state 0 has {sorted(keys)}")
    share = n / n.sum()
    averaged: dict[str, np.ndarray] = {}
    for key in keys:
        arrays = [np.asarray(state[key]) for state in states]
        shape, dtype = arrays[0].shape, arrays[0].dtype
        for i, a in enumerate(arrays):
            if a.shape != shape:
                raise ValueError(f"{key}: state {i} has shape {a.shape}; state 0 has {shape}")
        if dtype.kind != "f":
            if any(not np.array_equal(a, arrays[0]) for a in arrays):
                raise ValueError(f"{key}: non-floating arrays ({dtype}) differ between states")
            averaged[key] = arrays[0].copy()
            continue
        total = np.zeros(shape, dtype=np.float64)
        for s, a in zip(share, arrays, strict=True):
            total += s * a.astype(np.float64)
        averaged[key] = total.astype(dtype)
    return averaged


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters (what FedAvg sends, per direction, per round)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def weight_bytes(model: nn.Module, *, bytes_per_value: int = 4) -> int:
    """Bytes of one copy of the model's weights on the wire (float32 by default)."""
    return parameter_count(model) * bytes_per_value
