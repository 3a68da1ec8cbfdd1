"""The server's side of a round, as plain NumPy/PyTorch code (no Flower).

Per round r (DESIGN section 1, steps 1 and 3):

1. :func:`site_inbox` -- what site i is sent: the round, the public-set fingerprint, the
   config digest, this round's public positions (:func:`fedkd.seeds.public_subset`) and its
   own fused knowledge F_i from the last round, on the wire (``knowledge.wire-format``);
2. :func:`accept_reply` -- a reply's partition id and knowledge, validated
   (:mod:`fedkd.wire`: record and array names, dtype, shape, size, finiteness, sign,
   row sums); a bad reply raises :class:`~fedkd.wire.InvalidPayload`;
3. :func:`server_round` -- fuse the accepted knowledge (:func:`fedkd.fusion.fuse`), keep each
   site's F_i, and distil the global student on the mean of the fused knowledge.

:class:`ServerState` is everything a run carries from round to round (fused knowledge per
partition id, the student, bytes, dropouts, history, privacy ledger);
:meth:`ServerState.state_dict` is what a checkpoint stores, :func:`run_summary` what
``summary.json`` reports. The loop that calls these is :func:`fedkd.federation.loop.run_federation`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fedkd.config import Config, FusionConfig
from fedkd.data import FederatedSplit
from fedkd.distillation import accuracy, distil
from fedkd.federation.site import SiteInbox
from fedkd.dp_knowledge import abstain, evidence_abstention, hard_votes, vote_consensus
from fedkd.fusion import FusionResult, consensus, fuse, informative_rows
from fedkd.wire import InvalidPayload, encode, validate_client_id, validate_knowledge, validate_metrics
from fedkd.models import build_model
from fedkd.privacy import LEDGER_METRICS, ledger_row, previous_history
from fedkd.privacy.debias import pooled_estimate
from fedkd.privacy.release import epsilon_per_round, release_ledger, with_combined
from fedkd.privacy.selection import selection_ledger
from fedkd.seeds import public_subset

FINAL_METRICS = ("alma", "alma-weighted", "worst", "global-accuracy", "alma-prior")
STATE_KEYS = frozenset({"fused-clients", "student", "bytes-up", "bytes-down", "dropouts", "history",
                        "privacy", "resumed-from"})


@dataclass
class ServerState:
    """What the server carries from round to round.

    ``fused``: partition id -> (public positions, F_i) of the last round it was fused;
    ``student``: the global student (None until its first round); ``bytes_up`` /
    ``bytes_down``: bytes of every accepted reply / every inbox sent; ``dropouts``: every
    exclusion; ``history``: one entry per completed round; ``privacy``: partition id -> its
    row of the privacy ledger (:func:`fedkd.privacy.ledger_row`, with the server's own
    history of the site's DP spend, which the checkpoint keeps and :func:`site_inbox` sends
    back); ``completed_round``: the last round checkpointed."""

    fused: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    consensus: dict[int, np.ndarray] = field(default_factory=dict)
    student: nn.Module | None = None
    bytes_up: list[int] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    dropouts: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    privacy: dict[int, dict] = field(default_factory=dict)
    resumed_from: list[int] = field(default_factory=list)
    release_votes: tuple[np.ndarray, np.ndarray] | None = None
    """``fusion.release-debias = "rounds"``: running sums [num_public, C] of the debiased label-rr
    votes and their counts [num_public] over every round (None until the first)."""
    completed_round: int = 0
    started: float = field(default_factory=time.monotonic)
    _student_weights: dict[str, np.ndarray] | None = None

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, state)``: fused knowledge by partition id (node ids are not kept: they
        change when a site re-registers), the student's weights, and JSON-able records."""
        arrays: dict[str, np.ndarray] = {}
        for client, (positions, knowledge) in self.fused.items():
            arrays[f"fused/{client}/positions"] = positions
            arrays[f"fused/{client}/knowledge"] = knowledge
        for client, g in self.consensus.items():
            arrays[f"consensus/{client}"] = g
        if self.release_votes is not None:
            arrays["release-votes/sum"], arrays["release-votes/count"] = self.release_votes
        if self.student is not None:
            for name, tensor in self.student.state_dict().items():
                arrays[f"student/{name}"] = tensor.detach().cpu().numpy()
        state = {
            "fused-clients": sorted(self.fused),
            "student": self.student is not None,
            "bytes-up": self.bytes_up,
            "bytes-down": self.bytes_down,
            "dropouts": self.dropouts,
            "history": self.history,
            "privacy": {str(c): v for c, v in self.privacy.items()},
            "resumed-from": self.resumed_from,
        }
        return arrays, state

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any], *, round_number: int) -> None:
        """Continue after checkpointed round ``round_number``; refuses a state that lacks a
        key (naming it)."""
        missing = sorted(STATE_KEYS - set(state))
        if missing:
            raise KeyError(f"server state has no key(s) {', '.join(missing)}")
        self.fused = {
            int(c): (arrays[f"fused/{c}/positions"], arrays[f"fused/{c}/knowledge"])
            for c in state["fused-clients"]
        }
        self.consensus = {int(k.split("/")[1]): v for k, v in arrays.items() if k.startswith("consensus/")}
        if "consensus" in arrays:  # a checkpoint from before per-site consensus: one G for every site
            self.consensus = {c: arrays["consensus"] for c in self.fused}
        self.release_votes = ((arrays["release-votes/sum"], arrays["release-votes/count"])
                              if "release-votes/sum" in arrays else None)
        prefix = "student/"
        self._student_weights = (
            {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)} if state["student"] else None
        )
        self.student = None
        self.bytes_up, self.bytes_down = list(state["bytes-up"]), list(state["bytes-down"])
        self.dropouts, self.history = list(state["dropouts"]), list(state["history"])
        self.privacy = {int(c): v for c, v in state["privacy"].items()}
        self.resumed_from = [*state["resumed-from"], round_number]
        self.completed_round = round_number

    def global_student(self, config: Config, split: FederatedSplit) -> nn.Module:
        """The global student, built (seeded) on first use or from a checkpoint's weights."""
        if self.student is None:
            g = config.global_student
            self.student = build_model(g.model, input_shape=split.input_shape, num_classes=split.num_classes,
                                       seed=config.seed, **split.model_options)
            if self._student_weights is not None:
                self.student.load_state_dict({k: torch.from_numpy(v) for k, v in self._student_weights.items()})
                self._student_weights = None
        return self.student


