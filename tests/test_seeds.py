"""fedkd.seeds: every derived seed, by hand."""

from __future__ import annotations

import numpy as np

from fedkd.seeds import public_subset, round_sample, site_seed, teacher_seed


def test_site_seed_known_answers():
    assert site_seed(0, 0) == 0
    assert site_seed(1, 2, 3) == 1_000_003 + 2 * 10_007 + 3
    assert site_seed(3000, 0) == (3000 * 1_000_003) % 2**31  # wraps at 2^31
    assert teacher_seed(1, 2) == site_seed(1, 2) + 1
    seeds = {site_seed(7, c, r) for c in range(50) for r in range(30)}
    assert len(seeds) == 50 * 30  # distinct per site and round


def test_public_subset():
    np.testing.assert_array_equal(public_subset(0, 1, num_public=5, size=0), np.arange(5))
    np.testing.assert_array_equal(public_subset(0, 1, num_public=5, size=5), np.arange(5))
    expected = np.sort(np.random.default_rng([4, 9]).choice(20, 6, replace=False))
    np.testing.assert_array_equal(public_subset(4, 9, num_public=20, size=6), expected)
    assert not np.array_equal(public_subset(4, 9, num_public=20, size=6), public_subset(4, 10, num_public=20, size=6))


def test_round_sample_sizes_and_draw():
    # fraction 1: every site, in order
    np.testing.assert_array_equal(round_sample(0, 1, num_clients=7, fraction=1.0, minimum=2), np.arange(7))
    # ceil(0.25 * 10) = 3 sites, drawn from default_rng([seed, round, 1])
    expected = np.sort(np.random.default_rng([5, 2, 1]).choice(10, 3, replace=False))
    np.testing.assert_array_equal(round_sample(5, 2, num_clients=10, fraction=0.25, minimum=1), expected)
    # min-clients wins over a smaller share: ceil(0.01 * 10) = 1 < 4
    assert len(round_sample(0, 1, num_clients=10, fraction=0.01, minimum=4)) == 4
    # a share that covers everyone, or a minimum of everyone: all sites
    np.testing.assert_array_equal(round_sample(0, 3, num_clients=5, fraction=0.99, minimum=1), np.arange(5))
    np.testing.assert_array_equal(round_sample(0, 3, num_clients=5, fraction=0.2, minimum=5), np.arange(5))
    # independent of the public subset's draw for the same seed and round
    draws = [tuple(round_sample(0, r, num_clients=1000, fraction=0.1, minimum=2)) for r in range(1, 6)]
    assert len(set(draws)) == 5 and all(len(d) == 100 and len(set(d)) == 100 for d in draws)
    assert draws[0] != tuple(public_subset(0, 1, num_public=1000, size=100))
    # over many rounds every site is drawn about equally often (100 rounds x 10 of 100 sites)
    counts = np.bincount(np.concatenate([round_sample(3, r, num_clients=100, fraction=0.1, minimum=1)
                                         for r in range(1, 101)]), minlength=100)
    assert counts.sum() == 1000 and counts.min() >= 1 and counts.max() <= 25


def test_noise_seed_resolution():
    from fedkd.seeds import resolve_noise_seed

    assert resolve_noise_seed("auto", deployed=False) == "run-seed"
    assert resolve_noise_seed("auto", deployed=True) == "site-secret"
    assert resolve_noise_seed("run-seed", deployed=True) == "site-secret"  # the server cannot lower it
    assert resolve_noise_seed("secure-rng", deployed=True) == "secure-rng"
    assert resolve_noise_seed("site-secret", deployed=False) == "site-secret"
    assert resolve_noise_seed("auto", deployed=True, site_choice="run-seed") == "run-seed"  # the site's own call
    import pytest

    with pytest.raises(ValueError, match="requested must be one of"):
        resolve_noise_seed("seeded", deployed=True)


def test_keyed_seeds_depend_on_the_key_and_the_seed():
    from fedkd.seeds import keyed_seed, noise_rng_seed

    key, other = bytes(range(32)), bytes(range(1, 33))
    assert keyed_seed(key, 5) == keyed_seed(key, 5)
    assert len({keyed_seed(key, 5), keyed_seed(key, 6), keyed_seed(other, 5)}) == 3
    assert 0 <= keyed_seed(key, 5) < 2**63
    assert noise_rng_seed("run-seed", seed=5) == 5 and noise_rng_seed("secure-rng", seed=5) is None
    assert noise_rng_seed("site-secret", seed=5, key=key) == keyed_seed(key, 5)
