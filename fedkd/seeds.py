"""Every seed fedkd derives, in one place: from the run's ``seed``, a site id and a round.

A site's model initialisation, its round's shuffling, dropout and shielding noise, and the
server's public subset per round are all drawn from seeds computed here, without carried
RNG state, so a resumed run draws exactly what an uninterrupted one would, and the two
transports of :mod:`fedkd.federation.loop` give identical numbers.
"""

from __future__ import annotations

import math

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


def round_sample(seed: int, round_number: int, *, num_clients: int, fraction: float, minimum: int) -> np.ndarray:
    """The sorted partition ids that train in round ``round_number`` (``fraction-train``):
    all ``num_clients`` when ``fraction`` is 1, else ``m = min(N, max(minimum, ceil(fraction
    N)))`` drawn without replacement from ``default_rng([seed, round, 1])`` (McMahan et al.
    2017's ``C K`` clients per round, at least ``min-clients``). Seeded by the run and the
    round only, so that every transport, a resumed run and the audit pick the same sites,
    and independent of :func:`public_subset`'s draw."""
    if fraction >= 1.0:
        return np.arange(num_clients)
    size = min(num_clients, max(int(minimum), math.ceil(fraction * num_clients)))
    if size >= num_clients:
        return np.arange(num_clients)
    rng = np.random.default_rng([int(seed), int(round_number), 1])
    return np.sort(rng.choice(num_clients, size, replace=False))


# ------------------------------------------------------------------ a site's own noise

NOISE_SEEDS = ("run-seed", "site-secret", "secure-rng")
"""Where a site's DP-SGD sampling and noise (and its shielding noise) come from:

* ``run-seed``: seeds derived from the run's ``seed``, the site id, the round and the DP
  step count. Reproducible by anyone who holds the run config, the server included:
  simulations, tests and audits, where two transports must give the same numbers;
* ``site-secret``: the same derivation keyed by a 256-bit secret that the site draws
  from the operating system once (:func:`new_site_secret`) and keeps on its own disk
  (mode 0600). Reproducible by the site (a retried or resumed round draws what it drew
  before), not by the server;
* ``secure-rng``: Opacus's ``secure_mode`` (a cryptographically secure generator from
  ``torchcsprng`` for sampling and noise, and noise hardened against floating-point
  attacks); nothing is reproducible, not even by the site."""

NOISE_SEED_CHOICES = ("auto", *NOISE_SEEDS)
"""Values of ``privacy.noise-seed`` (``auto``: ``site-secret`` in deployment, ``run-seed``
in simulation; see :func:`resolve_noise_seed`)."""


def resolve_noise_seed(requested: str, *, deployed: bool, site_choice: str = "") -> str:
    """The noise source a site uses, one of :data:`NOISE_SEEDS`.

    ``site_choice`` (the site's own node config ``noise-seed``) wins: a site's noise is
    the site's business. Otherwise ``requested`` (the run config's ``privacy.noise-seed``,
    which the server writes): ``auto`` means ``site-secret`` in deployment and
    ``run-seed`` in simulation, and in deployment the run config cannot lower a site's
    protection to ``run-seed`` (it gets ``site-secret``)."""
    for name, value, allowed in (("site_choice", site_choice, ("", *NOISE_SEEDS)),
                                 ("requested", requested, NOISE_SEED_CHOICES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    if site_choice:
        return site_choice
    if requested == "auto":
        return "site-secret" if deployed else "run-seed"
    if deployed and requested == "run-seed":
        return "site-secret"
    return requested


def new_site_secret() -> bytes:
    """A fresh 256-bit secret from the operating system's CSPRNG (:func:`secrets.token_bytes`)."""
    import secrets

    return secrets.token_bytes(32)


def keyed_seed(key: bytes, seed: int) -> int:
    """A 63-bit seed from the site's secret ``key`` and a public ``seed`` (such as
    :func:`site_seed`): ``SeedSequence(words(key) + [seed])``. Without ``key`` the value is
    not computable; with it, the same inputs give the same seed (the site can rerun a
    round exactly). Different ``seed`` values give unrelated seeds."""
    if len(key) < 16:
        raise ValueError(f"a site secret must have at least 128 bits; got {8 * len(key)}")
    words = [int.from_bytes(key[i:i + 4], "little") for i in range(0, len(key) - len(key) % 4, 4)]
    state = np.random.SeedSequence([*words, int(seed)]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def noise_rng_seed(kind: str, *, seed: int, key: bytes | None = None) -> int | None:
    """The seed of a round's private randomness (DP sampling and noise, shielding noise)
    for noise source ``kind``: ``seed`` itself (``run-seed``), :func:`keyed_seed` of the
    site's ``key`` (``site-secret``), or None (``secure-rng``: fresh entropy, no seed)."""
    if kind == "run-seed":
        return int(seed)
    if kind == "site-secret":
        if key is None:
            raise ValueError("noise source 'site-secret' needs the site's secret key")
        return keyed_seed(key, seed)
    if kind == "secure-rng":
        return None
    raise ValueError(f"noise source must be one of {', '.join(NOISE_SEEDS)}; got {kind!r}")
