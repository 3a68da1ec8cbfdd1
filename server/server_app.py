"""fedkd ServerApp: the round loop over Flower's Message API.

Per round: send each site its own fused knowledge F_i (``send_and_receive``), validate
every reply, fuse the accepted knowledge (``fedkd.fusion.fuse``), distil the global
student, evaluate every ``eval-every`` rounds, and record everything in the run
directory. The algorithms live in ``fedkd``; this module only moves messages.

After every round the server checkpoints its state (``<run dir>/checkpoint.npz``);
``checkpoint.resume = true`` continues a stopped run from there. Node ids are not kept
(they change when a SuperNode re-registers): the server asks nodes it does not know which
partition they hold (a ``query`` message) before sending anyone fused knowledge.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedkd.audit.store import save_released, start_audit
from fedkd.checkpoint import (
    CheckpointError,
    read_server_checkpoint,
    resume_problems,
    trim_events,
    write_server_checkpoint,
)
from fedkd.config import Config, build_config
from fedkd.data import FederatedSplit, load_federation
from fedkd.distillation import accuracy, distil
from fedkd.fusion import fuse
from fedkd.knowledge import InvalidPayload, encode, validate_client_id, validate_knowledge
from fedkd.models import build_model
from fedkd.reporting import RunRecorder, alma_summary
from fedkd.site import check_privacy_plans

app = ServerApp()

NODE_WAIT_SECONDS = 120.0
REPLY_POLL_SECONDS = 0.1  # as often as the simulation engine polls its own queue (docs/benchmarks.md)


class RoundFailed(RuntimeError):
    """Too few valid replies for a round, after retries."""


def run_directory(config: Config) -> Path:
    name = config.run_name or f"{config.fusion.method}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(config.output_dir).resolve() / name
    if config.checkpoint.resume:  # continue the stopped run there
        if not (run_dir / "checkpoint.npz").is_file():
            raise FileNotFoundError(
                f"checkpoint.resume: no checkpoint in {run_dir}; is run-name / output-dir the "
                "stopped run's, and did it complete a round?"
            )
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} is not empty; choose another run-name")
    return run_dir


@dataclass
class Federation:
    """Server-side state of a run: who is who, what each site was last sent, the student."""

    grid: Grid
    config: Config
    split: FederatedSplit
    recorder: RunRecorder
    node_client: dict[int, int] = field(default_factory=dict)
    fused: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    student: torch.nn.Module | None = None
    bytes_up: list[int] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    dropouts: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    privacy: dict[int, dict] = field(default_factory=dict)
    completed_round: int = 0
    resumed_from: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    # ------------------------------------------------------------- messages out

    def _train_message(self, node: int, round_number: int, release: np.ndarray) -> Message:
        content = RecordDict(
            {
                "config": ConfigRecord(
                    {
                        "round": round_number,
                        "public-fingerprint": self.split.public_fingerprint,
                        "config-digest": self.config.digest(),
                    }
                )
            }
        )
        if len(release) < len(self.split.public):  # a subset: say which rows to release
            content["plan"] = ArrayRecord({"release-positions": Array(release)})
        client = self.node_client.get(node)
        if client is not None and client in self.fused:
            positions, knowledge = self.fused[client]
            arrays = {"knowledge": Array(encode(knowledge, self.config.knowledge.wire_format))}
            if len(positions) < len(self.split.public):
                arrays["positions"] = Array(positions)
            content["fused"] = ArrayRecord(arrays)
        sent = sum(a.numpy().nbytes for name in ("plan", "fused") if name in content
                   for a in content[name].values())
        self.bytes_down.append(sent)
        return Message(content=content, dst_node_id=node, message_type="train",
                       ttl=self.config.round_timeout)  # undelivered by then: dropped, not queued

    # ------------------------------------------------------------- one round

    def wait_for_nodes(self) -> list[int]:
        wanted = self.config.data.num_clients
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < wanted and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = list(self.grid.get_node_ids())
        if len(nodes) < self.config.min_clients:
            raise RoundFailed(
                f"only {len(nodes)} site(s) connected within {NODE_WAIT_SECONDS:.0f}s; "
                f"min-clients is {self.config.min_clients}"
            )
        if len(nodes) < wanted:
            log(WARNING, "fedkd: %d of %d sites connected; going on", len(nodes), wanted)
        return nodes

    def exchange(self, messages: list[Message]) -> list[tuple[int, Message]]:
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

    def identify(self, nodes: list[int]) -> None:
        """Ask ``nodes`` which partition they hold (``query`` message); unanswered ones stay
        unknown and get no fused knowledge until their train reply says who they are."""
        messages = [
            Message(RecordDict({"config": ConfigRecord({"question": "partition-id"})}),
                    dst_node_id=node, message_type="query", ttl=self.config.round_timeout)
            for node in nodes
        ]
        for node, reply in self.exchange(messages):
            try:
                if reply.has_error():
                    raise InvalidPayload(reply.error.reason)
                metrics = dict(reply.content["metrics"]) if "metrics" in reply.content.metric_records else {}
                self.node_client[node] = validate_client_id(metrics, num_clients=self.config.data.num_clients)
            except Exception as err:  # noqa: BLE001  an unknown node just gets no fused knowledge
                log(WARNING, "fedkd: node %d did not say which site it is: %s", node, err)

    def collect_knowledge(self, round_number: int, release: np.ndarray) -> dict[int, np.ndarray]:
        """One train exchange; returns validated knowledge per client id."""
        nodes = list(self.grid.get_node_ids())
        unknown = [node for node in nodes if node not in self.node_client]
        if self.fused and unknown:  # someone may be owed fused knowledge: learn who is who
            self.identify(unknown)
        messages = [self._train_message(node, round_number, release) for node in nodes]
        accepted: dict[int, np.ndarray] = {}
        answered = set()
        for node, reply in self.exchange(messages):
            answered.add(node)
            if reply.has_error():
                self._exclude(round_number, node, self._failure(reply))
                continue
            try:
                content = reply.content
                client = validate_client_id(
                    dict(content["metrics"]) if "metrics" in content.metric_records else {},
                    num_clients=self.config.data.num_clients,
                )
                if client in accepted:
                    raise InvalidPayload(f"partition-id {client} already replied this round")
                self.node_client[node] = client
                arrays = (
                    {name: a.numpy() for name, a in content["knowledge"].items()}
                    if "knowledge" in content.array_records else {}
                )
                knowledge = validate_knowledge(
                    record_names=content.keys(),
                    arrays=arrays,
                    expected_rows=len(release),
                    num_classes=self.split.num_classes,
                    wire_format=self.config.knowledge.wire_format,
                    top_k=self.config.shield.top_k,
                )
            except Exception as err:  # noqa: BLE001  any undecodable payload is a bad payload
                self._exclude(round_number, node, f"invalid reply: {err}")
                continue
            self.bytes_up.append(sum(int(a.nbytes) for a in arrays.values()))
            accepted[client] = knowledge
            if self.config.audit.enabled and client == self.config.audit.site:
                save_released(self.recorder.run_dir, round_number, positions=release, knowledge=knowledge)
            metrics = {k: v for k, v in content["metrics"].items() if k != "partition-id"}
            self.recorder.record("client-train", round=round_number, client=client, **metrics)
            if "epsilon" in metrics:
                self._update_privacy_ledger(round_number, client, metrics)
        for node in set(nodes) - answered:
            self._exclude(round_number, node, f"no reply within {self.config.round_timeout:.0f}s")
        present = {self.node_client.get(node) for node in nodes}
        for node, client in sorted(self.node_client.items(), key=lambda item: item[1]):
            if node not in nodes and client not in present:  # a known site, gone from the federation
                self._exclude(round_number, node, "not connected")
                present.add(client)
        return accepted

    def _update_privacy_ledger(self, round_number: int, client: int, m: dict) -> None:
        if m.get("dp-stopped") and not self.privacy.get(client, {}).get("stopped"):
            log(WARNING, "fedkd round %d: site %d stopped private training: epsilon %.3f of %g "
                "spent, the next round would exceed it; it keeps releasing knowledge",
                round_number, client, m["epsilon"], m["dp-target-epsilon"])
        self.privacy[client] = {
            "target-epsilon": m["dp-target-epsilon"],
            "epsilon-spent": m["epsilon"],
            "delta": m["dp-delta"],
            "noise-multiplier": m["dp-noise-multiplier"],
            "sample-rate": m["dp-sample-rate"],
            "steps": int(m["dp-steps"]),
            "planned-steps": int(m["dp-planned-steps"]),
            "accountant": self.config.privacy.accountant,
            "stopped": bool(m.get("dp-stopped")) or self.privacy.get(client, {}).get("stopped", False),
        }

    def _failure(self, reply: Message) -> str:
        """Why an error reply came back: the message expired undelivered (a site that is
        down or hung when the round ends), the node is known to be gone, or the site failed."""
        if reply.error.code in (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
            return f"no reply within {self.config.round_timeout:.0f}s (message expired)"
        if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
            return f"node unavailable: {reply.error.reason}"
        return f"site failed: {reply.error.reason}"

    def _exclude(self, round_number: int, node: int, reason: str) -> None:
        client = self.node_client.get(node)
        who = f"site {client}" if client is not None else f"node {node}"
        log(WARNING, "fedkd round %d: %s excluded: %s", round_number, who, reason)
        entry = {"round": round_number, "node": node, "client": client, "reason": reason}
        self.dropouts.append(entry)
        self.recorder.record("excluded", **entry)

    def fuse_round(self, round_number: int, release: np.ndarray, accepted: dict[int, np.ndarray]) -> np.ndarray:
        clients = sorted(accepted)
        knowledge = np.stack([accepted[c] for c in clients])
        f = self.config.fusion
        result = fuse(
            knowledge=knowledge,
            method=f.method,
            measure=f.measure,
            divergence=f.divergence,
            beta=f.beta,
            threshold=f.threshold,
            max_neighbours=f.max_neighbours,
            confident_fraction=f.confident_fraction,
            uniform_entropy=f.uniform_entropy,
            sharpen_temperature=f.sharpen_temperature,
            era_temperature=f.era_temperature,
        )
        self.recorder.save_weights(round_number, clients, result.weights)
        if result.fused is None:
            return knowledge.mean(axis=0)
        for row, client in enumerate(clients):
            self.fused[client] = (release, result.fused[row])
        return result.fused.mean(axis=0)

    def train_student(self, round_number: int, release: np.ndarray, targets: np.ndarray) -> float:
        g = self.config.global_student
        t = self.config.train
        if self.student is None:
            self.student = build_model(g.model, input_shape=self.split.input_shape,
                                       num_classes=self.split.num_classes, seed=self.config.seed,
                                       **self.split.model_options)
        distil(self.student, self.split.public.x[release], targets, epochs=g.epochs,
               batch_size=t.batch_size, lr=t.lr, temperature=t.kd_temperature,
               seed=self.config.seed + round_number)
        return accuracy(self.student, self.split.test)

    def evaluate(self, round_number: int) -> dict[str, float]:
        messages = [
            Message(RecordDict({"config": ConfigRecord({"round": round_number})}),
                    dst_node_id=node, message_type="evaluate", ttl=self.config.round_timeout)
            for node in self.grid.get_node_ids()
        ]
        acc, examples = {}, {}
        for node, reply in self.exchange(messages):
            if reply.has_error():
                log(WARNING, "fedkd round %d: evaluation failed on node %d: %s",
                    round_number, node, reply.error.reason)
                continue
            try:
                m = dict(reply.content["metrics"])
                client = validate_client_id(m, num_clients=self.config.data.num_clients)
                accuracy_, examples_ = float(m["accuracy"]), float(m["num-examples"])
                if not (0.0 <= accuracy_ <= 1.0 or np.isnan(accuracy_)) or not examples_ >= 0:
                    raise InvalidPayload(f"accuracy {accuracy_} / num-examples {examples_} out of range")
            except Exception as err:  # noqa: BLE001  a bad evaluation reply is skipped, not fatal
                log(WARNING, "fedkd round %d: evaluation reply from node %d ignored: %s",
                    round_number, node, err)
                continue
            acc[client], examples[client] = accuracy_, examples_
            self.recorder.record("client-eval", round=round_number, client=client,
                                 accuracy=acc[client], **{"num-examples": examples[client]})
        return alma_summary(acc, examples)

    # ------------------------------------------------------------- checkpoints

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays and JSON-able state: everything a resumed run needs to continue exactly
        (fused knowledge keyed by partition id; node ids are not kept)."""
        arrays: dict[str, np.ndarray] = {}
        for client, (positions, knowledge) in self.fused.items():
            arrays[f"fused/{client}/positions"] = positions
            arrays[f"fused/{client}/knowledge"] = knowledge
        if self.student is not None:
            for name, tensor in self.student.state_dict().items():
                arrays[f"student/{name}"] = tensor.detach().cpu().numpy()
        state = {
            "config": self.config.to_flat(),
            "public-fingerprint": self.split.public_fingerprint,
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

    def load_state_dict(self, round_number: int, arrays: dict[str, np.ndarray], state: dict) -> None:
        if state["public-fingerprint"] != self.split.public_fingerprint:
            raise CheckpointError("the checkpoint's public transfer set differs from this run's")
        self.fused = {
            int(c): (arrays[f"fused/{c}/positions"], arrays[f"fused/{c}/knowledge"])
            for c in state["fused-clients"]
        }
        if state["student"]:
            g = self.config.global_student
            self.student = build_model(g.model, input_shape=self.split.input_shape,
                                       num_classes=self.split.num_classes, seed=self.config.seed,
                                       **self.split.model_options)
            prefix = "student/"
            self.student.load_state_dict(
                {k[len(prefix):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(prefix)}
            )
        self.bytes_up, self.bytes_down = list(state["bytes-up"]), list(state["bytes-down"])
        self.dropouts, self.history = list(state["dropouts"]), list(state["history"])
        self.privacy = {int(c): v for c, v in state["privacy"].items()}
        self.resumed_from = [*state["resumed-from"], round_number]
        self.completed_round = round_number

    def checkpoint(self, round_number: int) -> None:
        arrays, state = self.state_dict()
        write_server_checkpoint(self.recorder.run_dir, round_number=round_number, arrays=arrays, state=state)
        self.completed_round = round_number

    # ------------------------------------------------------------- the run

    def run(self) -> str:
        """All rounds; returns the run's status line (history and totals stay on self)."""
        cfg = self.config
        num_public = len(self.split.public)
        self.wait_for_nodes()
        for r in range(self.completed_round + 1, cfg.num_server_rounds + 1):
            round_start = time.monotonic()
            release = np.arange(num_public)
            if 0 < cfg.knowledge.public_subset < num_public:
                # seeded per round (no carried RNG state), so a resumed run draws the same subsets
                rng = np.random.default_rng([cfg.seed, r])
                release = np.sort(rng.choice(num_public, cfg.knowledge.public_subset, replace=False))
            accepted = {}
            for attempt in range(cfg.round_retries + 1):
                accepted = self.collect_knowledge(r, release)
                if len(accepted) >= cfg.min_clients:
                    break
                log(WARNING, "fedkd round %d: %d valid replies < min-clients %d (attempt %d)",
                    r, len(accepted), cfg.min_clients, attempt + 1)
            if len(accepted) < cfg.min_clients:
                status = (f"stopped in round {r}: {len(accepted)} valid replies, "
                          f"min-clients is {cfg.min_clients}")
                log(WARNING, "fedkd: %s", status)
                return status
            targets = self.fuse_round(r, release, accepted)
            entry = {"round": r, "accepted": sorted(accepted)}
            if cfg.global_student.enabled:
                entry["global-accuracy"] = self.train_student(r, release, targets)
            if r % cfg.eval_every == 0 or r == cfg.num_server_rounds:
                entry.update(self.evaluate(r))
            entry["seconds"] = time.monotonic() - round_start
            self.recorder.record("round", **entry)
            self.history.append(entry)
            self.checkpoint(r)
            log(INFO, "fedkd round %d/%d: %d sites | ALMA %s | worst %s | global %s | %.1fs",
                r, cfg.num_server_rounds, len(accepted), _pct(entry.get("alma")),
                _pct(entry.get("worst")), _pct(entry.get("global-accuracy")), entry["seconds"])
        return "completed"

    def summary(self, status: str) -> dict:
        """The figures of the run so far (``summary.json``)."""
        final: dict[str, float] = {}
        for entry in self.history:  # latest value of each metric
            final.update({k: entry[k] for k in ("alma", "alma-weighted", "worst", "global-accuracy")
                          if k in entry})
        up = float(np.mean(self.bytes_up)) if self.bytes_up else 0.0
        down = float(np.mean(self.bytes_down)) if self.bytes_down else 0.0
        return {
            "status": status,
            "method": self.config.fusion.method,
            "rounds-completed": self.history[-1]["round"] if self.history else 0,
            "rounds-planned": self.config.num_server_rounds,
            "final": final,
            "history": self.history,
            "bytes": {"uplink-per-client-round": up, "downlink-per-client-round": down,
                      "total-per-client-round": up + down},
            "dropouts": self.dropouts,
            "resumed-from": self.resumed_from,
            "privacy": {"enabled": self.config.privacy.enabled,
                        "ledger": {str(c): self.privacy[c] for c in sorted(self.privacy)}},
            "seconds": time.monotonic() - self.started,
            "public-fingerprint": self.split.public_fingerprint,
        }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = build_config(context.run_config)
    torch.manual_seed(config.seed)
    run_dir = run_directory(config)
    resume = _read_checkpoint(config, run_dir) if config.checkpoint.resume else None
    recorded = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, resume=False))
    recorder = RunRecorder(run_dir, recorded.to_toml())
    log(INFO, "fedkd: run directory %s", run_dir)
    split = load_federation(config.data, config.seed)
    if config.audit.enabled:  # record which candidates the audited site trains on
        split = start_audit(config, split, run_dir)
    check_privacy_plans(config, split)  # refuse an unreachable budget before round 1
    federation = Federation(grid=grid, config=config, split=split, recorder=recorder)
    if resume is not None:
        federation.load_state_dict(*resume)
        recorder.record("resumed", **{"after-round": resume[0]})
        log(INFO, "fedkd: resuming after round %d of %d", resume[0], config.num_server_rounds)
    try:
        status = federation.run()
    except Exception as err:
        recorder.finish(federation.summary(f"failed: {err}"))  # keep what the run produced
        raise
    summary = federation.summary(status)
    recorder.finish(summary)
    log(INFO, "fedkd: %s; summary in %s", summary["status"], run_dir / "summary.json")


def _read_checkpoint(config: Config, run_dir: Path) -> tuple[int, dict, dict]:
    """The stopped run's checkpoint, after checking this run may continue it; trims the
    events the stopped run recorded past it."""
    round_number, arrays, state = read_server_checkpoint(run_dir)
    problems = resume_problems(state["config"], config.to_flat(), checkpoint_round=round_number)
    if problems:
        raise CheckpointError(
            f"cannot resume {run_dir} with a different configuration:\n  " + "\n  ".join(problems)
        )
    dropped = trim_events(run_dir, through_round=round_number)
    if dropped:
        log(INFO, "fedkd: dropped %d events recorded after the checkpoint of round %d",
            dropped, round_number)
    return round_number, arrays, state
