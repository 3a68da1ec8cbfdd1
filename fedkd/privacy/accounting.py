"""Privacy accounting: one (epsilon, delta) budget for a site's whole run, and its ledger.

A site promises "(epsilon, delta)-DP for my private examples over the whole federation".
It trains on its private data only with DP-SGD (Abadi et al. 2016, "Deep Learning with
Differential Privacy", Alg. 1) through Opacus: at every step

1. *Poisson sampling*: each of the n private examples joins the batch independently with
   probability q (the batch size varies, E|B| = q n);
2. *per-example clipping*: each example's gradient g_i is scaled to
   g_i * min(1, C / ||g_i||_2), so one example moves the sum by at most C (``max_grad_norm``);
3. *Gaussian noise*: g = (sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / (q n), i.e. noise std
   = ``noise_multiplier`` * ``max_grad_norm`` on the sum (Opacus ``DPOptimizer``).

Everything the site releases afterwards (knowledge on public inputs, metrics) is
post-processing of the DP-trained model and costs no further privacy.

Accounting. Each step is one use of the Sampled Gaussian Mechanism SGM(q, sigma). An Opacus
accountant keeps the history [(sigma, q, steps), ...] and :func:`compose_epsilon` converts it
to epsilon at the site's delta with the accountant named by ``privacy.accountant``:

* ``prv`` (the default): numerical composition of privacy-loss random variables (Gopi,
  Lee, Wutschitz 2021, "Numerical Composition of Differential Privacy"), Opacus's
  ``PRVAccountant``, whose *upper* end of the error bracket is used, so it is a sound
  bound; the tightest sound accountant Opacus has. fedkd reports min(PRV, RDP): both are
  upper bounds on the same mechanism's epsilon at the same delta, so their minimum is one
  too. PRV is skipped (RDP certifies, and the ledger row names ``rdp``) where it is slow
  or fragile and the answer is no longer useful: RDP epsilon above
  :data:`PRV_MAX_EPSILON`, more than :data:`PRV_MAX_STEPS` steps or more than
  :data:`PRV_MAX_SEGMENTS` history segments, or when PRV raises or returns a non-finite
  value. For a site of 318 examples, q 0.1, sigma 1.28, 100 steps at delta 3.1e-4 PRV
  certifies 3.48 where RDP says 3.99 and Google's independent PLD accountant
  (``dp_accounting``) 3.47 (tests/test_privacy.py checks the agreement);
* ``rdp``: Renyi DP (Mironov 2017; Mironov, Talwar, Zhang 2019 for the subsampled Gaussian),
  converted with Balle et al. 2020, Thm 21, over the orders :data:`RDP_ALPHAS` (Opacus's
  defaults widened on both sides, so that the optimal order is interior for the sigmas the
  calibration visits, up to 50, and Opacus's "optimal order is the largest alpha" warning
  does not fire);
* ``gdp``: Gaussian DP CLT approximation (Bu et al. 2020); Opacus marks it experimental,
  it can *under*-estimate epsilon. Not a sound default.

Delta. ``privacy.delta = 0`` means :func:`default_delta`: delta = min(1e-5, 1 / (100 n)).

One budget, not one per round (DESIGN.md section 5):

* :func:`plan_privacy` fixes (epsilon, delta) and the number of local steps planned over
  *all* rounds, T = rounds * ceil(epochs_per_round / q), and calibrates sigma once so that
  epsilon(SGM(q, sigma) composed T times, delta) <= epsilon_target.
* :class:`PrivacyLedger` owns the one accountant of the run. Its history travels in the
  client's persistent state (:meth:`PrivacyLedger.to_json`), so epsilon accumulates across
  rounds and across process restarts.
* :func:`train_private` builds a fresh Opacus ``PrivacyEngine`` every round but replaces the
  engine's accountant with the ledger's before ``make_private``, so Opacus's step hook
  appends to the run's history. (Flower's Opacus example builds a new engine, and hence a
  new accountant, every round and reports per-round epsilon: that under-reports the
  spend.) Before a round it checks that the whole round still fits in the budget; if not it
  does not train, so the reported epsilon never exceeds the target.

Sample rate. q = 1 / ceil(n / B) for batch size B: exactly the rate that Opacus's
``make_private`` derives from a ``DataLoader`` with batch size B (``1 / len(data_loader)``),
and equal to B / n whenever B divides n. Using Opacus's own definition makes the rate the
plan calibrates for, the rate the Poisson sampler draws with and the rate the accountant
records the same float, with no patching of Opacus's hook.

No Flower imports here. In a client's train handler (glue)::

    plan = plan_privacy(target_epsilon=eps, delta=None, num_examples=len(train),
                        batch_size=b, epochs_per_round=e, rounds=num_server_rounds)
    ledger = PrivacyLedger(plan)
    if stored := context.state.get(...):            # JSON text from an earlier round
        ledger.load_state_dict(json.loads(stored))  # refuses a state made for another plan
    result = train_private(model, train, plan=plan, ledger=ledger, lr=lr, seed=seed)
    # store ledger.to_json() back; report result.epsilon, result.stopped, result.reason
    # report ledger_metrics(ledger); the server keeps ledger_row(metrics=...) per site
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

    from fedkd.config import Config, PrivacyConfig


# Opacus is imported on first use: a site without DP (and every Flower ClientApp process,
# started once per message in a deployment) does not pay its ~2 s import.


def import_opacus(module: str) -> Any:
    """``importlib.import_module(module)`` for an Opacus module, without the handler Opacus
    puts on the root logger when first imported (``logging.basicConfig`` in
    ``opacus/utils/module_utils.py``): with it, every line of Flower's logger (which
    propagates to the root) would print a second time in Opacus's format."""
    root = logging.getLogger()
    before = list(root.handlers)
    imported = importlib.import_module(module)
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
    return imported


