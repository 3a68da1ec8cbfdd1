"""The site's side of a round, as plain PyTorch/NumPy code (no Flower).

A round at site i (DESIGN section 1, step 2), :func:`site_round`:

0. *check*: the server's config digest and public-set fingerprint equal the site's own
   (a site whose run config or public set differs refuses the round, with a clear error);
a. *distil*: fit the model to the fused knowledge F_i on the public positions it covers;
b. *local train*: cross-entropy on the private train split, with DP-SGD through the
   site's :class:`~fedkd.privacy.PrivacyLedger` when ``privacy.enabled``
   (``train.mode = "joint"`` merges a and b into CE + kd_weight * KD per step; not under
   DP, where the public KD step stays outside the DP optimizer);
c. *extract*: logits on this round's public positions;
d. *shield*: per-example temperature and logit noise -> released knowledge K_i; with
   ``shield.release = "label-rr"`` a one-hot of randomized response on each row's top-1
   label instead (:mod:`fedkd.privacy.release`), its epsilon in the round's metrics;
e. *pack*: the knowledge record on the wire (``knowledge.wire-format``, ``shield.top-k``);
   a simulated adversary (``adversary.clients``) corrupts it first.

A *teacher site* (``teacher.sites``) also runs a larger teacher, such as a pretrained
MiniLM next to a tiny BERT student (:func:`teacher_steps`): only the teacher reads the
private data (fine-tuning, DP-SGD under privacy); the student learns from the teacher's
predictions and the fused knowledge on the public set; ``teacher.release`` names the
model that takes F_i, releases knowledge and is evaluated. See docs/text.md.

What travels: a :class:`SiteInbox` in (from :func:`fedkd.federation.server.site_inbox`), a
:class:`SiteReply` out. What persists between rounds: a :class:`SiteState` (model, teacher,
privacy ledger, rounds trained), whose :meth:`SiteState.state_dict` the Flower ClientApp
keeps in ``context.state`` and the in-process transport keeps in memory.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedkd.adversary import corrupt
from fedkd.config import Config
from fedkd.data import ArrayDataset, ClientData, FederatedSplit
from fedkd.distillation import (accuracy, distil, label_prior, predict_logits, prior_accuracy, train_joint,
                                train_supervised)
from fedkd.dp_knowledge import distillable_rows, student_target
from fedkd.wire import decode, site_record
from fedkd.models import build_model
from fedkd.fusion import entropy
from fedkd.privacy import PrivacyLedger, iterate_average, ledger_metrics, site_privacy_plan, train_private_site
from fedkd.privacy.release import composed_release_epsilon, epsilon_per_round, label_release, withhold_rows
from fedkd.seeds import NOISE_SEEDS, noise_rng_seed, site_seed, teacher_seed
from fedkd.shielding import pii_rows, shield
from fedkd.targets import (CONSENSUS, ERROR, LOCAL_CONSENSUS, LOCAL_MEAN, MEAN, blend, local_prior, parse_candidates,
                           margin_choice, pooled_choice, record_example_scores, record_scores, under_prior, unsharpen,
                           validation_nll, validation_nlls)


class SiteRefusal(ValueError):
    """The site will not take part in this round (its config or public set differs)."""


# ------------------------------------------------------------------ messages


@dataclass(frozen=True)
class SiteInbox:
    """What the server sends site i for a round (DESIGN section 1, step 1).

    ``release_positions``: the public positions to release this round (None: all of P);
    ``fused``: F_i on the wire (``knowledge.wire-format``, [len(fused_positions), C]; None in
    round 1, under method ``none``, or for a site the server does not know yet);
    ``fused_positions``: the public positions F_i covers (None: all of P); ``consensus``: the
    federation's consensus G on the same positions (``fusion.consensus``; else None);
    ``privacy_history``: the server's record of this site's DP spend, [k, 3] rows
    (sigma, q, steps) (None: privacy off or nothing recorded yet), which the site adopts
    when it spends more than its own ledger (a site that lost its state);
    ``dp_stop``: the server's verdict that another round of private training would pass the
    site's target (:func:`fedkd.privacy.ledger_row`'s ``must-stop``): the site then trains
    no more on private data."""

    round_number: int
    public_fingerprint: str
    config_digest: str
    release_positions: np.ndarray | None = None
    fused: np.ndarray | None = None
    fused_positions: np.ndarray | None = None
    consensus: np.ndarray | None = None
    privacy_history: np.ndarray | None = None
    dp_stop: bool = False

    def arrays(self) -> dict[str, np.ndarray]:
        """The inbox's arrays by name (what goes on the wire besides the round config)."""
        named = {"release-positions": self.release_positions, "fused": self.fused,
                 "fused-positions": self.fused_positions, "consensus": self.consensus,
                 "privacy-history": self.privacy_history}
        return {name: a for name, a in named.items() if a is not None}

    @property
    def nbytes(self) -> int:
        """Downlink bytes of this inbox: its arrays (the round config is not counted)."""
        return sum(int(a.nbytes) for a in self.arrays().values())


