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
accountant keeps the history [(sigma, q, steps), ...] and converts it to epsilon at the
site's delta: ``rdp`` (Renyi DP, Mironov 2017 / Mironov, Talwar, Zhang 2019, converted with
Balle et al. 2020, Thm 21), ``prv`` (numerical composition of privacy-loss random variables,
Gopi et al. 2021; an upper bound) or ``gdp`` (Gaussian DP CLT approximation, Bu et al.
2020; Opacus marks it experimental, it can *under*-estimate epsilon).

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
import json
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


def create_accountant(mechanism: str) -> IAccountant:
    from opacus.accountants import create_accountant as _create_accountant

    return _create_accountant(mechanism=mechanism)


def get_noise_multiplier(**kwargs: Any) -> float:
    from opacus.accountants.utils import get_noise_multiplier as _get_noise_multiplier

    return _get_noise_multiplier(**kwargs)


ACCOUNTANTS = ("rdp", "prv", "gdp")
"""Accountant names accepted by :func:`plan_privacy` (Opacus's registry names)."""

MAX_NOISE_MULTIPLIER = 50.0
"""Above this sigma the noise drowns any clipped gradient: the plan is refused as unreachable."""

EPSILON_TOLERANCE = 0.01
"""Binary-search tolerance of the calibration: sigma gives target - 0.01 < epsilon <= target."""

_STATE_FORMAT = "fedkd.privacy-ledger/1"


class PrivacyConfigError(ValueError):
    """A privacy setting that cannot give the promised guarantee (message names the setting)."""


class PrivacyStateError(ValueError):
    """A stored ledger state that cannot be loaded (message names the key)."""


# ------------------------------------------------------------------------------ maths


def default_delta(num_examples: int) -> float:
    """delta = 1 / (10 n): well below 1/n, the level at which "leak one example" is allowed.

    (epsilon, delta)-DP with delta >= 1/n permits a mechanism that publishes a random
    example outright with probability delta*n >= 1; the usual recommendation is delta << 1/n.
    """
    if num_examples < 1:
        raise PrivacyConfigError(f"num_examples must be >= 1; got {num_examples}")
    return 1.0 / (10 * num_examples)


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
    accountant: str = "rdp",
) -> float:
    """epsilon of SGM(q = ``sample_rate``, sigma = ``noise_multiplier``) composed ``steps``
    times, at ``delta``, by the named Opacus accountant (0.0 for zero steps)."""
    if steps <= 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Smallest sigma (within the search tolerance) with epsilon_for(sigma, q, T) <= target.

    Opacus's ``get_noise_multiplier`` bisects sigma and returns the upper end of the
    bracket, so the result never overshoots: target - 0.01 < epsilon <= target. A target
    that needs sigma > :data:`MAX_NOISE_MULTIPLIER` is refused with
    :class:`PrivacyConfigError` before the search.
    """
    ceiling = epsilon_for(
        noise_multiplier=MAX_NOISE_MULTIPLIER,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        accountant=accountant,
    )
    if not ceiling <= target_epsilon:
        raise PrivacyConfigError(
            f"target epsilon {target_epsilon:g} is unreachable with {steps} steps at sample "
            f"rate {sample_rate:.4g}: even noise multiplier {MAX_NOISE_MULTIPLIER:g} spends "
            f"epsilon {ceiling:.3g}; lower rounds or epochs per round, or raise epsilon"
        )
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=EPSILON_TOLERANCE,
        )
    )


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
    accountant: str = "rdp",
    max_grad_norm: float = 1.0,
) -> PrivacyPlan:
    """Validate a site's privacy settings and calibrate the noise multiplier once for the run.

    q = 1 / ceil(num_examples / batch_size) (see the module doc), steps per round
    S = ceil(epochs_per_round / q), planned steps T = S * rounds, and sigma =
    :func:`calibrate_noise_multiplier` (target_epsilon, delta, q, T). ``delta=None`` means
    :func:`default_delta` (1 / (10 n)).

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
            f"releasing an example outright; use delta <= 1/(10 n) = {default_delta(num_examples):.3g}"
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
        if not history:
            return 0.0
        acc = create_accountant(mechanism=self.plan.accountant)
        acc.history = history
        return float(acc.get_epsilon(delta=self.plan.delta))

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
        """Replace the history with the stored one. The stored plan must equal this ledger's
        plan: a run's budget cannot change mid-run. Raises :class:`PrivacyStateError`
        naming the missing key or the differing plan fields."""
        plan, history = _parse_state(state)
        if plan != self.plan:
            diffs = [
                f"{f.name}: stored {getattr(plan, f.name)!r}, current {getattr(self.plan, f.name)!r}"
                for f in dataclasses.fields(PrivacyPlan)
                if getattr(plan, f.name) != getattr(self.plan, f.name)
            ]
            raise PrivacyStateError(
                "stored privacy ledger was made for a different plan (a run's budget cannot "
                "change mid-run): " + "; ".join(diffs)
            )
        self.accountant.load_state_dict({"history": history, "mechanism": state["mechanism"]})

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
    history: History = []
    for i, entry in enumerate(state["history"]):
        ok = (
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and _is_real(entry[0])
            and _is_real(entry[1])
            and _is_int(entry[2])
            and entry[0] >= 0
            and 0 < entry[1] <= 1
            and entry[2] >= 0
        )
        if not ok:
            raise PrivacyStateError(
                f"privacy ledger state key 'history[{i}]' must be [noise_multiplier >= 0, "
                f"0 < sample_rate <= 1, steps >= 0]; got {entry!r}"
            )
        history.append((float(entry[0]), float(entry[1]), int(entry[2])))
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
    return plan_privacy(
        target_epsilon=privacy.target_epsilon,
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
                  "dp-sample-rate", "dp-steps", "dp-planned-steps")
"""The metrics a DP site reports every round (numbers only, as Flower's MetricRecord needs)."""


def ledger_metrics(ledger: PrivacyLedger) -> dict[str, float]:
    """The ledger's state as the round metrics :data:`LEDGER_METRICS`."""
    plan = ledger.plan
    return {
        "epsilon": ledger.epsilon(),
        "dp-target-epsilon": plan.target_epsilon,
        "dp-delta": plan.delta,
        "dp-noise-multiplier": plan.noise_multiplier,
        "dp-sample-rate": plan.sample_rate,
        "dp-steps": float(ledger.steps),
        "dp-planned-steps": float(plan.planned_steps),
    }


def ledger_row(*, metrics: Mapping[str, Any], accountant: str, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One site's row of the run's privacy ledger (``summary.json``'s ``privacy.ledger``),
    from the site's latest round metrics (:func:`ledger_metrics`, plus ``dp-stopped``).
    ``stopped`` stays True once a site has stopped private training (``previous``: the row
    it replaces). The only place this row is built."""
    return {
        "target-epsilon": metrics["dp-target-epsilon"],
        "epsilon-spent": metrics["epsilon"],
        "delta": metrics["dp-delta"],
        "noise-multiplier": metrics["dp-noise-multiplier"],
        "sample-rate": metrics["dp-sample-rate"],
        "steps": int(metrics["dp-steps"]),
        "planned-steps": int(metrics["dp-planned-steps"]),
        "accountant": accountant,
        "stopped": bool(metrics.get("dp-stopped")) or bool((previous or {}).get("stopped", False)),
    }
