"""fedkd ServerApp: the round loop over Flower's Message API.

Per round: send each site its own fused knowledge F_i (``send_and_receive``), validate
every reply, fuse the accepted knowledge (``fedkd.fusion.fuse``), distil the global
student, evaluate every ``eval-every`` rounds, and record everything in the run
directory. The algorithms live in ``fedkd``; this module only moves messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

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


class RoundFailed(RuntimeError):
    """Too few valid replies for a round, after retries."""


def run_directory(config: Config) -> Path:
    name = config.run_name or f"{config.fusion.method}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(config.output_dir).resolve() / name
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
            arrays = {"knowledge": Array(encode(knowledge))}
            if len(positions) < len(self.split.public):
                arrays["positions"] = Array(positions)
            content["fused"] = ArrayRecord(arrays)
        sent = sum(a.numpy().nbytes for name in ("plan", "fused") if name in content
                   for a in content[name].values())
        self.bytes_down.append(sent)
        return Message(content=content, dst_node_id=node, message_type="train")

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

    def collect_knowledge(self, round_number: int, release: np.ndarray) -> dict[int, np.ndarray]:
        """One train exchange; returns validated knowledge per client id."""
        nodes = list(self.grid.get_node_ids())
        messages = [self._train_message(node, round_number, release) for node in nodes]
        replies = self.grid.send_and_receive(messages, timeout=self.config.round_timeout)
        accepted: dict[int, np.ndarray] = {}
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                self._exclude(round_number, node, f"site failed: {reply.error.reason}")
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
                )
            except Exception as err:  # noqa: BLE001  any undecodable payload is a bad payload
                self._exclude(round_number, node, f"invalid reply: {err}")
                continue
            self.bytes_up.append(int(arrays["knowledge"].nbytes))
            accepted[client] = knowledge
            metrics = {k: v for k, v in content["metrics"].items() if k != "partition-id"}
            self.recorder.record("client-train", round=round_number, client=client, **metrics)
            if "epsilon" in metrics:
                self._update_privacy_ledger(round_number, client, metrics)
        for node in set(nodes) - answered:
            self._exclude(round_number, node, f"no reply within {self.config.round_timeout:.0f}s")
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
                    dst_node_id=node, message_type="evaluate")
            for node in self.grid.get_node_ids()
        ]
        acc, examples = {}, {}
        for reply in self.grid.send_and_receive(messages, timeout=self.config.round_timeout):
            if reply.has_error():
                log(WARNING, "fedkd round %d: evaluation failed on node %d: %s",
                    round_number, reply.metadata.src_node_id, reply.error.reason)
                continue
            try:
                m = dict(reply.content["metrics"])
                client = validate_client_id(m, num_clients=self.config.data.num_clients)
                accuracy_, examples_ = float(m["accuracy"]), float(m["num-examples"])
                if not (0.0 <= accuracy_ <= 1.0 or np.isnan(accuracy_)) or not examples_ >= 0:
                    raise InvalidPayload(f"accuracy {accuracy_} / num-examples {examples_} out of range")
            except Exception as err:  # noqa: BLE001  a bad evaluation reply is skipped, not fatal
                log(WARNING, "fedkd round %d: evaluation reply from node %d ignored: %s",
                    round_number, reply.metadata.src_node_id, err)
                continue
            acc[client], examples[client] = accuracy_, examples_
            self.recorder.record("client-eval", round=round_number, client=client,
                                 accuracy=acc[client], **{"num-examples": examples[client]})
        return alma_summary(acc, examples)

    # ------------------------------------------------------------- the run

    def run(self) -> str:
        """All rounds; returns the run's status line (history and totals stay on self)."""
        cfg = self.config
        num_public = len(self.split.public)
        self.wait_for_nodes()
        for r in range(1, cfg.num_server_rounds + 1):
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
    recorder = RunRecorder(run_dir, config.to_toml())
    log(INFO, "fedkd: run directory %s", run_dir)
    split = load_federation(config.data, config.seed)
    check_privacy_plans(config, split)  # refuse an unreachable budget before round 1
    federation = Federation(grid=grid, config=config, split=split, recorder=recorder)
    try:
        status = federation.run()
    except Exception as err:
        recorder.finish(federation.summary(f"failed: {err}"))  # keep what the run produced
        raise
    summary = federation.summary(status)
    recorder.finish(summary)
    log(INFO, "fedkd: %s; summary in %s", summary["status"], run_dir / "summary.json")