@dataclass(frozen=True)
class SiteReply:
    """What site i sends back: its knowledge record (``arrays``, the wire encoding of K_i)
    and its round metrics (numbers only; ``partition-id`` says which site it is)."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]


# ------------------------------------------------------------------ state


def build_site_model(config: Config, split: FederatedSplit, client: int, *, architecture: str = "") -> nn.Module:
    """Site ``client``'s model: ``architecture`` (a site's own choice, node config
    ``model``) or its turn in ``model.architectures``; initial weights from its seed."""
    return build_model(
        architecture or config.architecture_for(client),
        input_shape=split.input_shape,
        num_classes=split.num_classes,
        seed=site_seed(config.seed, client),
        **split.model_options,
    )


def build_site_teacher(config: Config, split: FederatedSplit, client: int) -> nn.Module | None:
    """Site ``client``'s teacher (``teacher.sites``), or None for a site without one."""
    name = config.teacher_for(client)
    if not name:
        return None
    return build_model(name, input_shape=split.input_shape, num_classes=split.num_classes,
                       seed=teacher_seed(config.seed, client), **split.model_options)


@dataclass(frozen=True)
class NoiseSource:
    """Where a site's private randomness comes from (:data:`fedkd.seeds.NOISE_SEEDS`):
    DP-SGD's Poisson sampling and Gaussian noise, and the shielding noise on its logits.
    ``key``: the site's secret (``site-secret``; :func:`fedkd.seeds.new_site_secret`)."""

    kind: str = "run-seed"
    key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in NOISE_SEEDS:
            raise ValueError(f"noise source must be one of {', '.join(NOISE_SEEDS)}; got {self.kind!r}")
        if self.kind == "site-secret" and (self.key is None or len(self.key) < 16):
            raise ValueError("noise source 'site-secret' needs a secret key of at least 128 bits")

    def round_seed(self, seed: int) -> int | None:
        """The round's private seed from its public ``seed`` (:func:`fedkd.seeds.noise_rng_seed`)."""
        return noise_rng_seed(self.kind, seed=seed, key=self.key)


STATE_KEYS = frozenset({"model", "teacher", "student", "average", "privacy", "rounds-trained", "target-scores"})