def create_accountant(mechanism: str) -> IAccountant:
    return import_opacus("opacus.accountants").create_accountant(mechanism=mechanism)


def get_noise_multiplier(**kwargs: Any) -> float:
    return import_opacus("opacus.accountants.utils").get_noise_multiplier(**kwargs)


ACCOUNTANTS = ("rdp", "prv", "gdp")
"""Accountant names accepted by :func:`plan_privacy` (Opacus's registry names)."""

DEFAULT_ACCOUNTANT = "prv"
"""The tightest sound accountant (module doc), used unless ``privacy.accountant`` says otherwise."""

DEFAULT_DELTA_CAP = 1e-5
"""The largest delta :func:`default_delta` gives."""

RDP_ALPHAS: tuple[float, ...] = (
    *(1 + x / 100 for x in range(1, 10)),
    *(1 + x / 10 for x in range(1, 100)),
    *range(12, 64),
    *sorted({int(round(64 * 1.25**k)) for k in range(1, 16)}),
)
"""RDP orders fedkd optimises over: Opacus's defaults (1.1 ... 10.9, 12 ... 63) plus
1.01 ... 1.09 and 80 ... 1819 (a factor 1.25 apart), so the optimum is interior for
sigma up to 50 at the sample rates and step counts fedkd plans (the largest order needed
there is about 1000)."""

PRV_MAX_EPSILON = 50.0
"""Above this RDP epsilon PRV is not tried: its domain grows with epsilon (minutes and
gigabytes near epsilon 500) and such a spend is meaningless anyway; RDP certifies it."""

PRV_MAX_STEPS = 20_000
"""Most steps PRV composes (about 2 s at 10^4 steps, 8 s at 10^5); RDP beyond."""

PRV_MAX_SEGMENTS = 4
"""Most distinct (sigma, q) segments PRV composes (each costs a convolution: 20 segments
take about 15 s); a site's history is one segment unless its sigma changed."""

MAX_HISTORY = 10_000
"""Most (sigma, q, steps) segments a stored or received history may hold."""

MAX_STEPS = 10**9
"""Most DP-SGD steps one history segment (or one round's report) may count."""

MAX_NOISE_MULTIPLIER = 50.0
"""Above this sigma the noise drowns any clipped gradient: the plan is refused as unreachable."""

EPSILON_TOLERANCE = 0.01
"""Binary-search tolerance of the calibration: sigma gives target - 0.01 < epsilon <= target."""

_STATE_FORMAT = "fedkd.privacy-ledger/1"

EXTENSIBLE_PLAN_FIELDS = ("rounds", "planned_steps", "noise_multiplier")
"""Plan fields that differ when a run is resumed with another ``num-server-rounds``; the
budget (target, delta, q, steps per round, clipping, accountant, data size) may not."""


class PrivacyConfigError(ValueError):
    """A privacy setting that cannot give the promised guarantee (message names the setting)."""


class PrivacyStateError(ValueError):
    """A stored ledger state that cannot be loaded (message names the key)."""


# ------------------------------------------------------------------------------ maths


def default_delta(num_examples: int) -> float:
    """delta = min(1e-5, 1 / (100 n)) for a site of n private examples.

    Why. (epsilon, delta)-DP with delta >= 1/n permits a mechanism that publishes a random
    example outright with probability delta * n >= 1, so delta must be far below 1/n; the
    quantity that matters is delta * n, a bound on the chance that *some* example's
    guarantee fails. The rule keeps delta * n <= 0.01 at every n (1/(100 n) above
    n = 1000) and gives the conventional 1e-5 (the value docs and most DP-SGD papers state)
    for the site sizes fedkd runs (n <= 1000: delta * n <= 0.01). The old default
    1 / (10 n) gave 3e-4 to 7e-3 on the digits sites, delta * n = 0.1.
    """
    if num_examples < 1:
        raise PrivacyConfigError(f"num_examples must be >= 1; got {num_examples}")
    return min(DEFAULT_DELTA_CAP, 1.0 / (100 * num_examples))


