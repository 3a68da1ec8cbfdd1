"""Record-level differential privacy for a site's private data: one budget for the whole run.

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
    # and, in the run summary, ledger.as_ledger_entry()
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedkd.data import ArrayDataset
from fedkd.distillation import as_input_tensor

if TYPE_CHECKING:
    from opacus.accountants import IAccountant
    from opacus.optimizers import DPOptimizer


# Opacus is imported on first use: a site without DP (and every Flower ClientApp process,
# started once per message in a deployment) does not pay its ~2 s import.


def create_accountant(mechanism: str) -> IAccountant:
    from opacus.accountants import create_accountant as _create_accountant

    return _create_accountant(mechanism=mechanism)


def get_noise_multiplier(**kwargs: Any) -> float:
    from opacus.accountants.utils import get_noise_multiplier as _get_noise_multiplier

    return _get_noise_multiplier(**kwargs)


def PrivacyEngine(*args: Any, **kwargs: Any):  # noqa: ANN201, N802  (opacus.PrivacyEngine)
    from opacus import PrivacyEngine as _PrivacyEngine

    return _PrivacyEngine(*args, **kwargs)


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

    def as_ledger_entry(self) -> dict[str, Any]:
        """One row of the run's privacy ledger (summary report); ``exhausted``: another
        planned round would exceed the target."""
        return {
            "target_epsilon": self.plan.target_epsilon,
            "epsilon_spent": self.epsilon(),
            "delta": self.plan.delta,
            "noise_multiplier": self.plan.noise_multiplier,
            "max_grad_norm": self.plan.max_grad_norm,
            "sample_rate": self.plan.sample_rate,
            "steps": self.steps,
            "planned_steps": self.plan.planned_steps,
            "accountant": self.plan.accountant,
            "exhausted": not self.can_afford(self.plan.steps_per_round),
        }

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


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class PrivateTrainResult:
    """Outcome of one round of :func:`train_private`.

    ``loss``: mean cross-entropy over the round's non-empty batches (nan if none);
    ``steps``: DP-SGD steps taken this round; ``epsilon``: the run's spend after the round;
    ``stopped``: True when the round was refused (budget); ``reason`` says why ("" if not).
    """

    loss: float
    steps: int
    epsilon: float
    stopped: bool
    reason: str


GRAD_SAMPLE_MODES = ("hooks", "ghost")
"""Opacus per-example gradient modes fedkd uses: ``hooks`` materialises every example's
gradient (``p.grad_sample``); ``ghost`` (ghost clipping, Li et al. 2022 / Bu et al. 2023)
computes only per-example gradient *norms* in a first backward pass and then backpropagates
the clipping-weighted loss sum_i min(1, C / ||g_i||) l_i in a second one: the same clipped
sum, without a [B, *param] tensor per parameter."""


class PrivateTraining(NamedTuple):
    """Objects of a DP-SGD session: the Opacus-wrapped module, the ``DPOptimizer``, the
    Poisson ``DPDataLoader`` and the loss to use: ``F.cross_entropy`` in ``hooks`` mode,
    Opacus's two-pass ``DPLossFastGradientClipping`` around cross-entropy in ``ghost`` mode."""

    module: nn.Module
    optimizer: DPOptimizer
    data_loader: DataLoader
    criterion: Any = F.cross_entropy


def _round_seeds(seed: int, steps_so_far: int) -> tuple[int, int]:
    """Sampler and noise seeds for a round, from the caller's seed *and* the ledger's step
    count: a caller that passes the same seed every round still gets fresh Poisson masks
    and fresh noise (re-used noise would cancel between two rounds' models, which the
    accountant's independence assumption does not allow)."""
    words = np.random.SeedSequence([int(seed), int(steps_so_far)]).generate_state(2, dtype=np.uint64)
    return int(words[0] >> np.uint64(1)), int(words[1] >> np.uint64(1))