# ------------------------------------------------------------------ messages


def release_positions(config: Config, split: FederatedSplit, round_number: int) -> np.ndarray:
    """The public positions every site releases in ``round_number`` (``knowledge.public-subset``)."""
    return public_subset(config.seed, round_number, num_public=len(split.public),
                         size=config.knowledge.public_subset)


def site_inbox(*, config: Config, split: FederatedSplit, state: ServerState, client: int | None,
               round_number: int, release: np.ndarray) -> SiteInbox:
    """What site ``client`` is sent in ``round_number`` (``client`` None: a node the server
    does not know yet, which gets no fused knowledge). Positions are sent only when they are
    not the whole public set."""
    num_public = len(split.public)
    fused = fused_positions = consensus = history = None
    if client is not None and client in state.fused:
        positions, knowledge = state.fused[client]
        fused = encode(knowledge, config.knowledge.wire_format)
        fused_positions = positions if len(positions) < num_public else None
        if client in state.consensus:
            consensus = encode(state.consensus[client], config.knowledge.wire_format)
    row = state.privacy.get(client) if client is not None else None
    if row is not None and "noise-multiplier" in row:  # the server's record of the site's DP spend
        recorded = previous_history(row)
        history = np.array(recorded, dtype=np.float64).reshape(len(recorded), 3)
    return SiteInbox(
        round_number=round_number,
        public_fingerprint=split.public_fingerprint,
        config_digest=config.digest(),
        release_positions=release if len(release) < num_public else None,
        fused=fused,
        fused_positions=fused_positions,
        consensus=consensus,
        privacy_history=history,
        dp_stop=bool(row.get("must-stop", row.get("stopped", False))) if row is not None else False,
    )


