"""The federation's round loop, written once, over a small :class:`Transport` interface.

:func:`run_federation` runs every round of a run (DESIGN section 1):

    wait for sites
    for r in completed + 1 .. num-server-rounds:
        release = this round's public positions
        up to round-retries + 1 times: collect_knowledge (query exchange for nodes the
            transport does not know, then train exchange, validation)
            until at least min-clients replies are valid, else stop with a status
        server_round: fuse, F_i per site, global student; save the weight matrix
        every eval-every rounds (and the last): evaluation exchange -> ALMA, worst
        record the round, checkpoint the server state

The transport moves inboxes and replies and nothing else. Two implement it: Flower's Grid
(``server/server_app.py``: simulation engine and deployment) and an in-process one
(``simulations/inprocess.py``) that calls the site functions directly; given the same config
both give the same numbers (tests/e2e/test_transports.py). The loop lives here, not in the
ServerApp, so that both drive the same code: one place for retries, ``min-clients``,
exclusions, the privacy ledger, evaluation and checkpoints.

Identities (``identity.site-keys``, :mod:`fedkd.identity`): with a plan of public keys,
every train, evaluation and query reply must carry a signature that verifies with the key of
the partition it claims, over the challenge the transport put in that message; a reply that
does not is refused and recorded (``excluded``, with the ``claimed`` id), and a node is
mapped to a partition (and so sent that site's fused knowledge) only after a verified reply.
Without a plan a partition id is a claim, as before.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fedkd.checkpoint import write_server_checkpoint
from fedkd.config import Config
from fedkd.data import FederatedSplit
from fedkd.federation.server import (
    ServerState,
    accept_reply,
    evaluation_scores,
    privacy_row,
    release_positions,
    reply_client,
    run_summary,
    server_round,
    site_inbox,
    train_metrics,
)
from fedkd.federation.site import SiteInbox
from fedkd.identity import Identities, IdentityError
from fedkd.wire import InvalidPayload
from fedkd.reporting import RunRecorder, alma_summary, prior_alma
from fedkd.seeds import round_sample

logger = logging.getLogger("fedkd")


class RoundFailed(RuntimeError):
    """Too few sites connected, or too few valid replies for a round after retries."""


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)):\s*(.+)$")
REASON_CHARS = 240
"""The longest a failure reason is kept (a log line, a ``summary.json`` dropout)."""


def short_reason(text: str) -> str:
    """One short plain line saying why a site failed: ANSI codes gone; of a traceback (Ray's,
    Flower's ``ClientAppException`` wrapping), the exception's own message; at most
    ``REASON_CHARS`` characters.

    >>> short_reason("site failed: <class 'X'>:<'\\x1b[31mTraceback...\\nValueError: bad input\\x1b[0m'>")
    'site failed: ValueError: bad input'
    >>> short_reason("site failed: boom")
    'site failed: boom'
    """
    plain = _ANSI.sub("", str(text)).replace("\\n", "\n")
    lines = [line.strip() for line in plain.splitlines() if line.strip()]
    if not lines:
        return ""
    prefix = lines[0].split("<class", 1)[0].strip() if "<class" in lines[0] else ""
    message = ""
    found = re.search(r"occurred\. Message:\s*(.+?)(?:'>)?\s*$", plain, flags=re.S)
    if found and found.group(1).strip():
        message = found.group(1).strip().splitlines()[-1].strip()
    errors = [m for m in map(_ERROR_LINE.match, lines) if m and "ClientAppException" not in m.group(1)]
    if errors:
        last = errors[-1]
        message = f"{last.group(1).rsplit('.', 1)[-1]}: {last.group(3)}"
    if not message:
        if len(lines) == 1:
            return lines[0][:REASON_CHARS]
        message = lines[-1]
    message = message.removesuffix("'>").strip()
    line = f"{prefix} {message}".strip() if prefix and not message.startswith(prefix) else message
    return line[:REASON_CHARS]


@dataclass(frozen=True)
class Reply:
    """One answer a transport collected from ``node`` (a transport's own id for a site).

    ``error`` set: the site failed or did not answer (the reason, in words). Otherwise
    ``metrics`` are the reply's metrics (None: it had no metrics record), ``arrays`` its
    knowledge record (train replies; None: none) and ``records`` the names of its records.
    ``challenge``: the random challenge the transport put in the message this answers (the
    transport's own copy, never one echoed by the site); ``signature``: the reply's signature
    (:mod:`fedkd.identity`), if it carried one."""

    node: int
    metrics: Mapping[str, Any] | None = None
    arrays: Mapping[str, np.ndarray] | None = None
    records: frozenset[str] = field(default_factory=frozenset)
    error: str | None = None
    challenge: bytes | None = None
    signature: bytes | None = None


class Transport(Protocol):
    """How the loop reaches the sites: messages out, replies in, nothing else."""

    def wait_for_sites(self) -> int:
        """Block until the sites are there (or a deadline); return how many are."""

    def train(self, round_number: int, inbox_for: Callable[[int | None], SiteInbox], *,
              clients: frozenset[int] | None = None) -> list[Reply]:
        """Send every site ``inbox_for(partition id, or None if unknown)`` as a train
        message (``clients``: only the sites of that round sample, ``fraction-train``; a
        node whose partition is unknown then gets nothing); return the replies, failures
        included (one per site that did not answer)."""

    def evaluate(self, round_number: int, *, clients: frozenset[int] | None = None) -> list[Reply]:
        """Ask every site (``clients``: only those) to evaluate its model; return the replies."""

    def query(self, round_number: int) -> list[Reply]:
        """Ask the nodes this transport cannot yet tell apart which partition they hold
        (their ``partition-id`` metric); return the replies ([] when it knows every node).
        With ``fraction-train`` below 1 it must ask from round 1: a sample is of sites."""

    def identified(self, node: int, client: int) -> None:
        """``node`` said (in a valid reply) that it holds partition ``client``."""

    def client_of(self, node: int) -> int | None:
        """The partition id ``node`` holds, if known."""


# ------------------------------------------------------------------ one exchange


def _exclude(state: ServerState | None, recorder: RunRecorder, transport: Transport | None, round_number: int,
             node: int, reason: str, claimed: int | None = None, *, impostor: bool = False) -> None:
    """Record ``node``'s exclusion; ``client`` is the site the node is known to hold, else the
    partition id its (rejected) reply claimed, if any: a label for the record, not an identity.
    ``impostor``: the reply failed its identity check; the record's ``client`` is then only
    a site the node verified as before (None for a stranger) and ``claimed`` the id it claimed,
    so that the claimed site is not logged as a dropout."""
    client = transport.client_of(node) if transport is not None else None
    if client is None and not impostor:
        client = claimed
    who = f"site {client}" if client is not None else f"node {node}"
    if impostor:
        who += f" (claiming partition-id {claimed})"
    reason = short_reason(reason)
    logger.warning("fedkd round %d: %s %s: %s", round_number, who, "refused" if impostor else "excluded", reason)
    entry = {"round": round_number, "node": node, "client": client, "reason": reason}
    if impostor:
        entry["claimed"] = claimed
    if state is not None:
        state.dropouts.append(entry)
    recorder.record("excluded", **entry)


def _claim(*, config: Config, identities: Identities | None, reply: Reply, kind: str, round_number: int) -> int:
    """The partition id ``reply`` claims (checked); with ``identities`` only once its signature
    verified as that partition's, else :class:`IdentityError` (its ``claimed``: the id)."""
    client = reply_client(reply.metrics, config=config)
    if identities is not None:
        try:
            identities.verify(kind=kind, round_number=round_number, partition_id=client, challenge=reply.challenge,
                              signature=reply.signature, metrics=reply.metrics, arrays=reply.arrays)
        except IdentityError as err:
            err.claimed = client
            raise
    return client


def identify_nodes(*, config: Config, state: ServerState, transport: Transport, recorder: RunRecorder,
                   round_number: int, identities: Identities | None = None) -> None:
    """The query exchange (:meth:`Transport.query`): a node is mapped to the partition its
    answer names (:meth:`Transport.identified`) only when the answer is valid and, with
    ``identities``, signed with that partition's key. A lying or unsigned answer is refused
    and recorded; its node stays unknown and gets no site's fused knowledge. Any other bad
    answer only leaves the node unknown (a log line), as a node that did not answer."""
    for reply in transport.query(round_number):
        try:
            if reply.error is not None:
                raise ValueError(reply.error)
            client = _claim(config=config, identities=identities, reply=reply, kind="query", round_number=round_number)
        except IdentityError as err:
            _exclude(state, recorder, transport, round_number, reply.node, f"query answer refused: {err}",
                     err.claimed, impostor=True)
            continue
        except Exception as err:  # noqa: BLE001  an unknown node just gets no fused knowledge
            logger.warning("fedkd round %d: node %d did not say which site it is: %s", round_number, reply.node,
                           short_reason(str(err)))
            continue
        transport.identified(reply.node, client)


def collect_knowledge(*, config: Config, split: FederatedSplit, state: ServerState, transport: Transport,
                      recorder: RunRecorder, round_number: int, release: np.ndarray,
                      on_accept: Callable[[int, np.ndarray], None] | None = None,
                      identities: Identities | None = None,
                      clients: frozenset[int] | None = None) -> dict[int, np.ndarray]:
    """One train exchange (after :func:`identify_nodes`): every site's inbox out (``clients``:
    the round's sample only), replies validated; returns the accepted knowledge by partition
    id. A reply from a site outside the sample is refused. Every field of a reply is
    checked before anything of it is kept or recorded: partition id, its signature (with
    ``identities``: a reply not signed by the claimed partition's key is refused whether it
    comes first or second), metric names, types and bounds
    (:func:`fedkd.federation.server.train_metrics`), knowledge, DP figures
    (:func:`fedkd.federation.server.privacy_row`); only a valid reply identifies its node.
    A failed, late or invalid reply excludes that site for the round (one ``excluded``
    record each), never the run; the others are kept."""

    def inbox_for(client: int | None) -> SiteInbox:
        inbox = site_inbox(config=config, split=split, state=state, client=client,
                           round_number=round_number, release=release)
        state.bytes_down.append(inbox.nbytes)
        return inbox

    identify_nodes(config=config, state=state, transport=transport, recorder=recorder,
                   round_number=round_number, identities=identities)
    accepted: dict[int, np.ndarray] = {}
    for reply in transport.train(round_number, inbox_for, clients=clients):
        if reply.error is not None:
            _exclude(state, recorder, transport, round_number, reply.node, reply.error)
            continue
        claimed = None
        try:
            client = claimed = _claim(config=config, identities=identities, reply=reply, kind="train",
                                      round_number=round_number)
        except IdentityError as err:
            _exclude(state, recorder, transport, round_number, reply.node, f"reply refused: {err}", err.claimed,
                     impostor=True)
            continue
        except Exception as err:  # noqa: BLE001  any undecodable payload is a bad payload
            _exclude(state, recorder, transport, round_number, reply.node, f"invalid reply: {err}")
            continue
        try:
            if client in accepted:
                raise InvalidPayload(f"partition-id {client} already replied this round")
            if clients is not None and client not in clients:
                raise InvalidPayload(f"partition-id {client} is not in this round's sample")
            metrics = train_metrics(reply.metrics)  # names, types, bounds: before anything is kept
            knowledge = accept_reply(config=config, num_classes=split.num_classes, release=release,
                                     record_names=reply.records, arrays=reply.arrays or {})
            row = privacy_row(config=config, metrics=metrics, previous=state.privacy.get(client))
            transport.identified(reply.node, client)
        except Exception as err:  # noqa: BLE001  any undecodable payload is a bad payload
            _exclude(state, recorder, transport, round_number, reply.node, f"invalid reply: {err}", claimed)
            continue
        state.bytes_up.append(sum(int(a.nbytes) for a in reply.arrays.values()))
        accepted[client] = knowledge
        if on_accept is not None:
            on_accept(client, knowledge)
        recorder.record("client-train", round=round_number, client=client, **metrics)
        if row is not None:
            if row.get("stopped") and not state.privacy.get(client, {}).get("stopped"):
                logger.warning("fedkd round %d: site %d stopped private training: epsilon %.3f of %g "
                               "spent, the next round would exceed it; it keeps releasing knowledge",
                               round_number, client, row["epsilon-spent"], row["target-epsilon"])
            state.privacy[client] = row
    return accepted


def repeated_failure(dropouts: list[dict[str, Any]], failures: dict[str, str]) -> str | None:
    """The line that stops a run when a site failed (its own exception, not a timeout or a
    lost connection) the same way as the last time it failed, else None. ``failures`` (a
    site -> its last failure) is updated with ``dropouts``, the exclusions just recorded.

    >>> seen = {}
    >>> repeated_failure([{"client": 2, "node": 7, "reason": "site failed: ValueError: x"}], seen) is None
    True
    >>> repeated_failure([{"client": 2, "node": 7, "reason": "site failed: ValueError: x"}], seen)
    'site 2 failed twice the same way: ValueError: x'
    """
    for entry in dropouts:
        reason = str(entry.get("reason", ""))
        if not reason.startswith("site failed:"):
            continue
        who = f"site {entry['client']}" if entry.get("client") is not None else f"node {entry['node']}"
        if failures.get(who) == reason:
            return f"{who} failed twice the same way: {reason.removeprefix('site failed:').strip()}"
        failures[who] = reason
    return None


def evaluate_sites(*, config: Config, transport: Transport, recorder: RunRecorder,
                   round_number: int, expected: int | None = None, identities: Identities | None = None,
                   state: ServerState | None = None, clients: frozenset[int] | None = None) -> dict[str, float]:
    """One evaluation exchange (:meth:`Transport.evaluate`; ``clients``: only those sites),
    recorded by :func:`record_evaluation`."""
    return record_evaluation(config=config, recorder=recorder, round_number=round_number,
                             replies=transport.evaluate(round_number, clients=clients), expected=expected,
                             identities=identities, state=state, transport=transport)


def record_evaluation(*, config: Config, recorder: RunRecorder, round_number: int,
                      replies: list[Reply], expected: int | None = None, identities: Identities | None = None,
                      state: ServerState | None = None, transport: Transport | None = None) -> dict[str, float]:
    """Each site's accuracy on its local test split (one ``client-eval`` record each) ->
    ALMA, example-weighted mean, worst (:func:`fedkd.reporting.alma_summary`), and, where
    every evaluated site reported its ``prior-accuracy``, ``alma-prior``
    (:func:`fedkd.reporting.prior_alma`). A failed or
    malformed reply, or a second reply for the same site, is left out with a log line.
    With ``identities`` a reply not signed by the claimed partition's key is refused (before
    the duplicate check: an impostor answering first does not shut the site out) and
    recorded as an ``excluded`` event (in ``state.dropouts`` too, when given).
    ``expected``: the sites of the round; when fewer were evaluated (evaluations lost) the
    scores say so (``evaluated-sites``) and a warning names both counts."""
    acc: dict[int, float] = {}
    examples: dict[int, float] = {}
    prior: dict[int, float] = {}
    for reply in replies:
        if reply.error is not None:
            logger.warning("fedkd round %d: evaluation failed on node %d: %s", round_number, reply.node,
                           short_reason(reply.error))
            continue
        try:
            client = _claim(config=config, identities=identities, reply=reply, kind="evaluate",
                            round_number=round_number)
        except IdentityError as err:
            _exclude(state, recorder, transport, round_number, reply.node, f"evaluation reply refused: {err}",
                     err.claimed, impostor=True)
            continue
        except Exception as err:  # noqa: BLE001
            logger.warning("fedkd round %d: evaluation reply from node %d ignored: %s",
                           round_number, reply.node, err)
            continue
        try:
            if client in acc:
                raise InvalidPayload(f"partition-id {client} already replied this round")
            accuracy, num_examples, extra = evaluation_scores(reply.metrics)
        except Exception as err:  # noqa: BLE001  a bad evaluation reply is skipped, not fatal
            logger.warning("fedkd round %d: evaluation reply from node %d ignored: %s",
                           round_number, reply.node, err)
            continue
        acc[client], examples[client] = accuracy, num_examples
        if "prior-accuracy" in extra:
            prior[client] = extra["prior-accuracy"]
        recorder.record("client-eval", round=round_number, client=client, accuracy=accuracy,
                        **{"num-examples": num_examples}, **extra)
    scores = alma_summary(acc, examples)
    if acc and set(prior) == set(acc):  # every evaluated site measured on the shared test set
        scores["alma-prior"] = prior_alma(prior)
    if expected is not None and len(acc) < expected:
        logger.warning("fedkd round %d: ALMA over %d of the round's %d sites (evaluations lost)",
                       round_number, len(acc), expected)
        scores["evaluated-sites"] = len(acc)
    return scores


# ------------------------------------------------------------------ the run


def round_clients(config: Config, round_number: int) -> frozenset[int] | None:
    """The sites sampled to train in ``round_number`` (:func:`fedkd.seeds.round_sample`,
    ``fraction-train``), or None when every site trains (``fraction-train`` 1)."""
    if config.fraction_train >= 1.0:
        return None
    ids = round_sample(config.seed, round_number, num_clients=config.data.num_clients,
                       fraction=config.fraction_train, minimum=config.min_clients)
    return frozenset(int(c) for c in ids)


def trained_clients(history: list[dict[str, Any]], accepted: Mapping[int, Any]) -> frozenset[int]:
    """The sites that have trained at least once (accepted in an earlier round of
    ``history`` or in this round's ``accepted``): under sampling, the sites evaluated,
    since a site never sampled still holds its untrained initial model.

    >>> sorted(trained_clients([{"accepted": [0, 3]}, {"accepted": [3]}], {5: None}))
    [0, 3, 5]
    """
    return frozenset({int(c) for entry in history for c in entry.get("accepted", [])} | set(accepted))


def run_rounds(*, config: Config, split: FederatedSplit, transport: Transport, recorder: RunRecorder,
               state: ServerState, on_accept: Callable[[int, int, np.ndarray, np.ndarray], None] | None = None,
               clock: Callable[[], float] | None = None, identities: Identities | None = None) -> str:
    """Rounds ``state.completed_round + 1 .. num-server-rounds``; returns the status line
    ("completed", or why the run stopped early). ``on_accept(round, client, positions, knowledge)`` sees
    every accepted release (the audit keeps the audited site's). ``identities``: the plan's
    keys (:class:`fedkd.identity.Identities`); None: partition ids are taken as claimed."""
    import time

    clock = clock or time.monotonic
    torch.manual_seed(config.seed)
    if transport.wait_for_sites() < config.min_clients:
        raise RoundFailed(f"fewer sites connected than min-clients ({config.min_clients})")
    failures: dict[str, str] = {}  # a site -> how it last failed (its own exception)
    for r in range(state.completed_round + 1, config.num_server_rounds + 1):
        round_start = clock()
        release = release_positions(config, split, r)
        sample = round_clients(config, r)
        hook = (lambda client, k, r=r, rel=release: on_accept(r, client, rel, k)) if on_accept is not None else None
        accepted: dict[int, np.ndarray] = {}
        for attempt in range(config.round_retries + 1):
            seen = len(state.dropouts)
            accepted = collect_knowledge(config=config, split=split, state=state, transport=transport,
                                         recorder=recorder, round_number=r, release=release, on_accept=hook,
                                         identities=identities, clients=sample)
            repeated = repeated_failure(state.dropouts[seen:], failures)
            if repeated is not None:
                logger.error("fedkd: %s", repeated)
                return f"stopped in round {r}: {repeated}"
            if len(accepted) >= config.min_clients:
                break
            logger.warning("fedkd round %d: %d valid replies < min-clients %d (attempt %d)",
                           r, len(accepted), config.min_clients, attempt + 1)
        if len(accepted) < config.min_clients:
            status = f"stopped in round {r}: {len(accepted)} valid replies, min-clients is {config.min_clients}"
            logger.warning("fedkd: %s", status)
            return status
        record = server_round(config=config, split=split, state=state, round_number=r, release=release,
                              accepted=accepted)
        recorder.save_weights(r, record.clients, record.weights, consensus_weights=record.consensus_weights)
        entry = dict(record.entry)
        if r % config.eval_every == 0 or r == config.num_server_rounds:
            evaluated = None if sample is None else trained_clients(state.history, accepted)
            entry.update(evaluate_sites(config=config, transport=transport, recorder=recorder, round_number=r,
                                        expected=len(accepted) if evaluated is None else len(evaluated),
                                        identities=identities, state=state, clients=evaluated))
        entry["seconds"] = clock() - round_start
        recorder.record("round", **entry)
        state.history.append(entry)
        arrays, meta = state.state_dict()
        meta.update({"config": config.to_flat(), "public-fingerprint": split.public_fingerprint})
        write_server_checkpoint(recorder.run_dir, round_number=r, arrays=arrays, state=meta)
        state.completed_round = r
        logger.info("fedkd round %d/%d: %d sites | ALMA %s | worst %s | global %s | %.1fs",
                    r, config.num_server_rounds, len(accepted), _pct(entry.get("alma")),
                    _pct(entry.get("worst")), _pct(entry.get("global-accuracy")), entry["seconds"])
    return "completed"


def run_federation(*, config: Config, split: FederatedSplit, transport: Transport, recorder: RunRecorder,
                   state: ServerState | None = None, runner: str | None = None,
                   on_accept: Callable[[int, int, np.ndarray, np.ndarray], None] | None = None,
                   identities: Identities | None = None) -> dict[str, Any]:
    """The whole run: :func:`run_rounds`, then ``summary.json`` (:func:`run_summary`) and the
    plots. ``state``: a resumed run's state (:meth:`ServerState.load_state_dict`). On an
    error the summary so far is still written (status ``failed: ...``) before it is raised."""
    state = state if state is not None else ServerState()
    try:
        status = run_rounds(config=config, split=split, transport=transport, recorder=recorder, state=state,
                            on_accept=on_accept, identities=identities)
    except Exception as err:  # a stopped run (SystemExit, KeyboardInterrupt) leaves no summary: resumable
        recorder.finish(run_summary(config=config, split=split, state=state, status=f"failed: {err}",
                                    runner=runner))  # keep what the run produced
        raise
    summary = run_summary(config=config, split=split, state=state, status=status, runner=runner)
    recorder.finish(summary)
    return summary


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