def _check_matches(data: ArrayDataset, plan: PrivacyPlan, ledger: PrivacyLedger) -> None:
    if ledger.plan != plan:
        raise ValueError("ledger.plan differs from plan: pass the plan the ledger was made for")
    if len(data) != plan.num_examples:
        raise ValueError(
            f"plan was made for {plan.num_examples} private examples but data has {len(data)}: "
            "the sample rate, and so the guarantee, depend on n; make the plan from this data"
        )


@contextlib.contextmanager
def private_training(
    model: nn.Module,
    data: ArrayDataset,
    *,
    plan: PrivacyPlan,
    ledger: PrivacyLedger,
    lr: float,
    seed: int = 0,
    secure_mode: bool = False,
    grad_sample_mode: str = "hooks",
) -> Iterator[PrivateTraining]:
    """Opacus DP-SGD objects for ``model`` on ``data`` whose accounting goes to ``ledger``.

    Inside the block every ``optimizer.step()`` clips per-example gradients to
    ``plan.max_grad_norm``, adds N(0, (sigma C)^2) to their sum, divides by the expected
    batch size q n (``loss_reduction="mean"``: the loss must be a per-example mean), and
    Opacus's step hook appends (sigma, q, 1) to ``ledger.accountant``. On exit the hooks
    and Opacus's per-parameter attributes are removed and gradients cleared, so ``model``
    (whose parameters are the ones that were updated) is a plain module again.

    How the ledger is plugged in: ``PrivacyEngine.make_private`` attaches
    ``self.accountant.get_optimizer_hook_fn(sample_rate=1/len(data_loader))`` to the
    optimizer, so the engine's ``accountant`` attribute is set to the ledger's accountant
    before ``make_private``; the sample rate Opacus derives equals ``plan.sample_rate``
    (checked). Optimizer: Adam (see :func:`train_private`) over the parameters that
    require gradients (frozen ones, such as text embeddings under
    :func:`fedkd.text.frozen_embeddings`, are neither clipped nor noised). Integer inputs
    (token ids) stay int64. ``grad_sample_mode``: see :data:`GRAD_SAMPLE_MODES`; compute the
    loss with the session's ``criterion``. Does not check the budget; :func:`train_private` does.
    """
    _check_matches(data, plan, ledger)
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}; got {grad_sample_mode!r}"
        )
    if secure_mode:
        engine = PrivacyEngine(accountant=plan.accountant, secure_mode=True)
        loader_gen = noise_gen = None
    else:
        # seeded pseudo-random sampling and noise: reproducible, but not hardened against
        # floating-point attacks on the noise (Opacus warns once; secure_mode=True for that)
        engine = PrivacyEngine(accountant=plan.accountant)
        sampler_seed, noise_seed = _round_seeds(seed, ledger.steps)
        loader_gen = torch.Generator().manual_seed(sampler_seed)
        noise_gen = torch.Generator().manual_seed(noise_seed)
    engine.accountant = ledger.accountant  # the run's one accountant, not a per-round one

    x = as_input_tensor(data.x)
    y = torch.as_tensor(data.y, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=plan.batch_size, generator=loader_gen)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    private = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
        loss_reduction="mean",
        noise_generator=noise_gen,
        grad_sample_mode=grad_sample_mode,
        criterion=nn.CrossEntropyLoss(reduction="mean"),
    )
    if grad_sample_mode == "ghost":
        module, dp_optimizer, criterion, dp_loader = private
    else:
        (module, dp_optimizer, dp_loader), criterion = private, F.cross_entropy
    try:
        if dp_loader.sample_rate != plan.sample_rate:  # defence: accounting must match the plan
            raise RuntimeError(
                f"Opacus samples at rate {dp_loader.sample_rate!r} but the plan assumes "
                f"{plan.sample_rate!r}"
            )
        yield PrivateTraining(module, dp_optimizer, dp_loader, criterion)
    finally:
        module.to_standard_module()  # removes hooks and grad_sample attributes
        for p in model.parameters():
            if hasattr(p, "summed_grad"):  # set by DPOptimizer, not removed by Opacus
                del p.summed_grad
            p.grad = None


