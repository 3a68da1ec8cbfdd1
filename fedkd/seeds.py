"""Every seed fedkd derives, in one place: from the run's ``seed``, a site id and a round.

A site's model initialisation, its round's shuffling, dropout and shielding noise, and the
server's public subset per round are all drawn from seeds computed here, without carried
RNG state, so a resumed run draws exactly what an uninterrupted one would, and the two
transports of :mod:`fedkd.federation.loop` give identical numbers.
"""

from __future__ import annotations

import numpy as np

SEED_MODULUS = 2**31


def site_seed(seed: int, client: int, round_number: int = 0) -> int:
    """Seed of site ``client`` in round ``round_number`` (0: its model's initial weights):
    (seed * 1,000,003 + client * 10,007 + round) mod 2^31, distinct per site and round."""
    return (int(seed) * 1_000_003 + int(client) * 10_007 + int(round_number)) % SEED_MODULUS


def teacher_seed(seed: int, client: int) -> int:
    """Seed of a teacher site's teacher initialisation (one past its student's)."""
    return (site_seed(seed, client) + 1) % SEED_MODULUS


def public_subset(seed: int, round_number: int, *, num_public: int, size: int) -> np.ndarray:
    """The sorted public positions released in round ``round_number``: all of them when
    ``size`` is 0 or not below ``num_public``, else ``size`` drawn without replacement from
    ``default_rng([seed, round])``."""
    if not 0 < size < num_public:
        return np.arange(num_public)
    rng = np.random.default_rng([int(seed), int(round_number)])
    return np.sort(rng.choice(num_public, size, replace=False))
