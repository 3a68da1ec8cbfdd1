"""Canary exposure (Carlini et al. 2019, "The Secret Sharer", Sec. 4).

A canary s[r] is a fixed format ("my pin is {} {} {} {}") filled with a random r from a
space R (here: digits, |R| = 10^slots), inserted k times into a site's private text. A
model's score of a filling is its loss on it (for a classifier: CE of the filled sentence
against the canary's label; lower = the model finds it more familiar). With
rank(s[r]) = 1 + #{r' in R : loss(s[r']) < loss(s[r])},

    exposure = log2 |R| - log2 rank(s[r])

so a canary ranked first among all fillings has exposure log2 |R| (fully extractable by
enumeration) and a typical one ~1.

* :func:`exposure_by_rank` counts the rank among ``candidate_losses`` (all of R when it is
  small enough, else a uniform sample, whose share below the canary estimates rank/|R|).
* :func:`exposure_by_skewnorm` (Secret Sharer Sec. 4.3): fit a skew-normal distribution to
  the candidates' losses and read exposure = -log2 CDF(loss(canary)), which extrapolates
  beyond the sample's resolution of log2(n) bits. It models a continuous loss: where the
  candidates' losses take fewer than :data:`MIN_DISTINCT_LOSSES` distinct values (a one-hot
  release, e.g. randomized response on the label, gives at most R + 1 over R rounds) no
  skew-normal describes them, the maximum-likelihood fit runs off to a degenerate shape
  (|a| ~ 1e7), and the estimate is not defined: NaN (``-`` in reports), not a number.

>>> import numpy as np
>>> round(exposure_by_rank(canary_loss=0.0, candidate_losses=np.arange(1.0, 1024.0),
...                        space_size=1024), 3)
10.0
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import skewnorm

MIN_DISTINCT_LOSSES = 20  # fewer distinct candidate losses: a discrete release, no skew-normal fit


def exposure_by_rank(*, canary_loss: float, candidate_losses: np.ndarray, space_size: int) -> float:
    """log2 |R| - log2 rank, rank estimated as 1 + |R| * share of candidates with a lower
    loss (exact when ``candidate_losses`` are all other fillings of R); ties count half."""
    losses = np.asarray(candidate_losses, dtype=np.float64)
    if losses.size == 0 or space_size < 1:
        raise ValueError("need at least one candidate and a space of at least one filling")
    below = float(np.sum(losses < canary_loss) + 0.5 * np.sum(losses == canary_loss))
    exhaustive = losses.size >= space_size - 1
    rank = 1.0 + (below if exhaustive else below / losses.size * (space_size - 1))
    return float(math.log2(space_size) - math.log2(rank))


def exposure_by_skewnorm(*, canary_loss: float | np.ndarray, candidate_losses: np.ndarray) -> float | np.ndarray:
    """-log2 F(loss(canary)), F the skew-normal CDF fitted to the candidates' losses.

    ``canary_loss`` may be a scalar or an array of losses (e.g. the secret and the control):
    the fit, the expensive part, is done once for all of them and the result has their shape.
    0 where every candidate has the same loss (a full tie); NaN where they repeat and take
    fewer than ``MIN_DISTINCT_LOSSES`` distinct values (a discrete release: not defined)."""
    canary = np.asarray(canary_loss, dtype=np.float64)
    losses = np.asarray(candidate_losses, dtype=np.float64)
    if losses.size < 3 or np.ptp(losses) == 0:
        out = np.zeros_like(canary)
    elif np.unique(losses).size < min(MIN_DISTINCT_LOSSES, losses.size):
        out = np.full_like(canary, np.nan)
    else:
        a, loc, scale = skewnorm.fit(losses)
        out = -skewnorm.logcdf(canary, a, loc, scale) / math.log(2)
    return float(out) if out.ndim == 0 else out


def format_slots(fmt: str) -> int:
    """Number of digit slots ``{}`` in a canary format."""
    return fmt.count("{}")


def fill(fmt: str, digits: tuple[int, ...] | np.ndarray) -> str:
    """``fill("my pin is {} {} {} {}", (4, 8, 1, 5))`` -> ``"my pin is 4 8 1 5"``."""
    return fmt.format(*[int(d) for d in digits])


def candidate_fillings(*, fmt: str, exclude: list[tuple[int, ...]], max_candidates: int,
                       seed: int) -> tuple[list[tuple[int, ...]], int]:
    """Fillings of R to rank a canary against, and |R|: every filling except ``exclude``
    when |R| - 1 <= ``max_candidates``, else ``max_candidates`` distinct random ones."""
    slots = format_slots(fmt)
    space = 10**slots
    excluded = {tuple(int(d) for d in e) for e in exclude}
    if space - len(excluded) <= max_candidates:
        codes = range(space)
    else:
        codes = np.random.default_rng([seed, 31337]).choice(space, max_candidates + len(excluded), replace=False)
    out = []
    for code in codes:
        digits = tuple(int(c) for c in str(int(code)).zfill(slots))
        if digits not in excluded:
            out.append(digits)
    return out[:max_candidates], space