@dataclass
class SiteState:
    """What a site keeps between rounds: its model, its teacher (teacher sites), its DP
    student (``privacy.student``: the model a DP site reports, distilled each round from
    ``student_init``, the student's initial weights, which :meth:`fresh` rebuilds and
    :meth:`state_dict` leaves out), the average of its DP model's iterates (``privacy.ema-decay``
    with the student: :func:`fedkd.privacy.iterate_average`), its privacy ledger (privacy on) and
    how many rounds it has trained.

    :meth:`state_dict` gives plain values (tensors by name, the ledger as JSON text, an int);
    :meth:`load_state_dict` refuses unknown or missing keys, naming them, as Opacus's
    accountants do."""

    model: nn.Module
    teacher: nn.Module | None = None
    ledger: PrivacyLedger | None = None
    student: nn.Module | None = None
    student_init: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    average: nn.Module | None = None
    rounds_trained: int = 0
    target_scores: dict[str, list[float]] = field(default_factory=dict)
    noise: NoiseSource = field(default_factory=lambda: NoiseSource())

    @classmethod
    def fresh(cls, *, config: Config, split: FederatedSplit, client: int, architecture: str = "",
              noise: NoiseSource | None = None) -> SiteState:
        """A site's state before its first round: fresh seeded models, an empty ledger;
        ``noise``: where its private randomness comes from (default: the run's seeds). The
        noise source is the site's own (its secret stays on its disk), not part of
        :meth:`state_dict`."""
        ledger = None
        if config.privacy.enabled:
            ledger = PrivacyLedger(site_privacy_plan(config, len(split.clients[client].train), client))
        teacher = build_site_teacher(config, split, client)
        student = student_init = average = None
        model = build_site_model(config, split, client, architecture=architecture)
        if config.dp_student and teacher is None:  # a teacher site has its student already
            student = build_site_model(config, split, client, architecture=architecture)
            student_init = copy.deepcopy(student.state_dict())
            if config.privacy.ema_decay > 0:
                average = iterate_average(model, decay=config.privacy.ema_decay)
        return cls(model=model, teacher=teacher, ledger=ledger, student=student, student_init=student_init,
                   average=average, noise=noise or NoiseSource())

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model.state_dict(), "rounds-trained": self.rounds_trained}
        if self.target_scores:
            state["target-scores"] = json.dumps(self.target_scores)
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        if self.student is not None:
            state["student"] = self.student.state_dict()
        if self.average is not None:
            state["average"] = self.average.state_dict()
        if self.ledger is not None:
            state["privacy"] = self.ledger.to_json()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state) - STATE_KEYS)
        if unknown:
            raise KeyError(f"site state has unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(STATE_KEYS))}")
        for key, present in (("model", True), ("rounds-trained", True),
                             ("teacher", self.teacher is not None), ("privacy", self.ledger is not None)):
            if present and key not in state:
                raise KeyError(f"site state has no key '{key}'")
            if not present and key in state:
                raise KeyError(f"site state has key '{key}' but this site has no {key}")
        if "student" in state and self.student is None:
            raise KeyError("site state has key 'student' but this site has no student")
        if "average" in state and self.average is None:
            raise KeyError("site state has key 'average' but this site keeps no iterate average (privacy.ema-decay)")
        self.model.load_state_dict(state["model"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        if self.student is not None and "student" in state:  # absent before the site's first round
            self.student.load_state_dict(state["student"])
        if self.average is not None and "average" in state:
            self.average.load_state_dict(state["average"])
        if self.ledger is not None:
            self.ledger.load_state_dict(json.loads(str(state["privacy"])))
        self.rounds_trained = int(state["rounds-trained"])
        self.target_scores = json.loads(str(state["target-scores"])) if "target-scores" in state else {}


# ------------------------------------------------------------------ the round


def site_round(*, config: Config, split: FederatedSplit, client: int, inbox: SiteInbox, state: SiteState) -> SiteReply:
    """Steps 0-e above for site ``client``; ``state`` is updated in place.

    ``split`` is the site's view of the federation (the public set and its own
    ``split.clients[client]``). Raises :class:`SiteRefusal` when the server's config digest
    or public fingerprint differ from the site's own."""
    if inbox.config_digest != config.digest():
        raise SiteRefusal(
            f"site {client} refuses round {inbox.round_number}: its run config differs "
            "from the server's (config digest mismatch)"
        )
    if inbox.public_fingerprint != split.public_fingerprint:
        raise SiteRefusal(
            f"site {client} refuses round {inbox.round_number}: its public transfer set "
            f"(fingerprint {split.public_fingerprint[:12]}) differs from the server's "
            f"({str(inbox.public_fingerprint)[:12]}); check data.* settings"
        )
    everything = np.arange(len(split.public))  # absent positions mean the whole public set
    release = everything if inbox.release_positions is None else inbox.release_positions
    fused = fused_positions = consensus = None
    if inbox.fused is not None:
        fused = decode(inbox.fused).astype(np.float32)
        fused_positions = everything if inbox.fused_positions is None else inbox.fused_positions
        if inbox.consensus is not None:
            consensus = decode(inbox.consensus).astype(np.float32)
    if state.ledger is not None and inbox.privacy_history is not None:
        state.ledger.adopt(inbox.privacy_history)  # the server's record, when it spends more
    knowledge, metrics = local_round(
        model=state.model, config=config, client=client, round_number=inbox.round_number,
        data=split.clients[client], public_x=split.public.x, release_positions=release,
        fused=fused, fused_positions=fused_positions, ledger=state.ledger, teacher=state.teacher,
        target_scores=state.target_scores, consensus=consensus,
        noise=state.noise, dp_stop=inbox.dp_stop, student=state.student, student_init=state.student_init,
        average=state.average,
    )
    state.rounds_trained += 1
    if config.shield.release != "none":  # the site's own count; the server keeps its own (ledger row)
        per_round = epsilon_per_round(release=config.shield.release, epsilon=config.shield.release_epsilon)
        metrics["release-epsilon"] = composed_release_epsilon(epsilon_per_round=per_round, rounds=state.rounds_trained)
    arrays = {"knowledge": knowledge}
    if client in config.adversaries:
        arrays = corrupt(knowledge, config.adversaries[client], np.random.default_rng(client))
    wire = site_record(arrays, num_classes=split.num_classes, wire_format=config.knowledge.wire_format,
                       top_k=config.shield.top_k)
    return SiteReply(wire, {"partition-id": client, "rounds-trained": state.rounds_trained, **metrics})


def site_evaluation(*, config: Config, split: FederatedSplit, client: int, state: SiteState) -> dict[str, float]:
    """The site's evaluation reply metrics: :func:`evaluate_site` and its ``partition-id``."""
    scores = evaluate_site(state.model, split.clients[client], teacher=state.teacher,
                           release=config.teacher.release, student=state.student,
                           **prior_test(split, client))
    return {"partition-id": client, **scores}


def prior_test(split: FederatedSplit, client: int) -> dict[str, Any]:
    """:func:`evaluate_site`'s ``reference`` (the federation's shared test set, where it has
    one: simulations) and ``prior`` (the site's label frequencies over its train, validation
    and test splits), for its ``prior-accuracy``; empty where there is no shared test set."""
    if len(split.test) == 0:
        return {}
    data = split.clients[client]
    labels = np.concatenate([np.asarray(part.y) for part in (data.train, data.val, data.test)])
    return {"reference": split.test, "prior": label_prior(labels, num_classes=split.num_classes)}


def _seeded(round_fn):  # noqa: ANN001, ANN202
    """Run a site's round under torch's global RNG seeded from (seed, site, round), so
    dropout and the like are reproducible; the caller's RNG state is left untouched."""

    @functools.wraps(round_fn)
    def wrapper(**kwargs):  # noqa: ANN003, ANN202
        with torch.random.fork_rng():
            torch.manual_seed(site_seed(kwargs["config"].seed, kwargs["client"], kwargs["round_number"]))
            return round_fn(**kwargs)

    return wrapper


def _private_step(model: nn.Module, data, *, config: Config, ledger: PrivacyLedger, lr: float,  # noqa: ANN001
                  seed: int, metrics: dict[str, float], noise: NoiseSource, dp_stop: bool = False) -> None:
    """One round of DP-SGD through the site's ledger, its figures into ``metrics``. Its
    sampling and noise come from ``noise`` (the run's ``seed``, the site's secret, or
    Opacus's secure RNG); ``dp_stop`` (the server's verdict) skips it."""
    if dp_stop:
        metrics.update(ledger_metrics(ledger, round_steps=0, stopped=True, noise_seed=noise.kind))
        metrics["train-loss"] = float("nan")
        return
    private_seed = noise.round_seed(seed)
    private = train_private_site(model, data, config=config, ledger=ledger, lr=lr,
                                 seed=0 if private_seed is None else private_seed,
                                 secure_mode=noise.kind == "secure-rng")
    metrics.update(ledger_metrics(ledger, round_steps=private.steps, stopped=private.stopped, noise_seed=noise.kind))
    metrics["train-loss"] = private.loss


def teacher_steps(
    *,
    student: nn.Module,
    teacher: nn.Module,
    config: Config,
    seed: int,
    data: ClientData,
    public_x: np.ndarray,
    fused: np.ndarray | None,
    fused_positions: np.ndarray | None,
    ledger: PrivacyLedger | None,
    metrics: dict[str, float],
    noise: NoiseSource | None = None,
    dp_stop: bool = False,
    target_scores: dict[str, list[float]] | None = None,
    consensus: np.ndarray | None = None,
) -> nn.Module:
    """A teacher site's training; returns the released model (``teacher.release``).

    1. release = teacher only: the teacher distils F_i on the public set (free).
    2. The teacher trains on the private data: ``teacher.epochs`` epochs at ``teacher.lr``,
       DP-SGD through the site's ledger when privacy is on. It is the only model on the
       site that reads private data, so the site's one budget is the teacher's.
    3. The student distils on the whole public set towards
       p(x) = softmax(z_teacher(x) / T), mixed with F_i where the student is released:
       p(x) = w p_teacher(x) + (1 - w) F_i(x) (w = ``teacher.weight``) on the positions F_i
       covers. Public inputs and the DP-trained teacher only: post-processing, no privacy cost.
       With validated targets (``train.target-choice``; no DP) the student's share of the
       federation is chosen as on every other site (:func:`choose_target`): p(x) =
       w p_teacher(x) + (1 - w) T(x) for each candidate T of ``train.blend-candidates``
       (lambda = 0: the teacher alone; lambda = 1: F_i, as without a choice; the consensus G
       and G under the site's prior where G was sent), the student kept by its pooled
       validation NLL. The teacher's training does not depend on F_i here, so a candidate
       costs one student distillation, not a local round.
    """
    t, tc = config.train, config.teacher
    has_fused = fused is not None and fused_positions is not None and len(fused_positions) > 0
    release_teacher = tc.release == "teacher"
    if release_teacher and has_fused:
        metrics["distil-loss"] = distil(
            teacher, public_x[fused_positions], fused, epochs=tc.epochs, batch_size=t.batch_size,
            lr=tc.lr, temperature=t.kd_temperature, seed=seed,
        )
    if ledger is None:
        metrics["train-loss"] = train_supervised(
            teacher, data.train, epochs=tc.epochs, batch_size=t.batch_size, lr=tc.lr, seed=seed
        )
    else:
        _private_step(teacher, data.train, config=config, ledger=ledger, lr=tc.lr, seed=seed, metrics=metrics,
                      noise=noise or NoiseSource(), dp_stop=dp_stop)
    logits = torch.as_tensor(predict_logits(teacher, public_x))
    own = torch.softmax(logits, dim=-1).numpy()
    mixed = has_fused and not release_teacher

    def fit(target: np.ndarray | None) -> float:
        mix = own.copy()
        if target is not None:
            mix[fused_positions] = tc.weight * own[fused_positions] + (1 - tc.weight) * target
        return distil(student, public_x, mix, epochs=t.distill_epochs, batch_size=t.batch_size, lr=t.lr,
                      temperature=t.kd_temperature, seed=seed)

    if mixed and config.validated_targets and ledger is None and target_scores is not None:
        metrics["distil-loss"] = choose_target(
            model=student, config=config, seed=seed, data=data, own=own[fused_positions], fused=fused,
            consensus=consensus, fit=fit, scores=target_scores, metrics=metrics)
    else:
        metrics["distil-loss" if mixed else "teacher-kd-loss"] = fit(fused if mixed else None)
    metrics["teacher-val-accuracy"] = accuracy(teacher, data.val)
    metrics["student-val-accuracy"] = accuracy(student, data.val)
    return teacher if release_teacher else student


def _without_withheld_rows(config: Config, public_x: np.ndarray, fused: np.ndarray, fused_positions: np.ndarray,
                           consensus: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """F_i, its positions and the consensus without the rows every site withholds
    (``shield.release = "withhold"``: the rows :func:`fedkd.shielding.pii_rows` flags, where
    nobody released anything and F_i is only the receiver's prior): a site does not distil
    towards its own prior there."""
    from fedkd.data.text import detokenize

    keep = ~pii_rows(detokenize(public_x[fused_positions], tokenizer=config.data.tokenizer))
    if consensus is not None and len(consensus) != len(fused_positions):
        raise ValueError(f"consensus has {len(consensus)} rows for {len(fused_positions)} fused positions")
    return fused[keep], fused_positions[keep], None if consensus is None else consensus[keep]


@_seeded
def local_round(
    *,
    model: nn.Module,
    config: Config,
    client: int,
    round_number: int,
    data: ClientData,
    public_x: np.ndarray,
    release_positions: np.ndarray,
    fused: np.ndarray | None = None,
    fused_positions: np.ndarray | None = None,
    ledger: PrivacyLedger | None = None,
    teacher: nn.Module | None = None,
    target_scores: dict[str, list[float]] | None = None,
    consensus: np.ndarray | None = None,
    noise: NoiseSource | None = None,
    dp_stop: bool = False,
    student: nn.Module | None = None,
    student_init: Mapping[str, torch.Tensor] | None = None,
    average: nn.Module | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Steps a-d above: returns the released knowledge ``[len(release_positions), C]`` and
    the round's metrics. ``fused`` [len(fused_positions), C] is F_i (None in round 1 or
    under fusion method ``none``). ``model`` (and ``ledger``) are updated in place.
    With a ``teacher`` (a teacher site) steps a-b are :func:`teacher_steps`, and c-d use
    the released model (``teacher.release``).

    With a ``ledger`` (privacy on) local training is DP-SGD and the metrics carry the
    run's epsilon so far; once the next round would exceed the target, the site stops
    private training (``dp-stopped`` = 1) and keeps releasing knowledge from its model; so
    does it when the server says so (``dp_stop``). ``noise`` (default: the run's seeds)
    gives the round's DP sampling and noise and its shielding noise
    (:class:`NoiseSource`).

    With ``train.target-choice = "validated"`` (no DP, sequential mode) steps a-b run once per
    blend candidate and the site keeps the best (:func:`validated_steps`; on a teacher site the
    student's distillation alone, :func:`teacher_steps`);
    ``target_scores`` (the site's pooled scores, updated in place) carries across rounds.

    With a DP ``student`` (``privacy.student``) the model trains by DP-SGD only and releases
    knowledge, and the student is distilled afresh from ``student_init`` (:func:`_dp_student`);
    with an ``average`` (:func:`fedkd.privacy.iterate_average`, updated after the private step)
    the knowledge, released and in the student's target, is the averaged model's."""
    t = config.train
    knower = model  # whose predictions the site releases
    noise = noise or NoiseSource()
    seed = site_seed(config.seed, client, round_number)
    metrics: dict[str, float] = {}
    reference, reference_positions = fused, fused_positions  # last round's F_i: the release's divergence reference
    if config.shield.release == "withhold" and fused is not None and fused_positions is not None:
        fused, fused_positions, consensus = _without_withheld_rows(config, public_x, fused, fused_positions, consensus)
    has_fused = fused is not None and fused_positions is not None and len(fused_positions) > 0
    if ledger is not None and t.mode == "joint":
        raise ValueError("train.mode 'joint' mixes public KD into the DP step; use 'sequential'")
    if teacher is not None:
        model = teacher_steps(
            student=model, teacher=teacher, config=config, seed=seed, data=data,
            public_x=public_x, fused=fused, fused_positions=fused_positions, ledger=ledger,
            metrics=metrics, noise=noise, dp_stop=dp_stop, target_scores=target_scores, consensus=consensus,
        )
    elif has_fused and t.mode == "joint":
        metrics["train-loss"] = train_joint(
            model, data.train, public_x[fused_positions], fused,
            epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
            temperature=t.kd_temperature, kd_weight=t.kd_weight, seed=seed,
        )
    elif (has_fused and config.validated_targets and ledger is None and t.mode == "sequential"
          and target_scores is not None):
        validated_steps(model=model, config=config, seed=seed, data=data, public_x=public_x, fused=fused,
                        fused_positions=fused_positions, scores=target_scores, metrics=metrics,
                        consensus=consensus)
    elif ledger is None:
        if has_fused:
            metrics["distil-loss"] = distil(
                model, public_x[fused_positions], fused,
                epochs=t.distill_epochs, batch_size=t.batch_size, lr=t.lr,
                temperature=t.kd_temperature, seed=seed,
            )
        metrics["train-loss"] = train_supervised(
            model, data.train, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, seed=seed
        )
    elif student is not None:
        _private_step(model, data.train, config=config, ledger=ledger, lr=config.privacy.lr,
                      seed=seed, metrics=metrics, noise=noise, dp_stop=dp_stop)
        if average is not None:
            average.update_parameters(model)
            knower = average
        _dp_student(student, init=student_init, model=knower, config=config, public_x=public_x,
                    positions=fused_positions if has_fused and consensus is not None else None,
                    consensus=consensus, seed=seed, metrics=metrics)
        metrics["student-val-accuracy"] = accuracy(student, data.val)
    elif has_fused and config.privacy.selection != "off" and target_scores is not None:
        _private_step(model, data.train, config=config, ledger=ledger, lr=config.privacy.lr,
                      seed=seed, metrics=metrics, noise=noise, dp_stop=dp_stop)
        selected_steps(model=model, config=config, seed=seed, round_number=round_number, data=data,
                       public_x=public_x[fused_positions], fused=fused, consensus=consensus,
                       scores=target_scores, metrics=metrics, noise=noise)
    else:
        after = config.privacy.distill_order == "after"
        target = consensus if config.privacy.distill_target == "consensus" and consensus is not None else fused
        if has_fused and not after:
            _dp_distil(model, config=config, public_x=public_x[fused_positions], fused=target, seed=seed, metrics=metrics)
        _private_step(model, data.train, config=config, ledger=ledger, lr=config.privacy.lr,
                      seed=seed, metrics=metrics, noise=noise, dp_stop=dp_stop)
        if has_fused and after:
            _dp_distil(model, config=config, public_x=public_x[fused_positions], fused=target, seed=seed, metrics=metrics)
    knowledge, stats = release_knowledge(
        config, predict_logits(knower, public_x[release_positions]),
        rng=np.random.default_rng(noise.round_seed(seed)), public_x=public_x[release_positions],
        reference=reference if reference is not None and reference_positions is not None
        and np.array_equal(reference_positions, release_positions) else None,
    )
    metrics.update(
        {
            "num-examples": float(len(data.train)),
            "val-accuracy": accuracy(model, data.val),
            "shield-sensitivity": stats.mean_sensitivity,
            "shield-temperature": stats.mean_temperature,
            "shield-entropy": stats.mean_entropy,
        }
    )
    if config.shield.release == "label-rr":
        metrics["release-flipped"] = stats.release_flipped
    return knowledge, metrics


def _dp_student(student: nn.Module, *, init: Mapping[str, torch.Tensor] | None, model: nn.Module, config: Config,
                public_x: np.ndarray, positions: np.ndarray | None, consensus: np.ndarray | None, seed: int,
                metrics: dict[str, float]) -> None:
    """A DP site's student (``privacy.student``): from its initial weights ``init``,
    ``privacy.student-epochs`` epochs on the whole public set towards
    :func:`fedkd.dp_knowledge.student_target` of the DP ``model``'s own prediction K_i and the
    federation's mean M = ``unsharpen(consensus)`` on the consensus ``positions`` (K_i alone
    elsewhere, and before the first consensus). Public inputs and DP releases only: no privacy
    cost. The DP model itself never distils, so what the sites release stays independent."""
    p, t = config.privacy, config.train
    if init is not None:
        student.load_state_dict(init)
    own = torch.softmax(torch.as_tensor(predict_logits(model, public_x)), dim=-1).numpy().astype(np.float64)
    target = own.copy()
    if positions is not None and consensus is not None:
        mean = unsharpen(consensus, consensus_temperature(config))
        target[positions] = student_target(own[positions], mean, temperature=p.student_temperature,
                                           correction=p.student_correction)
    metrics["student-loss"] = distil(student, public_x, target.astype(np.float32), epochs=p.student_epochs,
                                     batch_size=t.batch_size, lr=t.lr, temperature=1.0, seed=seed)


def _dp_distil(model: nn.Module, *, config: Config, public_x: np.ndarray, fused: np.ndarray, seed: int,
               metrics: dict[str, float]) -> None:
    """A DP site's distillation step: ``privacy.distill-epochs`` epochs on the rows of the target
    ``fused`` that are not near-uniform (:func:`fedkd.dp_knowledge.distillable_rows`: abstained
    rows stay out); ``distil-rows`` is their share. Public data only, no privacy cost."""
    t = config.train
    rows = distillable_rows(fused, uniform_entropy=config.fusion.uniform_entropy)
    metrics["distil-rows"] = float(rows.mean()) if len(rows) else 0.0
    if rows.any():
        metrics["distil-loss"] = distil(model, public_x[rows], fused[rows], epochs=config.privacy.distill_epochs,
                                        batch_size=t.batch_size, lr=t.lr, temperature=t.kd_temperature, seed=seed)


SELECTION_CANDIDATES = ("private", "fused", "consensus")
"""What a DP site may keep after its private step (:func:`selected_steps`): the private model as
it is, or that model distilled on F_i, or on the consensus G."""


def selected_steps(*, model: nn.Module, config: Config, seed: int, round_number: int, data: ClientData,
                   public_x: np.ndarray, fused: np.ndarray, consensus: np.ndarray | None,
                   scores: dict[str, list[float]], metrics: dict[str, float], noise: NoiseSource) -> None:
    """DP model selection after the round's private step (:mod:`fedkd.privacy.selection`): from
    the same start and seed, each candidate of :data:`SELECTION_CANDIDATES` (``consensus`` only
    when G was sent) is built on public data only (:func:`_dp_distil`), and its correct answers
    on the private validation split are pooled into ``scores`` (key ``"selection:<name>"``:
    [sum, rounds]). At a decision round (:func:`fedkd.privacy.selection.decision_rounds`) the
    site chooses by report-noisy-max on the pooled means at eps_d (noise from its noise
    source) and stores the choice (``"selection:choice"``: [index, decisions so far]); between
    decisions, and before the first, it keeps its last choice (first: ``private``). ``model``
    ends as the kept candidate; ``selection-epsilon`` reports eps_d times the decisions so far."""
    from fedkd.privacy.selection import decision_epsilon, decision_rounds, report_noisy_max

    p = config.privacy
    names = [n for n in SELECTION_CANDIDATES if n != "consensus" or consensus is not None]
    start = copy.deepcopy(model.state_dict())
    trained, counts = {}, {}
    for name in names:
        model.load_state_dict(start)
        if name != "private":
            with torch.random.fork_rng():  # every candidate sees the same randomness
                torch.manual_seed(seed)
                _dp_distil(model, config=config, public_x=public_x, fused=fused if name == "fused" else consensus,
                           seed=seed, metrics={})
        counts[name] = round(accuracy(model, data.val) * len(data.val)) if len(data.val) else 0.0
        trained[name] = copy.deepcopy(model.state_dict())
    scores.update(record_scores(scores, counts, prefix="selection:"))
    index, decisions = scores.get("selection:choice", [0, 0])
    eps_d = decision_epsilon(selection_epsilon=p.selection_epsilon, rounds=config.num_server_rounds,
                             decisions=p.selection_rounds)
    if round_number in decision_rounds(rounds=config.num_server_rounds, decisions=p.selection_rounds):
        pooled = [scores[f"selection:{n}"][0] / scores[f"selection:{n}"][1] for n in names]
        round_seed = noise.round_seed(seed)
        rng = np.random.default_rng(None if round_seed is None else [round_seed, 1])  # not the release's stream
        index, decisions = SELECTION_CANDIDATES.index(names[report_noisy_max(pooled, epsilon=eps_d, rng=rng)]), decisions + 1
        scores["selection:choice"] = [float(index), float(decisions)]
    kept = SELECTION_CANDIDATES[int(index)]
    model.load_state_dict(trained[kept if kept in trained else "private"])
    metrics["selection-choice"] = float(index)
    metrics["selection-epsilon"] = float(decisions) * eps_d


def consensus_temperature(config: Config) -> float | None:
    """The temperature the server sharpened the consensus G it sends at (``fusion.era-temperature``),
    None where G is the unsharpened DP vote mean: mirrors :func:`fedkd.federation.server.server_round`
    (G is the method's own G_i for ``expert`` with trust on and no ``fusion.sharpen-temperature``,
    sharpened; else the vote mean under ``dp-knowledge = votes``; else ERA, sharpened)."""
    f = config.fusion
    own = f.method == "expert" and f.trust != "off" and not f.sharpen_temperature > 0
    return None if config.dp_knowledge == "votes" and not own else f.era_temperature


def candidate_target(lam: float | str, *, own: np.ndarray, fused: np.ndarray, consensus: np.ndarray | None,
                     labels: np.ndarray, temperature: float | None) -> np.ndarray:
    """The distillation target of one blend candidate (:mod:`fedkd.targets`): T_lambda =
    (1 - lambda) K_i + lambda F_i, the consensus G, the unsharpened mean M = ``unsharpen(G, T)``
    (``temperature``: :func:`consensus_temperature`), either under the prior of ``labels``."""
    if lam in (CONSENSUS, LOCAL_CONSENSUS, MEAN, LOCAL_MEAN):
        target = consensus if lam in (CONSENSUS, LOCAL_CONSENSUS) else unsharpen(consensus, temperature)
        if lam in (LOCAL_CONSENSUS, LOCAL_MEAN):
            target = under_prior(target, local_prior(labels, consensus.shape[1]))
        return target
    return blend(own, fused, lam)


def validated_steps(*, model: nn.Module, config: Config, seed: int, data: ClientData, public_x: np.ndarray,
                    fused: np.ndarray, fused_positions: np.ndarray, scores: dict[str, list[float]],
                    metrics: dict[str, float], consensus: np.ndarray | None = None) -> None:
    """Steps a-b once per candidate lambda (:mod:`fedkd.targets`): from the same start and
    seed, distil T_lambda = (1 - lambda) K_i + lambda F_i (none for lambda = 0), train on the
    private split, score the validation NLL; ``scores`` gains this round's scores and
    ``model`` ends as the candidate with the lowest pooled score. Costs one local round per
    candidate; reads only the site's own data (private train and validation)."""
    t = config.train
    own = torch.softmax(torch.as_tensor(predict_logits(model, public_x[fused_positions])), dim=-1).numpy()

    def fit(target: np.ndarray | None) -> float:
        if target is not None:
            distil(model, public_x[fused_positions], target, epochs=t.distill_epochs,
                   batch_size=t.batch_size, lr=t.lr, temperature=t.kd_temperature, seed=seed)
        return train_supervised(model, data.train, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, seed=seed)

    metrics["train-loss"] = choose_target(model=model, config=config, seed=seed, data=data, own=own, fused=fused,
                                          consensus=consensus, fit=fit, scores=scores, metrics=metrics)


def choose_target(*, model: nn.Module, config: Config, seed: int, data: ClientData, own: np.ndarray,
                  fused: np.ndarray, consensus: np.ndarray | None, fit, scores: dict[str, list[float]],  # noqa: ANN001
                  metrics: dict[str, float]) -> float:
    """The validated choice of target (``train.target-choice``), the loop both kinds of site
    share: for each candidate of ``train.blend-candidates`` (the consensus ones only where G
    was sent), from the same start and randomness, ``fit(target)`` fits ``model``
    (``target``: :func:`candidate_target` on F_i's positions, None for lambda = 0, where
    ``own`` is the site's own prediction there) and returns a loss; the model's validation
    NLL (and error, ``train.target-score = "error"``) is pooled into ``scores`` over rounds
    (:func:`fedkd.targets.pooled_choice`), ``model`` ends as the chosen candidate, and its
    loss is returned. ``metrics`` gains ``target-lambda`` (strings coded as negative
    numbers) and ``val-nll``."""
    t = config.train
    candidates = [c for c in parse_candidates(t.blend_candidates) if not isinstance(c, str) or consensus is not None]
    temperature = consensus_temperature(config)
    start = copy.deepcopy(model.state_dict())
    trained, round_scores, round_errors, round_nlls, losses = {}, {}, {}, {}, {}
    for lam in candidates:
        model.load_state_dict(start)
        target = None
        if isinstance(lam, str) or lam > 0:
            target = candidate_target(lam, own=own, fused=fused, consensus=consensus, labels=data.train.y,
                                      temperature=temperature)
        with torch.random.fork_rng():  # every candidate sees the same randomness
            torch.manual_seed(seed)
            losses[lam] = fit(target)
        round_scores[lam] = validation_nll(model, data.val)
        if t.target_margin > 0:
            round_nlls[lam] = validation_nlls(model, data.val)
        if t.target_score == "error":
            round_errors[lam] = 1.0 - accuracy(model, data.val) if len(data.val) else float("nan")
        trained[lam] = copy.deepcopy(model.state_dict())
    scores.update(record_scores(scores, round_scores))
    if t.target_score == "error":
        scores.update(record_scores(scores, round_errors, prefix=ERROR))
    if t.target_margin > 0:
        scores.update(record_example_scores(scores, round_nlls))
        chosen = margin_choice(scores, candidates, margin=t.target_margin)
    else:
        chosen = pooled_choice(scores, candidates, by=(ERROR, "") if t.target_score == "error" else ("",))
    model.load_state_dict(trained[chosen])
    codes = {CONSENSUS: -1.0, LOCAL_CONSENSUS: -2.0, MEAN: -3.0, LOCAL_MEAN: -4.0}  # metrics are numbers
    metrics["target-lambda"] = codes.get(chosen, chosen) if isinstance(chosen, str) else float(chosen)
    metrics["val-nll"] = round_scores[chosen]
    return losses[chosen]


def release_knowledge(config: Config, logits: np.ndarray, *, rng: np.random.Generator,
                      public_x: np.ndarray | None = None, reference: np.ndarray | None = None):  # noqa: ANN201
    """Step d: the run's shielding (``shield.*``) of ``logits`` [P, C] on the public inputs
    ``public_x`` -> ``(knowledge [P, C], ShieldStats)``. ``reference``: last round's fused
    knowledge on the same positions (the ``divergence`` scorer's public reference). The
    ``pii`` scorer reads ``public_x`` as token ids. With ``shield.release = "label-rr"`` the
    shielded rows then go through k-ary randomized response on their top-1 label
    (:func:`fedkd.privacy.release.label_release`, ``shield.release-epsilon`` per row, drawn
    from the same ``rng``, i.e. the site's noise source) and the released rows are one-hot
    (smoothed by ``shield.release-smoothing``); with ``shield.release-rows = "pii"`` only the
    rows whose public text has a PII-like match (:func:`fedkd.shielding.pii_rows`). The wire format's rounding comes after
    (:func:`fedkd.wire.site_record`)."""
    s = config.shield
    texts = None
    wants_text = s.scorer == "pii" or s.release_rows == "pii"
    if wants_text and public_x is not None:  # the pii scorer and the pii rows read the public inputs as text
        from fedkd.data.text import detokenize

        texts = detokenize(public_x, tokenizer=config.data.tokenizer)
    knowledge, stats = shield(logits, temperature=s.temperature, gamma=s.gamma, noise_std=s.noise_std,
                              scorer=s.scorer, reference=reference, top_k=s.top_k, rng=rng, texts=texts)
    rows = None
    if s.release != "none" and s.release_rows == "pii":
        if texts is None:
            raise ValueError("shield.release-rows = 'pii' needs the public inputs (text) to choose its rows")
        rows = pii_rows(texts)
    if s.release == "withhold":
        knowledge = withhold_rows(knowledge, rows=rows)
        stats = dataclasses.replace(stats, mean_entropy=float(entropy(knowledge).mean()))
    if s.release == "label-rr":
        knowledge, flipped = label_release(knowledge, epsilon=s.release_epsilon, rng=rng,
                                           smoothing=s.release_smoothing, rows=rows)
        stats = dataclasses.replace(stats, mean_entropy=float(entropy(knowledge).mean()), release_flipped=flipped)
    return knowledge, stats


def evaluate_site(
    model: nn.Module, data: ClientData, *, teacher: nn.Module | None = None, release: str = "student",
    student: nn.Module | None = None, reference: ArrayDataset | None = None, prior: np.ndarray | None = None,
) -> dict[str, float]:
    """Accuracy on the site's own local test split; on a teacher site the released model's
    (``release``), with ``student-accuracy`` and ``teacher-accuracy`` beside it; on a site with
    a DP ``student`` (``privacy.student``) the student's, with ``private-accuracy`` (its DP model) beside it.
    With a ``reference`` test set and the site's label ``prior``, ``prior-accuracy`` is the
    evaluated model's accuracy there re-weighted to the site's label mix
    (:func:`fedkd.distillation.prior_weighted_accuracy`)."""
    if student is not None:
        evaluated = student
        scores = {"accuracy": accuracy(student, data.test), "num-examples": float(len(data.test)),
                  "private-accuracy": accuracy(model, data.test)}
    elif teacher is None:
        evaluated = model
        scores = {"accuracy": accuracy(model, data.test), "num-examples": float(len(data.test))}
    else:
        evaluated = teacher if release == "teacher" else model
        student_acc, teacher_acc = accuracy(model, data.test), accuracy(teacher, data.test)
        scores = {
            "accuracy": teacher_acc if release == "teacher" else student_acc,
            "num-examples": float(len(data.test)),
            "student-accuracy": student_acc,
            "teacher-accuracy": teacher_acc,
        }
    if reference is not None and prior is not None and len(reference) > 0:
        scores["prior-accuracy"] = prior_accuracy(evaluated, reference, prior=prior)
    return scores