def sample_rate_for(*, num_examples: int, batch_size: int) -> float:
    """Poisson sample rate q = 1 / ceil(n / B), the rate Opacus's ``make_private`` uses for a
    ``DataLoader`` of batch size B (= B / n when B divides n; q = 1 when B >= n)."""
    return 1 / ((num_examples + batch_size - 1) // batch_size)


def steps_for(*, epochs: float, sample_rate: float) -> int:
    """DP-SGD steps for ``epochs`` passes at rate q: ceil(epochs / q) (one epoch is 1/q
    expected steps). The 1e-9 guard keeps float noise such as 3 / (1/7) = 21.000000000000004
    from adding a step."""
    return max(0, math.ceil(epochs / sample_rate - 1e-9))


def epsilon_for(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """epsilon of SGM(q = ``sample_rate``, sigma = ``noise_multiplier``) composed ``steps``
    times, at ``delta``, by the named accountant (:func:`compose_epsilon`; 0.0 for zero steps)."""
    return compose_epsilon(history=[(noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant)


def _bracket_search(epsilon_of: Any, *, target: float, high: float, shrink: float = 0.5) -> float:
    """Smallest sigma in (0, ``high``] (within :data:`EPSILON_TOLERANCE` in epsilon) with
    ``epsilon_of(sigma) <= target``, given ``epsilon_of(high) <= target``; epsilon is
    decreasing in sigma. Illinois false position on (log sigma, log epsilon), which is
    nearly linear, so 3-6 evaluations instead of bisection's 10-15. The invariant
    epsilon(high) <= target holds throughout, so the result never overshoots."""
    eps_high = epsilon_of(high)
    if target - eps_high <= EPSILON_TOLERANCE:
        return high
    low = high * shrink
    while (eps_low := epsilon_of(low)) <= target:
        high, eps_high, low = low, eps_low, low * shrink
        if target - eps_high <= EPSILON_TOLERANCE:
            return high
    lt, ht = math.log(target), None
    side = 0
    for _ in range(40):
        la, lb = math.log(eps_low), math.log(max(eps_high, 1e-300))
        ht = (math.log(low) * (lb - lt) - math.log(high) * (la - lt)) / (lb - la)
        sigma = math.exp(ht)
        if not low < sigma < high:
            sigma = math.sqrt(low * high)
        eps = epsilon_of(sigma)
        if eps <= target:
            high, eps_high = sigma, eps
            if target - eps_high <= EPSILON_TOLERANCE:
                return high
            if side == 1:  # Illinois: the same end moved twice, halve the other's weight
                eps_low = math.exp((math.log(eps_low) + lt) / 2)
            side = 1
        else:
            low, eps_low = sigma, eps
            if side == -1:
                eps_high = math.exp((math.log(max(eps_high, 1e-300)) + lt) / 2)
            side = -1
    return high


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """Smallest sigma (within the search tolerance) with epsilon_for(sigma, q, T) <= target.

    A bracketed search (:func:`_bracket_search`, like Opacus's ``get_noise_multiplier``
    it returns the upper end of the bracket) on the very function that reports the spend
    (:func:`epsilon_for`), so calibration and reporting agree: from sigma = 50 for ``rdp``
    and ``gdp``; for ``prv`` from the RDP answer, an upper end since fedkd's ``prv``
    epsilon is at most RDP's (:func:`compose`).
    Either way the result never overshoots: target - 0.01 < epsilon <= target. A target
    that needs sigma > :data:`MAX_NOISE_MULTIPLIER` is refused with
    :class:`PrivacyConfigError` before the search.
    """
    ceiling = epsilon_for(
        noise_multiplier=MAX_NOISE_MULTIPLIER,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        accountant="rdp" if accountant == "prv" else accountant,
    )
    if not ceiling <= target_epsilon:
        raise PrivacyConfigError(
            f"target epsilon {target_epsilon:g} is unreachable with {steps} steps at sample "
            f"rate {sample_rate:.4g}: even noise multiplier {MAX_NOISE_MULTIPLIER:g} spends "
            f"epsilon {ceiling:.3g}; lower rounds or epochs per round, or raise epsilon"
        )
    def epsilon_of(name: str) -> Any:
        return lambda s: epsilon_for(noise_multiplier=s, sample_rate=sample_rate, steps=steps, delta=delta,
                                     accountant=name)

    if accountant != "prv":
        return _bracket_search(epsilon_of(accountant), target=target_epsilon, high=MAX_NOISE_MULTIPLIER)
    high = _bracket_search(epsilon_of("rdp"), target=target_epsilon, high=MAX_NOISE_MULTIPLIER)
    return _bracket_search(epsilon_of("prv"), target=target_epsilon, high=high, shrink=0.75)


# ------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PrivacyPlan:
    """A site's privacy budget for the whole run and the DP-SGD settings that meet it.

    ``noise_multiplier`` sigma is calibrated once so that ``planned_steps`` steps of
    SGM(``sample_rate``, sigma) spend at most ``target_epsilon`` at ``delta``;
    ``steps_per_round`` = ceil(epochs_per_round / q) (one epoch is 1/q expected steps) and
    ``planned_steps`` = steps_per_round * rounds. Noise std on the clipped sum is
    sigma * ``max_grad_norm``.
    """

    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_steps: int
    accountant: str
    max_grad_norm: float
    num_examples: int
    batch_size: int
    epochs_per_round: float
    rounds: int

    @property
    def expected_batch_size(self) -> float:
        """E|B| = q n."""
        return self.sample_rate * self.num_examples


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def plan_privacy(
    *,
    target_epsilon: float,
    delta: float | None = None,
    num_examples: int,
    batch_size: int,
    epochs_per_round: float,
    rounds: int,
    accountant: str = DEFAULT_ACCOUNTANT,
    max_grad_norm: float = 1.0,
) -> PrivacyPlan:
    """Validate a site's privacy settings and calibrate the noise multiplier once for the run.

    q = 1 / ceil(num_examples / batch_size) (see the module doc), steps per round
    S = ceil(epochs_per_round / q), planned steps T = S * rounds, and sigma =
    :func:`calibrate_noise_multiplier` (target_epsilon, delta, q, T). ``delta=None`` means
    :func:`default_delta` (min(1e-5, 1 / (100 n))).

    Every invalid setting is collected and reported in one :class:`PrivacyConfigError`;
    a target that would need sigma > 50 is refused as unreachable.
    """
    problems: list[str] = []
    if not _is_int(num_examples) or num_examples < 1:
        problems.append(f"num_examples must be an integer >= 1; got {num_examples!r}")
    if not _is_int(batch_size) or batch_size < 1:
        problems.append(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if not _is_int(rounds) or rounds < 1:
        problems.append(f"rounds must be an integer >= 1; got {rounds!r}")
    if not _is_real(epochs_per_round) or not (math.isfinite(epochs_per_round) and epochs_per_round > 0):
        problems.append(f"epochs_per_round must be a finite number > 0; got {epochs_per_round!r}")
    if not _is_real(target_epsilon) or not (math.isfinite(target_epsilon) and target_epsilon > 0):
        problems.append(f"target_epsilon must be a finite number > 0; got {target_epsilon!r}")
    if not _is_real(max_grad_norm) or not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        problems.append(f"max_grad_norm must be a finite number > 0; got {max_grad_norm!r}")
    if accountant not in ACCOUNTANTS:
        problems.append(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")
    n_ok = _is_int(num_examples) and num_examples >= 1
    if delta is None:
        if n_ok:
            delta = default_delta(num_examples)
    elif not _is_real(delta) or not (0 < delta < 1):
        problems.append(f"delta must be in (0, 1); got {delta!r}")
    elif n_ok and delta >= 1 / num_examples:
        problems.append(
            f"delta {delta:g} is >= 1/num_examples = 1/{num_examples}: such a delta allows "
            f"releasing an example outright; use delta << 1/n, e.g. the default min(1e-5, 1/(100 n)) = "
            f"{default_delta(num_examples):.3g}"
        )
    if problems:
        raise PrivacyConfigError("invalid privacy config: " + "; ".join(problems))

    q = sample_rate_for(num_examples=int(num_examples), batch_size=int(batch_size))
    steps_per_round = steps_for(epochs=float(epochs_per_round), sample_rate=q)
    planned_steps = steps_per_round * int(rounds)
    sigma = calibrate_noise_multiplier(
        target_epsilon=float(target_epsilon),
        delta=float(delta),
        sample_rate=q,
        steps=planned_steps,
        accountant=accountant,
    )
    return PrivacyPlan(
        target_epsilon=float(target_epsilon),
        delta=float(delta),
        noise_multiplier=sigma,
        sample_rate=q,
        steps_per_round=steps_per_round,
        planned_steps=planned_steps,
        accountant=accountant,
        max_grad_norm=float(max_grad_norm),
        num_examples=int(num_examples),
        batch_size=int(batch_size),
        epochs_per_round=float(epochs_per_round),
        rounds=int(rounds),
    )


# ----------------------------------------------------------------------------- ledger

History = list[tuple[float, float, int]]


def _extend(history: History, *, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """``history`` with ``steps`` more SGM steps, merged into the last segment when sigma and
    q are unchanged (as Opacus's ``step`` does; the ``gdp`` accountant reads only the last
    segment, so merging is required there and harmless for ``rdp``/``prv``)."""
    out = list(history)
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(steps))
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out


class PrivacyLedger:
    """The run's privacy spend for one site: an Opacus accountant plus the plan it serves.

    State is the accountant's raw history [(sigma, q, steps), ...]; epsilon is computed
    when asked. :func:`train_private` hands :attr:`accountant` to Opacus, whose step hook
    appends to it. ``to_json``/``from_json`` carry it through ``context.state``.
    """

    def __init__(self, plan: PrivacyPlan) -> None:
        self.plan = plan
        self.accountant: IAccountant = create_accountant(mechanism=plan.accountant)

    # -- plan values
    @property
    def target_epsilon(self) -> float:
        return self.plan.target_epsilon

    @property
    def delta(self) -> float:
        return self.plan.delta

    @property
    def noise_multiplier(self) -> float:
        return self.plan.noise_multiplier

    @property
    def sample_rate(self) -> float:
        return self.plan.sample_rate

    # -- spend
    @property
    def history(self) -> History:
        """A copy of the accountant's history, as (sigma, q, steps) tuples."""
        return [(float(s), float(q), int(n)) for s, q, n in self.accountant.history]

    @property
    def steps(self) -> int:
        """Total DP-SGD steps taken so far (sum over history; not ``len(accountant)``,
        which Opacus's RDP accountant defines as the number of segments)."""
        return sum(n for _, _, n in self.history)

    def epsilon(self) -> float:
        """epsilon spent so far at the plan's delta (0.0 before the first step)."""
        return self._epsilon_of(self.history)

    def epsilon_after(self, steps: int) -> float:
        """epsilon if ``steps`` more steps of SGM(plan q, plan sigma) were taken (no mutation)."""
        return self._epsilon_of(
            _extend(
                self.history,
                noise_multiplier=self.plan.noise_multiplier,
                sample_rate=self.plan.sample_rate,
                steps=steps,
            )
        )

    def can_afford(self, steps: int) -> bool:
        """True if ``steps`` more steps keep the spend within the target: epsilon_after <= target."""
        return self.epsilon_after(steps) <= self.plan.target_epsilon

    def record(self, steps: int) -> None:
        """Append ``steps`` steps of SGM(plan q, plan sigma): for DP-SGD run outside
        :func:`train_private` (inside it Opacus's hook records every step)."""
        if not _is_int(steps) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0; got {steps!r}")
        self.accountant.history = _extend(
            self.history,
            noise_multiplier=self.plan.noise_multiplier,
            sample_rate=self.plan.sample_rate,
            steps=int(steps),
        )

    def _epsilon_of(self, history: History) -> float:
        return compose_epsilon(history=history, delta=self.plan.delta, accountant=self.plan.accountant)

    # -- persistence
    def state_dict(self) -> dict[str, Any]:
        """JSON-compatible state: format tag, plan fields, mechanism, history as lists."""
        return {
            "format": _STATE_FORMAT,
            "plan": dataclasses.asdict(self.plan),
            "mechanism": self.accountant.mechanism(),
            "history": [[s, q, n] for s, q, n in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history (and the plan) with the stored ones.

        The stored plan's budget must equal this ledger's: every field but
        :data:`EXTENSIBLE_PLAN_FIELDS`, which change when a run is resumed with another
        ``num-server-rounds``. Then the stored plan is kept: its sigma was calibrated for the
        rounds planned first, so an extended run spends what is left of the same budget at
        the same sigma and then stops private training (``dp-stopped``), as documented.
        Raises :class:`PrivacyStateError` naming the missing key or the differing fields."""
        plan, history = _parse_state(state)
        diffs = [
            f"{f.name}: stored {getattr(plan, f.name)!r}, current {getattr(self.plan, f.name)!r}"
            for f in dataclasses.fields(PrivacyPlan)
            if f.name not in EXTENSIBLE_PLAN_FIELDS and getattr(plan, f.name) != getattr(self.plan, f.name)
        ]
        if diffs:
            raise PrivacyStateError(
                "stored privacy ledger was made for a different budget (a run's budget cannot "
                "change mid-run): " + "; ".join(diffs)
            )
        self.plan = plan
        self.accountant.load_state_dict({"history": history, "mechanism": state["mechanism"]})

    def adopt(self, history: Sequence[Sequence[float]]) -> bool:
        """Take ``history`` (the server's record of this site's spend, see
        :func:`ledger_row`) in place of the ledger's own when it spends more; never lowers
        the spend. A site whose state was lost, or rolled back to retry a round, so learns
        what it has already spent. Returns True when the history was taken."""
        parsed = parse_history(history)
        if compose_epsilon(history=parsed, delta=self.plan.delta, accountant=self.plan.accountant) \
                <= self.epsilon():
            return False
        self.accountant.history = parsed
        return True

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        """A ledger rebuilt from :meth:`state_dict` output, plan included."""
        plan, _ = _parse_state(state)
        ledger = cls(plan)
        ledger.load_state_dict(state)
        return ledger

    def to_json(self) -> str:
        return json.dumps(self.state_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        try:
            state = json.loads(text)
        except (TypeError, json.JSONDecodeError) as err:
            raise PrivacyStateError(f"stored privacy ledger is not valid JSON: {err}") from None
        return cls.from_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(epsilon={self.epsilon():.4g} of {self.plan.target_epsilon:g}, "
            f"delta={self.plan.delta:.3g}, steps={self.steps}/{self.plan.planned_steps}, "
            f"accountant={self.plan.accountant!r})"
        )


def parse_history(entries: Any, *, key: str = "history") -> History:
    """``[(sigma, q, steps), ...]`` from a list of triples, checked: sigma >= 0 finite,
    0 < q <= 1, steps an integer >= 0, at most :data:`MAX_HISTORY` segments; raises
    :class:`PrivacyStateError` naming the bad entry (``key`` names the list)."""
    if isinstance(entries, np.ndarray):
        entries = entries.tolist()
    if not isinstance(entries, (list, tuple)) or len(entries) > MAX_HISTORY:
        raise PrivacyStateError(f"{key} must be a list of at most {MAX_HISTORY} [sigma, q, steps]; "
                                f"got {type(entries).__name__}")
    history: History = []
    for i, entry in enumerate(entries):
        steps = entry[2] if isinstance(entry, (list, tuple)) and len(entry) == 3 else None
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)  # an array row carries floats
        ok = (
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and _is_real(entry[0])
            and _is_real(entry[1])
            and _is_int(steps)
            and math.isfinite(entry[0])
            and entry[0] >= 0
            and 0 < entry[1] <= 1
            and 0 <= steps <= MAX_STEPS
        )
        if not ok:
            raise PrivacyStateError(
                f"{key}[{i}] must be [noise_multiplier >= 0, 0 < sample_rate <= 1, steps >= 0]; got {entry!r}"
            )
        history.append((float(entry[0]), float(entry[1]), int(steps)))
    return history


def compose_epsilon(*, history: Sequence[tuple[float, float, int]], delta: float,
                    accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """epsilon at ``delta`` of the SGM segments ``history`` composed by the named accountant
    (0.0 for no steps); :func:`compose` also says which accountant certified it."""
    return compose(history=history, delta=delta, accountant=accountant)[0]


def compose(*, history: Sequence[tuple[float, float, int]], delta: float,
            accountant: str = DEFAULT_ACCOUNTANT) -> tuple[float, str]:
    """``(epsilon, certified_by)``: epsilon at ``delta`` of the SGM segments ``history``
    [(sigma, q, steps), ...] and the accountant that gave it.

    ``rdp``: RDP over :data:`RDP_ALPHAS`. ``prv``: min(PRV upper bound, RDP), both sound
    upper bounds (module doc), with the RDP figure alone where PRV is out of its range
    (:data:`PRV_MAX_EPSILON`, :data:`PRV_MAX_STEPS`, :data:`PRV_MAX_SEGMENTS`) or fails;
    ``certified_by`` is then ``rdp``. ``gdp``: Opacus's GDP, which reads only the last
    segment, so a history of several (sigma, q) segments is composed by ``rdp`` instead
    of being under-counted. Results are cached (the ledger asks for the same history
    several times a round)."""
    key = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")
    if not key:
        return 0.0, accountant
    return _compose_cached(key, float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _compose_cached(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> tuple[float, str]:
    if accountant == "gdp" and len(history) == 1:
        acc = create_accountant(mechanism="gdp")
        acc.history = list(history)
        return float(acc.get_epsilon(delta=delta)), "gdp"
    rdp = _rdp_epsilon(history, delta)
    if accountant != "prv" or not (rdp <= PRV_MAX_EPSILON and sum(n for _, _, n in history) <= PRV_MAX_STEPS
                                   and len(history) <= PRV_MAX_SEGMENTS):
        return rdp, "rdp"
    prv = _prv_epsilon(history, delta)
    return (prv, "prv") if prv < rdp else (rdp, "rdp")


def _rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """RDP epsilon of ``history`` at ``delta`` over :data:`RDP_ALPHAS` (Opacus's analysis)."""
    rdp_analysis = import_opacus("opacus.accountants.analysis.rdp")
    orders = list(RDP_ALPHAS)
    total = sum(np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders))
                for s, q, n in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


def _prv_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Opacus's PRV upper bound on epsilon (inf when it fails: the caller then keeps RDP)."""
    import warnings

    acc = create_accountant(mechanism="prv")
    acc.history = list(history)
    try:
        with warnings.catch_warnings():
            # PRV sizes its discretisation domain with an RDP bound over Opacus's default
            # orders; a loose bound there only widens the domain (still sound), so that
            # one message is not the user's concern here. Nothing else is filtered.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            eps = float(acc.get_epsilon(delta=delta))
    except (ValueError, RuntimeError, FloatingPointError, OverflowError, MemoryError):
        return math.inf
    return eps if math.isfinite(eps) and eps >= 0 else math.inf


def _parse_state(state: Mapping[str, Any]) -> tuple[PrivacyPlan, History]:
    if not isinstance(state, Mapping):
        raise PrivacyStateError(f"privacy ledger state must be a mapping; got {type(state).__name__}")
    for key in ("format", "plan", "mechanism", "history"):
        if key not in state:
            raise PrivacyStateError(f"privacy ledger state has no key '{key}'")
    if state["format"] != _STATE_FORMAT:
        raise PrivacyStateError(
            f"privacy ledger state key 'format' is {state['format']!r}; expected {_STATE_FORMAT!r}"
        )
    stored = state["plan"]
    if not isinstance(stored, Mapping):
        raise PrivacyStateError("privacy ledger state key 'plan' must be a mapping")
    for f in dataclasses.fields(PrivacyPlan):
        if f.name not in stored:
            raise PrivacyStateError(f"privacy ledger state has no key 'plan.{f.name}'")
    plan = PrivacyPlan(**{f.name: stored[f.name] for f in dataclasses.fields(PrivacyPlan)})
    if state["mechanism"] != plan.accountant:
        raise PrivacyStateError(
            f"privacy ledger state key 'mechanism' is {state['mechanism']!r} but its plan "
            f"uses accountant {plan.accountant!r}"
        )
    history = parse_history(state["history"], key="privacy ledger state key history")
    return plan, history




# ----------------------------------------------------------------------- a site's plan


def site_privacy_plan(config: Config, num_examples: int, client: int | None = None) -> PrivacyPlan:
    """Site ``client``'s whole-run plan: (``privacy.target-epsilon``, delta) over
    ``num-server-rounds`` rounds of ``privacy.local-epochs`` epochs (``teacher.epochs`` on a
    teacher site, where the teacher is the only model that reads private data) on its
    ``num_examples`` private examples; sigma calibrated once (:func:`plan_privacy`)."""
    epochs = config.privacy.local_epochs
    if client is not None and config.teacher_for(client):
        epochs = config.teacher.epochs
    return _cached_plan(config.privacy, int(num_examples), config.train.batch_size, epochs,
                        config.num_server_rounds)


@functools.lru_cache(maxsize=256)
def _cached_plan(privacy: PrivacyConfig, n: int, batch_size: int, epochs: int, rounds: int) -> PrivacyPlan:
    # calibration is a binary search over the accountant (~1-2 s); do it once per process
    from fedkd.privacy.selection import dp_sgd_target

    target = privacy.target_epsilon  # DP model selection takes its share first (fedkd/privacy/selection.py)
    if privacy.selection != "off":
        target = dp_sgd_target(target_epsilon=target, selection_epsilon=privacy.selection_epsilon)
    return plan_privacy(
        target_epsilon=target,
        delta=privacy.delta or None,
        num_examples=n,
        batch_size=batch_size,
        epochs_per_round=epochs,
        rounds=rounds,
        accountant=privacy.accountant,
        max_grad_norm=privacy.max_grad_norm,
    )


def check_privacy_plans(config: Config, train_sizes: Sequence[int]) -> list[PrivacyPlan]:
    """Plan every site's budget (site c holds ``train_sizes[c]`` private examples) before
    the run starts; refuse the config with one :class:`~fedkd.config.ConfigError` naming each
    site whose target cannot be met. Empty when privacy is off."""
    from fedkd.config import ConfigError

    if not config.privacy.enabled:
        return []
    plans, problems = [], []
    for client, n in enumerate(train_sizes):
        try:
            plans.append(site_privacy_plan(config, n, client))
        except PrivacyConfigError as err:
            problems.append(f"privacy (site {client}, {n} private examples): {err}")
    if problems:
        raise ConfigError(problems)
    return plans


# ------------------------------------------------------------------- the ledger's rows

LEDGER_METRICS = ("epsilon", "dp-target-epsilon", "dp-delta", "dp-noise-multiplier",
                  "dp-sample-rate", "dp-steps", "dp-planned-steps", "dp-round-steps", "dp-stopped",
                  "dp-noise-seed")
"""The metrics a DP site reports every round (numbers only, as Flower's MetricRecord needs);
``dp-noise-seed`` is the index of its noise source in :data:`fedkd.seeds.NOISE_SEEDS`."""


def ledger_metrics(ledger: PrivacyLedger, *, round_steps: int = 0, stopped: bool = False,
                   noise_seed: str = "run-seed") -> dict[str, float]:
    """The ledger's state as the round metrics :data:`LEDGER_METRICS`: the run's spend so
    far, the plan, this round's steps (``round_steps``), whether private training stopped,
    and where the round's noise came from (``noise_seed``, one of
    :data:`fedkd.seeds.NOISE_SEEDS`)."""
    from fedkd.seeds import NOISE_SEEDS

    plan = ledger.plan
    return {
        "epsilon": ledger.epsilon(),
        "dp-target-epsilon": plan.target_epsilon,
        "dp-delta": plan.delta,
        "dp-noise-multiplier": plan.noise_multiplier,
        "dp-sample-rate": plan.sample_rate,
        "dp-steps": float(ledger.steps),
        "dp-planned-steps": float(plan.planned_steps),
        "dp-round-steps": float(round_steps),
        "dp-stopped": float(bool(stopped)),
        "dp-noise-seed": float(NOISE_SEEDS.index(noise_seed)),
    }


def _checked_figures(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`LEDGER_METRICS` of a reply, checked (a site's report is a claim): each a
    finite real number; epsilon >= 0, target > 0, 0 < delta < 1, 0 <= sigma <= 10^6,
    0 < q <= 1, step counts integers in 0..:data:`MAX_STEPS`, ``dp-stopped`` 0 or 1,
    ``dp-noise-seed`` an index of :data:`fedkd.seeds.NOISE_SEEDS`. Raises ValueError naming
    the first bad metric, its bounds and the value received."""
    from fedkd.seeds import NOISE_SEEDS

    bounds = {  # name: (low, high, low open, integer)
        "epsilon": (0.0, math.inf, False, False),
        "dp-target-epsilon": (0.0, math.inf, True, False),
        "dp-delta": (0.0, 1.0, True, False),
        "dp-noise-multiplier": (0.0, 1e6, False, False),
        "dp-sample-rate": (0.0, 1.0, True, False),
        "dp-steps": (0, MAX_STEPS, False, True),
        "dp-planned-steps": (0, MAX_STEPS, False, True),
        "dp-round-steps": (0, MAX_STEPS, False, True),
        "dp-stopped": (0, 1, False, True),
        "dp-noise-seed": (0, len(NOISE_SEEDS) - 1, False, True),
    }
    out: dict[str, Any] = {}
    for name, (low, high, low_open, integer) in bounds.items():
        value = metrics[name]
        ok = _is_real(value) and math.isfinite(value) and (value > low if low_open else value >= low) \
            and value <= high and (not integer or float(value).is_integer())
        if name == "dp-delta" and ok:
            ok = value < 1
        if not ok:
            kind = "an integer" if integer else "a finite number"
            raise ValueError(f"metric {name} must be {kind} in {'(' if low_open else '['}{low:g}, {high:g}]; "
                             f"got {value!r}")
        out[name] = int(value) if integer else float(value)
    return out


def ledger_row(*, metrics: Mapping[str, Any], accountant: str, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One site's row of the run's privacy ledger (``summary.json``'s ``privacy.ledger``),
    kept by the server, from the site's latest round metrics (:func:`ledger_metrics`) and
    the row it replaces (``previous``). The only place this row is built.

    The server's ledger is authoritative: ``history`` is the server's own record of the
    site's spend, [(sigma, q, steps), ...], one segment per accepted round (this round's
    ``dp-round-steps`` at the reported sigma and q, appended, merged like Opacus's
    ``step``), so it survives a site that lost its state, restarted or retried a round.
    ``epsilon-spent`` is the largest of that history's epsilon (:func:`compose_epsilon`,
    target and delta as first reported), the site's own claim (``site-epsilon``) and the
    previous row's: it never decreases. ``stopped`` stays True once set; ``must-stop``
    says whether another round like the last one (``round-steps``) would pass the target,
    which the server tells the site (``dp-stop`` in its inbox). ``accountant`` is
    ``privacy.accountant``, ``certified-by`` the accountant whose bound gave the composed
    epsilon (``rdp`` where ``prv`` was out of range, :func:`compose`), ``delta`` the
    delta every epsilon of the row is at. ``noise-seed`` names where
    the site's noise came from (:data:`fedkd.seeds.NOISE_SEEDS`). Raises ValueError for a
    metric out of bounds (:func:`_checked_figures`)."""
    from fedkd.seeds import NOISE_SEEDS

    m = _checked_figures(metrics)
    prev = dict(previous or {})
    target = float(prev.get("target-epsilon", m["dp-target-epsilon"]))
    delta = float(prev.get("delta", m["dp-delta"]))
    history = previous_history(prev)
    history = _extend(history, noise_multiplier=m["dp-noise-multiplier"], sample_rate=m["dp-sample-rate"],
                      steps=m["dp-round-steps"])
    composed, certified_by = compose(history=history, delta=delta, accountant=accountant)
    spent = max(composed, m["epsilon"], float(prev.get("epsilon-spent", 0.0)))
    round_steps = m["dp-round-steps"] or int(prev.get("round-steps", 0))
    stopped = bool(m["dp-stopped"]) or bool(prev.get("stopped", False))
    next_round = _extend(history, noise_multiplier=m["dp-noise-multiplier"], sample_rate=m["dp-sample-rate"],
                         steps=round_steps)
    must_stop = stopped or spent > target or (
        round_steps > 0 and compose_epsilon(history=next_round, delta=delta, accountant=accountant) > target)
    return {
        "target-epsilon": target,
        "epsilon-spent": spent,
        "site-epsilon": m["epsilon"],
        "delta": delta,
        "noise-multiplier": m["dp-noise-multiplier"],
        "sample-rate": m["dp-sample-rate"],
        "steps": sum(n for _, _, n in history),
        "site-steps": m["dp-steps"],
        "planned-steps": m["dp-planned-steps"],
        "round-steps": round_steps,
        "accountant": accountant,
        "certified-by": certified_by,
        "stopped": stopped,
        "must-stop": bool(must_stop),
        "noise-seed": NOISE_SEEDS[m["dp-noise-seed"]],
        "history": [[s, q, n] for s, q, n in history],
    }


def previous_history(row: Mapping[str, Any] | None) -> History:
    """The server's recorded history in a ledger row (``history``); a row from before the
    server kept histories stands for one segment of its ``steps`` at its sigma and q."""
    if not row:
        return []
    if "history" in row:
        return parse_history(row["history"], key="ledger row history")
    return _extend([], noise_multiplier=float(row["noise-multiplier"]), sample_rate=float(row["sample-rate"]),
                   steps=int(row["steps"]))