def reply_client(metrics: Mapping[str, Any] | None, *, config: Config) -> int:
    """The partition id a reply claims (its ``partition-id`` metric), checked."""
    return validate_client_id(dict(metrics or {}), num_clients=config.data.num_clients)


def accept_reply(*, config: Config, num_classes: int, release: np.ndarray, record_names: Iterable[str],
                 arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """A train reply's knowledge, validated, as float64 rows summing to 1 [len(release), C];
    raises :class:`~fedkd.wire.InvalidPayload` naming the first problem."""
    return validate_knowledge(
        record_names=record_names,
        arrays=arrays,
        expected_rows=len(release),
        num_classes=num_classes,
        wire_format=config.knowledge.wire_format,
        top_k=config.shield.top_k,
    )


TRAIN_NAN_METRICS = frozenset({"train-loss", "distil-loss", "teacher-kd-loss", "val-accuracy",
                               "teacher-val-accuracy", "student-val-accuracy"})
"""Train-reply metrics that may be NaN: a loss over no step (private training stopped) or an
accuracy over an empty split. Every other metric must be finite."""


def train_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """A train reply's metrics, checked (:func:`fedkd.wire.validate_metrics`, NaN only in
    :data:`TRAIN_NAN_METRICS`), without its ``partition-id``."""
    checked = validate_metrics(metrics, allow_nan=TRAIN_NAN_METRICS)
    checked.pop("partition-id", None)
    return checked


def _claim(metrics: Mapping[str, Any], name: str) -> float | None:
    """A site's claimed pure-DP epsilon ``name`` (None when absent), checked finite and >= 0."""
    claim = metrics.get(name)
    if claim is not None and not (math.isfinite(claim) and claim >= 0):
        raise InvalidPayload(f"metric {name} must be a finite number >= 0; got {claim!r}")
    return claim


def privacy_row(*, config: Config, metrics: Mapping[str, Any], previous: Mapping[str, Any] | None) -> dict | None:
    """The site's new privacy-ledger row from its train metrics (:func:`fedkd.privacy.ledger_row`:
    the server's own history of the site's spend, composed), or None when the site reports
    no DP figure, privacy is off and no release mechanism is on. A reply with some ``dp-*``
    figures or ``epsilon`` but not all of them, with figures out of bounds, or with none of
    them when privacy is on, raises :class:`InvalidPayload`. With ``shield.release`` on, the
    row also carries the release's epsilon, counted by the server
    (:func:`fedkd.privacy.release.release_ledger`); with ``privacy.selection`` on, DP model
    selection's (:func:`fedkd.privacy.selection.selection_ledger`); and, beside DP-SGD's, their
    composition (:func:`fedkd.privacy.release.with_combined`)."""
    reported = [key for key in LEDGER_METRICS if key in metrics]
    releasing = config.shield.release != "none"
    row: dict | None = None
    if reported or config.privacy.enabled:
        missing = [key for key in LEDGER_METRICS if key not in metrics]
        if missing:
            what = f"'{reported[0]}'" if reported else "privacy.enabled"
            raise InvalidPayload(f"metrics report {what} without {', '.join(missing)}")
        try:
            row = ledger_row(metrics=metrics, accountant=config.privacy.accountant, previous=previous)
        except ValueError as err:
            raise InvalidPayload(str(err)) from None
    selecting = config.privacy.enabled and config.privacy.selection != "off"
    if not releasing and not selecting:
        return row
    extra: dict[str, Any] = {}
    if releasing:
        per_round = epsilon_per_round(release=config.shield.release, epsilon=config.shield.release_epsilon)
        extra.update(release_ledger(previous=previous, epsilon_per_round=per_round, release=config.shield.release,
                                    site_claim=_claim(metrics, "release-epsilon"), rows=config.shield.release_rows))
    if selecting:  # DP model selection (fedkd/privacy/selection.py): its whole budget, from round 1 on
        extra.update(selection_ledger(previous=previous, selection_epsilon=config.privacy.selection_epsilon,
                                      site_claim=_claim(metrics, "selection-epsilon")))
    return with_combined({**(row or {}), **extra})


SIDE_ACCURACIES = ("prior-accuracy", "private-accuracy", "student-accuracy", "teacher-accuracy")
"""Accuracies a site may report beside ``accuracy`` (:func:`fedkd.federation.site.evaluate_site`):
on the shared test set under its label mix, of a DP site's own DP model (beside its student's),
of a teacher site's student and teacher."""


EVAL_NAN = frozenset({"accuracy", *SIDE_ACCURACIES})
"""Evaluation metrics that may be NaN (an empty test split, no class of the prior present)."""


def evaluation_scores(metrics: Mapping[str, Any] | None) -> tuple[float, float, dict[str, float]]:
    """``(accuracy, num-examples, side accuracies)`` of an evaluation reply, checked
    (:func:`fedkd.wire.validate_metrics`; accuracy in [0, 1], NaN only over no examples;
    :data:`SIDE_ACCURACIES`, where present, in [0, 1] or NaN: :func:`side_accuracies`)."""
    checked = validate_metrics(metrics, allow_nan=EVAL_NAN)
    side = side_accuracies(checked)
    for key in ("accuracy", "num-examples"):
        if key not in checked:
            raise InvalidPayload(f"evaluation metrics need '{key}'")
    accuracy_, examples = checked["accuracy"], checked["num-examples"]
    if not (0.0 <= accuracy_ <= 1.0 or (np.isnan(accuracy_) and examples == 0)):
        raise InvalidPayload(f"accuracy must be in [0, 1] (NaN only over 0 examples); got {accuracy_} "
                             f"over {examples:g} examples")
    return accuracy_, examples, side


def side_accuracies(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """An evaluation reply's :data:`SIDE_ACCURACIES` that it has, checked; a value outside
    [0, 1] (NaN allowed) is refused with :class:`InvalidPayload`."""
    present = {key: metrics[key] for key in SIDE_ACCURACIES if metrics and key in metrics}
    checked = validate_metrics(present, allow_nan=frozenset(present)) if present else {}
    for key, value in checked.items():
        if not (np.isnan(value) or 0.0 <= value <= 1.0):
            raise InvalidPayload(f"{key} must be in [0, 1] or NaN; got {value}")
    return {key: float(value) for key, value in checked.items()}


# ------------------------------------------------------------------ the round


@dataclass(frozen=True)
class RoundRecord:
    """What :func:`server_round` produced: the fusion weight matrix over ``clients`` (rows
    receivers, columns senders, in ``clients`` order) and the round's history entry so far."""

    clients: list[int]
    weights: np.ndarray
    entry: dict[str, Any]
    consensus_weights: np.ndarray | None = None
    """Each receiver's sender shares of the consensus it was sent ([receivers, senders]), if any."""


def _fuse(knowledge: np.ndarray, f: FusionConfig):  # noqa: ANN202
    """:func:`fedkd.fusion.fuse` of ``knowledge`` with the run's ``fusion.*`` settings ``f``."""
    return fuse(knowledge=knowledge, method=f.method, measure=f.measure, divergence=f.divergence, beta=f.beta,
                threshold=f.threshold, max_neighbours=f.max_neighbours, confident_fraction=f.confident_fraction,
                uniform_entropy=f.uniform_entropy, sharpen_temperature=f.sharpen_temperature,
                era_temperature=f.era_temperature, prior_weight=f.prior_weight, prior_floor=f.prior_floor,
                neighbours=f.neighbours, trust=f.trust, trust_beta=f.trust_beta,
                trust_confidence=f.trust_confidence, trust_null=f.trust_null)


def _debiased(knowledge: np.ndarray, *, config: Config, state: ServerState, release: np.ndarray,
              num_public: int) -> FusionResult:
    """``fusion.release-debias``: every receiver's F_i (and consensus G) is the simplex projection
    of the unbiased estimate of the senders' top-1 histogram, pooled over this round's senders
    (``senders``) or over every round so far in which each public example was released
    (``rounds``; running sums kept in ``state.release_votes``):
    :func:`fedkd.privacy.debias.pooled_estimate`. Reads the released rows only (post-processing)."""
    pooling = config.fusion.release_debias == "rounds"
    if pooling and state.release_votes is None:
        state.release_votes = (np.zeros((num_public, knowledge.shape[2])), np.zeros(num_public))
    sums, counts = state.release_votes if pooling else (None, None)
    fused, total, count = pooled_estimate(
        knowledge, epsilon=config.shield.release_epsilon,
        previous_sum=None if sums is None else sums[release],
        previous_count=None if counts is None else counts[release])
    if pooling:
        sums[release], counts[release] = total, count
    n = len(knowledge)
    rows = np.broadcast_to(fused, (n, *fused.shape)).copy()
    return FusionResult(fused=rows, weights=np.full((n, n), 1.0 / n), consensus=rows.copy(),
                        consensus_weights=np.full((n, n), 1.0 / n))


def global_student_rows(*, config: Config, knowledge: np.ndarray) -> np.ndarray:
    """The rows of a round's release [N, P, C] the global student distils on: all of them,
    but under ``shield.release = "withhold"`` not those where every sender's row is
    uninformative (:func:`fedkd.fusion.informative_rows`): nobody spoke there, and the fused
    knowledge is only the receivers' priors."""
    rows = np.arange(knowledge.shape[1])
    if config.shield.release == "withhold":
        rows = rows[informative_rows(knowledge, config.fusion.uniform_entropy).any(axis=0)]
    return rows


def server_round(*, config: Config, split: FederatedSplit, state: ServerState, round_number: int,
                 release: np.ndarray, accepted: Mapping[int, np.ndarray]) -> RoundRecord:
    """Step 3: fuse the accepted knowledge K_j (partition id -> [len(release), C]), keep each
    site's F_i in ``state.fused``, and distil the global student (``global-student.*``) on
    the mean of the fused knowledge, mean_i F_i (mean_j K_j when the method fuses nothing; the
    consensus sent, mean_i G_i, when DP sites report a student, ``privacy.student``); under
    ``shield.release = "withhold"`` not on the rows every sender withheld."""
    clients = sorted(accepted)
    knowledge = np.stack([accepted[c] for c in clients])
    f = config.fusion
    consensus_weights, sent = None, None
    if config.dp_knowledge == "votes":  # DP-aware knowledge: fuse each site's top-1 vote (fedkd/dp_knowledge.py)
        knowledge = hard_votes(knowledge, smoothing=f.vote_smoothing)
    debiased = f.release_debias != "off"  # the config refuses it without shield.release = label-rr
    if debiased:
        result = _debiased(knowledge, config=config, state=state, release=release, num_public=len(split.public.x))
    else:
        result = _fuse(knowledge, f)
    if result.fused is not None and config.dp_knowledge == "evidence" and not debiased:
        # abstain where the senders' evidence alone (gamma = 0) is near-uniform (fedkd/dp_knowledge.py);
        # expert returns it from the same fusion, any other rule is fused again with gamma = 0
        evidence = result.evidence if result.evidence is not None else _fuse(knowledge, replace(f, prior_weight=0.0)).fused
        result = replace(result, fused=evidence_abstention(result.fused, evidence, entropy_cut=f.evidence_entropy))
    if result.fused is not None and config.dp_knowledge == "votes" and not debiased:
        result = replace(result, fused=abstain(result.fused, threshold=f.vote_threshold)[0],
                                     consensus=None if result.consensus is None
                                     else abstain(result.consensus, threshold=f.vote_threshold)[0])
    if result.fused is None:
        targets = knowledge.mean(axis=0)
    else:
        for row, client in enumerate(clients):
            state.fused[client] = (release, result.fused[row])
        targets = result.fused.mean(axis=0)
        if f.sends_consensus and result.consensus is not None:  # the method's own G_i per site
            state.consensus.update({client: result.consensus[row] for row, client in enumerate(clients)})
            consensus_weights = result.consensus_weights
            sent = result.consensus.mean(axis=0)
        elif f.sends_consensus and config.dp_knowledge == "votes":  # G = the unsharpened vote mean, abstaining
            g, shares = abstain(vote_consensus(knowledge), threshold=f.vote_threshold)[0], np.full(len(clients), 1 / len(clients))
            state.consensus.update(dict.fromkeys(clients, g))
            consensus_weights = np.broadcast_to(shares, (len(clients), len(clients)))
            sent = g
        elif f.sends_consensus:  # G = DS-FL's sharpened mean of every accepted K_j, sent beside F_i
            g, shares = consensus(knowledge=knowledge, uniform_entropy=f.uniform_entropy,
                                  temperature=f.era_temperature)
            state.consensus.update(dict.fromkeys(clients, g))
            consensus_weights = np.broadcast_to(shares, (len(clients), len(clients)))
            sent = g
        if config.dp_student and sent is not None:
            # DP sites distil towards the consensus, not F_i (which abstains almost everywhere under DP):
            # so does the global student
            targets = sent
    entry: dict[str, Any] = {"round": round_number, "accepted": clients}
    g, t = config.global_student, config.train
    if g.enabled:
        student = state.global_student(config, split)
        rows = global_student_rows(config=config, knowledge=knowledge)
        distil(student, split.public.x[release[rows]], targets[rows], epochs=g.epochs, batch_size=t.batch_size,
               lr=t.lr, temperature=t.kd_temperature, seed=config.seed + round_number)
        entry["global-accuracy"] = accuracy(student, split.test)
    return RoundRecord(clients=clients, weights=result.weights, entry=entry, consensus_weights=consensus_weights)


def run_summary(*, config: Config, split: FederatedSplit, state: ServerState, status: str,
                method: str | None = None, runner: str | None = None) -> dict[str, Any]:
    """The figures of the run so far (``summary.json``): status, the latest value of each
    final metric, history, mean bytes per site and round each way, dropouts, privacy ledger."""
    final: dict[str, float] = {}
    for entry in state.history:  # latest value of each metric
        final.update({k: entry[k] for k in FINAL_METRICS if k in entry})
    up = float(np.mean(state.bytes_up)) if state.bytes_up else 0.0
    down = float(np.mean(state.bytes_down)) if state.bytes_down else 0.0
    summary: dict[str, Any] = {
        "status": status,
        "method": method or config.fusion.method,
    }
    if runner:
        summary["runner"] = runner
    summary.update({
        "rounds-completed": state.history[-1]["round"] if state.history else 0,
        "rounds-planned": config.num_server_rounds,
        "final": final,
        "history": state.history,
        "bytes": {"uplink-per-client-round": up, "downlink-per-client-round": down,
                  "total-per-client-round": up + down},
        "dropouts": state.dropouts,
        "resumed-from": state.resumed_from,
        "privacy": {"enabled": config.privacy.enabled,
                    "ledger": {str(c): state.privacy[c] for c in sorted(state.privacy)}},
        "seconds": time.monotonic() - state.started,
        "public-fingerprint": split.public_fingerprint,
    })
    return summary
