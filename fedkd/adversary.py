"""Simulated misbehaving sites, for robustness studies and tests of the server's checks.

A site listed in ``adversary.clients`` replaces its honest knowledge K [P, C] with
:func:`corrupt` before replying:

* ``random``       -- Dirichlet(1) noise rows (valid payload, useless knowledge);
* ``flip``         -- label-flipped knowledge: class c's probability moved to (c+1) mod C;
* ``nan``, ``negative``, ``wrong-shape``, ``extra-key``, ``int-dtype`` -- malformed
  payloads that the server's validation must reject.

Only the ClientApp calls this; honest runs never touch it.
"""

from __future__ import annotations

import numpy as np

from fedkd.config import ADVERSARY_KINDS


def corrupt(knowledge: np.ndarray, kind: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Arrays of the adversarial knowledge record that replaces honest ``knowledge`` [P, C]."""
    k = np.array(knowledge, dtype=np.float64)
    if kind == "random":
        return {"knowledge": rng.dirichlet(np.ones(k.shape[1]), size=k.shape[0])}
    if kind == "flip":
        return {"knowledge": np.roll(k, 1, axis=1)}
    if kind == "nan":
        k[rng.integers(len(k)), 0] = np.nan
        return {"knowledge": k}
    if kind == "negative":
        k[:, 0] -= 0.5
        return {"knowledge": k}
    if kind == "wrong-shape":
        return {"knowledge": k[:, :-1]}
    if kind == "extra-key":
        return {"knowledge": k, "weights": np.zeros(3)}
    if kind == "int-dtype":
        return {"knowledge": (k * 100).astype(np.int32)}
    raise ValueError(f"unknown adversary kind '{kind}'; choose one of: {', '.join(ADVERSARY_KINDS)}")
