"""fedkd.seeds: every derived seed, by hand."""

from __future__ import annotations

import numpy as np

from fedkd.seeds import public_subset, site_seed, teacher_seed


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