def train_private(
    model: nn.Module,
    data: ArrayDataset,
    *,
    plan: PrivacyPlan,
    ledger: PrivacyLedger,
    lr: float,
    epochs: float | None = None,
    seed: int = 0,
    secure_mode: bool = False,
    grad_sample_mode: str = "hooks",
) -> PrivateTrainResult:
    """One round of DP-SGD (cross-entropy, per-example mean) on the site's private ``data``.

    Steps this round S = ceil(epochs / q) (``epochs`` defaults to
    ``plan.epochs_per_round``, giving ``plan.steps_per_round``). If
    ``ledger.can_afford(S)`` is False nothing is trained and the result has
    ``stopped=True`` and a reason: a site never spends beyond its target, even when asked
    for more rounds than it planned; releasing knowledge from the current model stays free.

    Otherwise ``model`` is trained in place (its own parameters are updated; Opacus's
    wrapper and hooks are removed afterwards) with Adam on the privatised gradient. Adam
    rather than SGD: it is invariant to the gradient's scale, so the learning rate used for
    non-private training (``train.lr``) stays sensible after clipping shrinks the gradient
    to norm <= C; the guarantee is unaffected (the optimizer only post-processes the noisy
    gradient). Each round's sampler and noise seeds come from (``seed``, steps so far).
    ``grad_sample_mode`` picks Opacus's per-example gradients (:data:`GRAD_SAMPLE_MODES`);
    parameters with ``requires_grad=False`` are left out of the DP step.
    """
    _check_matches(data, plan, ledger)
    epochs = plan.epochs_per_round if epochs is None else epochs
    if not _is_real(epochs) or not (math.isfinite(epochs) and epochs >= 0):
        raise ValueError(f"epochs must be a finite number >= 0; got {epochs!r}")
    steps = steps_for(epochs=float(epochs), sample_rate=plan.sample_rate)
    if steps == 0:
        return PrivateTrainResult(float("nan"), 0, ledger.epsilon(), False, "")
    if not ledger.can_afford(steps):
        spent = ledger.epsilon()
        return PrivateTrainResult(
            float("nan"),
            0,
            spent,
            True,
            f"budget exhausted: epsilon {spent:.2f} of {plan.target_epsilon:g} spent; "
            f"another {steps} steps would reach {ledger.epsilon_after(steps):.2f}",
        )
    model.train()
    losses: list[float] = []
    taken = 0
    stand_in = (as_input_tensor(data.x[:1]), torch.as_tensor(data.y[:1], dtype=torch.long))
    session = private_training(
        model, data, plan=plan, ledger=ledger, lr=lr, seed=seed, secure_mode=secure_mode,
        grad_sample_mode=grad_sample_mode,
    )
    with session as dp:
        while taken < steps:
            for xb, yb in dp.data_loader:  # one pass = 1/q Poisson-sampled batches
                dp.optimizer.zero_grad()
                if len(yb):
                    loss = dp.criterion(dp.module(xb), yb)
                    losses.append(loss.item())
                else:
                    # empty Poisson batch: still a step (noise only), as the analysis assumes.
                    # Some models (transformers) cannot run on zero rows, so one stand-in row
                    # goes through with weight 0: its gradient, hence its clipped
                    # contribution, is exactly zero, as an empty batch's would be.
                    loss = dp.criterion(dp.module(stand_in[0]), stand_in[1]) * 0.0
                loss.backward()
                dp.optimizer.step()
                taken += 1
                if taken == steps:
                    break
    return PrivateTrainResult(
        float(np.mean(losses)) if losses else float("nan"), taken, ledger.epsilon(), False, ""
    )
