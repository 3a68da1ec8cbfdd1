"""fedkd ServerApp: Flower's Grid as the federation's transport.

The round loop is :func:`fedkd.federation.loop.run_federation`; this module only moves its
inboxes and replies as Flower Messages (``train``, ``evaluate`` and ``query``), polls for
replies, and learns which node holds which partition. Node ids are not kept across
restarts (they change when a SuperNode re-registers): before sending anyone fused
knowledge, the server asks nodes it does not know which partition they hold (``query``).

With ``identity.site-keys`` every message carries a fresh challenge (record ``identity``,
``challenge``: 32 random bytes) and every reply must carry the site's signature (record
``identity``, ``signature``); the loop checks them (:mod:`fedkd.identity`). This module only
puts the one in and takes the other out.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedkd.audit.store import save_released, start_audit
from fedkd.checkpoint import CheckpointError, read_resumable_checkpoint
from fedkd.config import Config, ConfigError, build_config
from fedkd.data import load_federation
from fedkd.data.splits import DataUnavailableError, FederatedSplit
from fedkd.data.text import TextExtraMissingError
from fedkd.federation.loop import Reply, RoundFailed, run_federation
from fedkd.federation.preflight import check_site_models
from fedkd.federation.server import ServerState
from fedkd.federation.site import SiteInbox
from fedkd.identity import Identities, IdentityError, load_site_keys, new_challenge
from fedkd.privacy import check_privacy_plans
from fedkd.reporting import RunRecorder, run_directory, trim_events

app = ServerApp()

NODE_WAIT_SECONDS = 120.0
NODE_SETTLE_SECONDS = 1.0  # after the expected number registered: time for any extra to show up
REPLY_POLL_SECONDS = 0.1  # as often as the simulation engine polls its own queue (docs/benchmarks.md)


def _show_fedkd_log() -> None:
    """Print the federation's own log lines (logger ``fedkd``: rounds, exclusions) as Flower
    prints its own, once per process; Flower's lines without colour codes when the output is
    not a terminal (a log file, a pipe)."""
    import sys

    from flwr.common.logger import update_console_handler

    if not sys.stderr.isatty():
        update_console_handler(colored=False)
    logger = logging.getLogger("fedkd")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-8s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class GridTransport:
    """:class:`fedkd.federation.loop.Transport` over Flower's Grid."""

    def __init__(self, grid: Grid, config: Config, *, challenges: bool = False) -> None:
        self.grid, self.config, self.challenges = grid, config, challenges
        self.node_client: dict[int, int] = {}
        self.sent_challenge: dict[int, bytes] = {}  # node -> the challenge of its latest message

    # ------------------------------------------------------------- the Transport

    def wait_for_sites(self) -> int:
        wanted = self.config.data.num_clients
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < wanted and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = list(self.grid.get_node_ids())
        if len(nodes) >= wanted:  # nodes register one by one: let the last ones arrive, then count
            time.sleep(NODE_SETTLE_SECONDS)
            nodes = list(self.grid.get_node_ids())
        if len(nodes) > wanted:
            raise RoundFailed(
                f"{len(nodes)} SuperNodes connected but data.num-clients is {wanted}: start {wanted} "
                f"(flwr run . --federation-config \"num-supernodes={wanted}\"), or set data.num-clients={len(nodes)}")
        if len(nodes) < self.config.min_clients:
            raise RoundFailed(f"only {len(nodes)} site(s) connected within {NODE_WAIT_SECONDS:.0f}s; "
                              f"min-clients is {self.config.min_clients}")
        if len(nodes) < wanted:
            log(logging.WARNING, "fedkd: %d of %d sites connected; going on", len(nodes), wanted)
        return len(nodes)

    def train(self, round_number: int, inbox_for: Callable[[int | None], SiteInbox], *,
              clients: frozenset[int] | None = None) -> list[Reply]:
        nodes = self._nodes(clients)
        messages = [self._message(node, "train", _inbox_content(inbox_for(self.node_client.get(node))))
                    for node in nodes]
        replies = [self._reply(node, message) for node, message in self._exchange(messages)]
        answered = {r.node for r in replies}
        replies += [Reply(node=node, error=f"no reply within {self.config.round_timeout:.0f}s")
                    for node in nodes if node not in answered]
        present = {self.node_client.get(node) for node in nodes}
        for node, client in sorted(self.node_client.items(), key=lambda item: item[1]):
            if clients is not None and client not in clients:
                continue  # not sampled this round
            if node not in nodes and client not in present:  # a known site, gone from the federation
                replies.append(Reply(node=node, error="not connected"))
                present.add(client)
        return replies

    def evaluate(self, round_number: int, *, clients: frozenset[int] | None = None) -> list[Reply]:
        messages = [self._message(node, "evaluate", RecordDict({"config": ConfigRecord({"round": round_number})}))
                    for node in self._nodes(clients)]
        return [self._reply(node, message) for node, message in self._exchange(messages)]

    def query(self, round_number: int) -> list[Reply]:
        """Ask the nodes not yet known which partition they hold (from round 2: someone may
        be owed fused knowledge; from round 1 when sites are sampled, ``fraction-train``
        below 1, since a sample is of sites); the loop decides whom to believe."""
        unknown = [node for node in self.grid.get_node_ids() if node not in self.node_client]
        if not unknown or (round_number < 2 and self.config.fraction_train >= 1.0):
            return []
        messages = [self._message(node, "query", RecordDict({"config": ConfigRecord(
            {"question": "partition-id", "round": round_number})})) for node in unknown]
        return [self._reply(node, message) for node, message in self._exchange(messages)]

    def identified(self, node: int, client: int) -> None:
        self.node_client[node] = client

    def client_of(self, node: int) -> int | None:
        return self.node_client.get(node)

    def _nodes(self, clients: frozenset[int] | None) -> list[int]:
        """The connected nodes to message: all of them, or (``clients``) those known to hold
        one of ``clients``."""
        nodes = list(self.grid.get_node_ids())
        if clients is None:
            return nodes
        return [node for node in nodes if self.node_client.get(node) in clients]

    # ------------------------------------------------------------- messages

    def _message(self, node: int, kind: str, content: RecordDict) -> Message:
        if self.challenges:  # a fresh challenge per message: a signed reply answers this one only
            self.sent_challenge[node] = new_challenge()
            content["identity"] = ConfigRecord({"challenge": self.sent_challenge[node]})
        # undelivered by the round timeout: dropped, not queued
        return Message(content=content, dst_node_id=node, message_type=kind, ttl=self.config.round_timeout)

    def _reply(self, node: int, message: Message) -> Reply:
        if message.has_error():
            return Reply(node=node, error=self._failure(message))
        content = message.content
        metrics = dict(content["metrics"]) if "metrics" in content.metric_records else None
        arrays = ({name: a.numpy() for name, a in content["knowledge"].items()}
                  if "knowledge" in content.array_records else None)
        identity = content.config_records.get("identity")
        signature = identity.get("signature") if identity is not None else None
        return Reply(node=node, metrics=metrics, arrays=arrays,
                     records=frozenset(name for name in content.keys() if name != "identity"),
                     challenge=self.sent_challenge.get(node) if self.challenges else None,
                     signature=signature if isinstance(signature, bytes) else None)

    def _failure(self, reply: Message) -> str:
        """Why an error reply came back: the message expired undelivered (a site that is
        down or hung when the round ends), the node is known to be gone, or the site failed."""
        if reply.error.code in (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
            return f"no reply within {self.config.round_timeout:.0f}s (message expired)"
        if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
            return f"node unavailable: {reply.error.reason}"
        return f"site failed: {reply.error.reason}"

    def _exchange(self, messages: list[Message]) -> list[tuple[int, Message]]:
        """Send ``messages`` and collect the replies that arrive within the round timeout,
        each with the node it answers for (an error reply made by the SuperLink, such as
        "node unavailable", comes from the SuperLink's own id, so it is matched through the
        message it replies to). Like ``Grid.send_and_receive``, but polling every
        ``REPLY_POLL_SECONDS`` instead of every 3 s: a round ends soon after its last reply."""
        if not messages:
            return []
        message_ids = list(self.grid.push_messages(messages))
        sent = {mid: m.metadata.dst_node_id for mid, m in zip(message_ids, messages, strict=True) if mid}
        pending, replies = set(sent), []
        deadline = time.monotonic() + self.config.round_timeout
        while pending:
            for reply in self.grid.pull_messages(pending):
                replies.append(reply)
                pending.discard(reply.metadata.reply_to_message_id)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(REPLY_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        return [(sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]


def _inbox_content(inbox: SiteInbox) -> RecordDict:
    """A :class:`SiteInbox` as a train message's records: ``config`` (round, fingerprint,
    digest, ``dp-stop`` when set), ``plan`` (release positions, when a subset), ``fused``
    (F_i, its positions) and ``privacy`` (the server's history of the site's DP spend)."""
    round_config = {
        "round": inbox.round_number,
        "public-fingerprint": inbox.public_fingerprint,
        "config-digest": inbox.config_digest,
    }
    if inbox.dp_stop:
        round_config["dp-stop"] = True
    content = RecordDict({"config": ConfigRecord(round_config)})
    if inbox.privacy_history is not None:
        content["privacy"] = ArrayRecord({"history": Array(inbox.privacy_history)})
    if inbox.release_positions is not None:
        content["plan"] = ArrayRecord({"release-positions": Array(inbox.release_positions)})
    if inbox.fused is not None:
        arrays = {"knowledge": Array(inbox.fused)}
        if inbox.fused_positions is not None:
            arrays["positions"] = Array(inbox.fused_positions)
        if inbox.consensus is not None:
            arrays["consensus"] = Array(inbox.consensus)
        content["fused"] = ArrayRecord(arrays)
    return content


# Input the run cannot start with: said in one line each (as `fedkd simulate` says it), not as
# a traceback. Under `flwr run .` the run config is first read here, in Flower's process.
REFUSED = (ConfigError, CheckpointError, DataUnavailableError, TextExtraMissingError, FileNotFoundError)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _show_fedkd_log()
    try:
        config = build_config(context.run_config)
        keys = _site_keys(config)  # before the run directory: a bad plan leaves nothing behind
        prepared = _prepare(config)
    except REFUSED as err:
        for problem in getattr(err, "problems", None) or [str(err)]:
            log(logging.ERROR, "fedkd: error: %s", problem)
        log(logging.ERROR, "fedkd: the run did not start (nothing was sent to the sites)")
        return
    identities = Identities(keys, run_id=grid.run.run_id) if keys is not None else None
    _serve(grid, config, *prepared, identities=identities)


def _site_keys(config: Config) -> dict | None:
    """The plan's public keys (``identity.site-keys``), or None when identities are off;
    raises ConfigError (one line) for a plan that lacks a partition or cannot be read."""
    if not config.identity.site_keys:
        return None
    try:
        keys = load_site_keys(config.identity.site_keys, num_clients=config.data.num_clients)
    except IdentityError as err:
        raise ConfigError([str(err)]) from None
    log(logging.INFO, "fedkd: identities on: %d site keys from %s", len(keys), config.identity.site_keys)
    return keys


def _prepare(config: Config) -> tuple[Path, RunRecorder, FederatedSplit, ServerState]:
    """Everything the server checks and loads before round 1; raises one of ``REFUSED``."""
    run_dir = run_directory(config)
    resume = _read_checkpoint(config, run_dir) if config.checkpoint.resume else None
    recorded = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, resume=False))
    recorder = RunRecorder(run_dir, recorded.to_toml())
    log(logging.INFO, "fedkd: run directory %s", run_dir)
    split = load_federation(config.data, config.seed)
    if config.audit.enabled:  # record which candidates the audited site trains on
        split = start_audit(config, split, run_dir)
    check_privacy_plans(config, [len(c.train) for c in split.clients])  # refuse an unreachable budget
    check_site_models(config=config, split=split)  # a model that cannot read the data: before round 1
    state = ServerState()
    if resume is not None:
        round_number, arrays, saved = resume
        if saved["public-fingerprint"] != split.public_fingerprint:
            raise CheckpointError("the checkpoint's public transfer set differs from this run's")
        state.load_state_dict(arrays, saved, round_number=round_number)
        recorder.record("resumed", **{"after-round": round_number})
        log(logging.INFO, "fedkd: resuming after round %d of %d", round_number, config.num_server_rounds)
    return run_dir, recorder, split, state


def _serve(grid: Grid, config: Config, run_dir: Path, recorder: RunRecorder, split: FederatedSplit,
           state: ServerState, *, identities: Identities | None = None) -> None:
    transport = GridTransport(grid, config, challenges=identities is not None)
    on_accept = None
    if config.audit.enabled:
        def on_accept(round_number: int, client: int, release: np.ndarray, knowledge: np.ndarray) -> None:
            if client == config.audit.site:  # the audited site's releases, for the audit
                save_released(run_dir, round_number, positions=release, knowledge=knowledge)
    summary = run_federation(config=config, split=split, transport=transport, recorder=recorder,
                             state=state, on_accept=on_accept, identities=identities)
    log(logging.INFO, "fedkd: %s; summary in %s", summary["status"], run_dir / "summary.json")


def _read_checkpoint(config: Config, run_dir: Path) -> tuple[int, dict, dict]:
    """The stopped run's checkpoint, after checking this run may continue it; trims the
    events the stopped run recorded past it."""
    round_number, arrays, state = read_resumable_checkpoint(run_dir, config_flat=config.to_flat())
    dropped = trim_events(run_dir, through_round=round_number)
    if dropped:
        log(logging.INFO, "fedkd: dropped %d events recorded after the checkpoint of round %d",
            dropped, round_number)
    return round_number, arrays, state
