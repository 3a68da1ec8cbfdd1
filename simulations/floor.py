"""The floor: a plain single-process loop doing what a simulated federation does, no Flower.

``run_floor(config)`` calls fedkd's pure functions directly, in the order the
ServerApp/ClientApp pair calls them, in one process:

    for each round r:
        every site i (in order): run_site_round(...)  -> knowledge (adversaries corrupt it)
        server: float16 wire round trip + validate_knowledge, fuse, global student
        every eval round: evaluate_site on every site -> ALMA, worst

It keeps each site's model and privacy ledger in memory (the ClientApp keeps them in
``context.state``), sends F_i through the same float16 encoding, and records the run in
the same run-directory format (``fedkd.reporting``: config.toml, metrics.jsonl,
weights/round_NNNN.npz, summary.json, plots). With the same config and seeds it gives
the same numbers as ``fedkd simulate`` (tests/test_floor.py checks this), so it serves
two purposes:

* the *floor* of the speed benchmark: simulation time / floor time is the framework's
  overhead (Flower, Ray, messages, processes);
* a fast runner for large benchmark grids (``simulations/benchmark.py``).

``run_fedavg(config)`` runs FedAvg (weight averaging, :mod:`fedkd.fedavg`) on the same
split with one architecture for every site: the weight-sharing reference.

Both run sites one after another in this process with one torch thread, as each simulated
site does (``torch.set_num_threads(1)`` in the ClientApp).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedkd.adversary import corrupt
from fedkd.config import Config
from fedkd.data import FederatedSplit, load_federation
from fedkd.distillation import accuracy, distil, train_supervised
from fedkd.fedavg import average_weights, weight_bytes
from fedkd.fusion import fuse
from fedkd.knowledge import decode, encode, site_record, validate_knowledge
from fedkd.models import build_model
from fedkd.privacy import PrivacyLedger
from fedkd.reporting import RunRecorder, alma_summary
from fedkd.site import (
    build_site_model,
    build_site_teacher,
    check_privacy_plans,
    evaluate_site,
    run_site_round,
    site_privacy_plan,
    privacy_metrics,
    site_seed,
    train_private_site,
)


def floor_run_dir(config: Config) -> Path:
    if not config.run_name:
        raise ValueError("the floor runner needs a run-name (its run directory under output-dir)")
    return Path(config.output_dir).resolve() / config.run_name


def _recorder(config: Config) -> RunRecorder:
    run_dir = floor_run_dir(config)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} is not empty; choose another run-name")
    recorded = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, resume=False))
    return RunRecorder(run_dir, recorded.to_toml())


def _release(config: Config, num_public: int, round_number: int) -> np.ndarray:
    """This round's public positions, drawn as the ServerApp draws them."""
    release = np.arange(num_public)
    if 0 < config.knowledge.public_subset < num_public:
        rng = np.random.default_rng([config.seed, round_number])
        release = np.sort(rng.choice(num_public, config.knowledge.public_subset, replace=False))
    return release


def _ledger_round_trip(ledger: PrivacyLedger | None, config: Config, split: FederatedSplit,
                       client: int) -> PrivacyLedger | None:
    """The ClientApp rebuilds the ledger from its JSON state every round; so do we."""
    if ledger is None:
        return None
    fresh = PrivacyLedger(site_privacy_plan(config, split.clients[client].train, client))
    fresh.load_state_dict(json.loads(ledger.to_json()))
    return fresh


def _privacy_entry(ledger: PrivacyLedger, metrics: dict, previous: dict | None) -> dict:
    return {
        "target-epsilon": metrics["dp-target-epsilon"],
        "epsilon-spent": metrics["epsilon"],
        "delta": metrics["dp-delta"],
        "noise-multiplier": metrics["dp-noise-multiplier"],
        "sample-rate": metrics["dp-sample-rate"],
        "steps": int(metrics["dp-steps"]),
        "planned-steps": int(metrics["dp-planned-steps"]),
        "accountant": ledger.plan.accountant,
        "stopped": bool(metrics.get("dp-stopped")) or bool((previous or {}).get("stopped", False)),
    }


def _summary(config: Config, split: FederatedSplit, method: str, history: list[dict],
             bytes_up: list[float], bytes_down: list[float], privacy: dict, started: float) -> dict:
    final: dict[str, float] = {}
    for entry in history:
        final.update({k: entry[k] for k in ("alma", "alma-weighted", "worst", "global-accuracy")
                      if k in entry})
    up = float(np.mean(bytes_up)) if bytes_up else 0.0
    down = float(np.mean(bytes_down)) if bytes_down else 0.0
    return {
        "status": "completed",
        "method": method,
        "runner": "floor",
        "rounds-completed": history[-1]["round"] if history else 0,
        "rounds-planned": config.num_server_rounds,
        "final": final,
        "history": history,
        "bytes": {"uplink-per-client-round": up, "downlink-per-client-round": down,
                  "total-per-client-round": up + down},
        "dropouts": [],
        "resumed-from": [],
        "privacy": {"enabled": config.privacy.enabled,
                    "ledger": {str(c): privacy[c] for c in sorted(privacy)}},
        "seconds": time.monotonic() - started,
        "public-fingerprint": split.public_fingerprint,
    }


def _record_evaluation(recorder: RunRecorder, round_number: int, scores: list[dict]) -> dict:
    """Record each site's ``evaluate_site`` scores (site c = ``scores[c]``) as the ServerApp
    does, and return the round's ALMA summary."""
    acc, examples = {}, {}
    for c, site_scores in enumerate(scores):
        acc[c], examples[c] = site_scores["accuracy"], site_scores["num-examples"]
        recorder.record("client-eval", round=round_number, client=c, accuracy=acc[c],
                        **{"num-examples": examples[c]})
    return alma_summary(acc, examples)


def run_floor(config: Config) -> Path:
    """Run ``config``'s federation in this process (see module doc); returns the run directory."""
    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_floor(config, started)
    finally:
        torch.set_num_threads(threads)


def _run_floor(config: Config, started: float) -> Path:
    if getattr(getattr(config, "audit", None), "enabled", False):
        raise ValueError("the floor runner does not run privacy audits (audit.enabled); use fedkd simulate")
    wire_format = config.knowledge.wire_format
    split = load_federation(config.data, config.seed)
    check_privacy_plans(config, split)
    recorder = _recorder(config)
    n = config.data.num_clients
    models = [build_site_model(config, split, c) for c in range(n)]
    teachers = [build_site_teacher(config, split, c) for c in range(n)]
    ledgers: list[PrivacyLedger | None] = [
        PrivacyLedger(site_privacy_plan(config, split.clients[c].train, c)) if config.privacy.enabled else None
        for c in range(n)
    ]
    adversaries = config.adversaries
    fused: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    student = None
    history: list[dict] = []
    bytes_up: list[float] = []
    bytes_down: list[float] = []
    privacy: dict[int, dict] = {}
    num_public = len(split.public)
    f, g, t = config.fusion, config.global_student, config.train
    for r in range(1, config.num_server_rounds + 1):
        round_start = time.monotonic()
        release = _release(config, num_public, r)
        accepted: dict[int, np.ndarray] = {}
        for c in range(n):
            sent = len(release) * 8 if len(release) < num_public else 0  # int64 release positions
            fused_in = fused_positions = None
            if c in fused:
                positions, knowledge = fused[c]
                wire = encode(knowledge, wire_format)
                sent += wire.nbytes + (positions.nbytes if len(positions) < num_public else 0)
                fused_in, fused_positions = decode(wire).astype(np.float32), positions
            bytes_down.append(sent)
            ledgers[c] = _ledger_round_trip(ledgers[c], config, split, c)
            result = run_site_round(
                model=models[c], config=config, client=c, round_number=r, data=split.clients[c],
                public_x=split.public.x, release_positions=release, fused=fused_in,
                fused_positions=fused_positions, ledger=ledgers[c], teacher=teachers[c],
            )
            arrays = {"knowledge": result.knowledge}
            if c in adversaries:
                arrays = corrupt(result.knowledge, adversaries[c], np.random.default_rng(c))
            wire_arrays = site_record(arrays, num_classes=split.num_classes, wire_format=wire_format,
                                      top_k=config.shield.top_k)
            try:
                knowledge = validate_knowledge(record_names={"knowledge", "metrics"}, arrays=wire_arrays,
                                               expected_rows=len(release), num_classes=split.num_classes,
                                               wire_format=wire_format, top_k=config.shield.top_k)
            except ValueError as err:
                recorder.record("excluded", round=r, node=c, client=c, reason=f"invalid reply: {err}")
                continue
            bytes_up.append(sum(int(a.nbytes) for a in wire_arrays.values()))
            accepted[c] = knowledge
            rounds_trained = {"rounds-trained": r}
            recorder.record("client-train", round=r, client=c, **rounds_trained, **result.metrics)
            if "epsilon" in result.metrics:
                privacy[c] = _privacy_entry(ledgers[c], result.metrics, privacy.get(c))
        clients = sorted(accepted)
        stacked = np.stack([accepted[c] for c in clients])
        fusion = fuse(
            knowledge=stacked, method=f.method, measure=f.measure, divergence=f.divergence,
            beta=f.beta, threshold=f.threshold, max_neighbours=f.max_neighbours,
            confident_fraction=f.confident_fraction, uniform_entropy=f.uniform_entropy,
            sharpen_temperature=f.sharpen_temperature, era_temperature=f.era_temperature,
        )
        recorder.save_weights(r, clients, fusion.weights)
        if fusion.fused is None:
            targets = stacked.mean(axis=0)
        else:
            for row, c in enumerate(clients):
                fused[c] = (release, fusion.fused[row])
            targets = fusion.fused.mean(axis=0)
        entry: dict = {"round": r, "accepted": clients}
        if g.enabled:
            if student is None:
                student = build_model(g.model, input_shape=split.input_shape,
                                      num_classes=split.num_classes, seed=config.seed,
                                      **split.model_options)
            distil(student, split.public.x[release], targets, epochs=g.epochs,
                   batch_size=t.batch_size, lr=t.lr, temperature=t.kd_temperature, seed=config.seed + r)
            entry["global-accuracy"] = accuracy(student, split.test)
        if r % config.eval_every == 0 or r == config.num_server_rounds:
            entry.update(_record_evaluation(recorder, r, [
                evaluate_site(models[c], split.clients[c], teacher=teachers[c], release=config.teacher.release)
                for c in range(n)
            ]))
        entry["seconds"] = time.monotonic() - round_start
        recorder.record("round", **entry)
        history.append(entry)
    summary = _summary(config, split, config.fusion.method, history, bytes_up, bytes_down, privacy, started)
    recorder.finish(summary)
    return recorder.run_dir


# ------------------------------------------------------------------ FedAvg


def run_fedavg(config: Config) -> Path:
    """FedAvg on ``config``'s split (one architecture, ``model.architectures``; see
    :mod:`fedkd.fedavg`): every round each site starts from the global weights, trains
    ``train.local-epochs`` epochs on its private data (DP-SGD with ``privacy.local-epochs`` and
    ``privacy.lr`` through its ledger when
    ``privacy.enabled``; the same private steps, hence the same epsilon, as a knowledge
    site), and the server averages the weights by private example counts. ALMA: the
    global model on each site's local test split; ``global-accuracy``: the global model on
    the global test set. Bytes: the weights, float32, each way."""
    names = {name.strip() for name in config.model.architectures.split(",")}
    if len(names) != 1:
        raise ValueError(f"FedAvg needs one architecture for every site; model.architectures is "
                         f"'{config.model.architectures}'")
    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_fedavg(config, names.pop(), started)
    finally:
        torch.set_num_threads(threads)


def _run_fedavg(config: Config, architecture: str, started: float) -> Path:
    split = load_federation(config.data, config.seed)
    check_privacy_plans(config, split)
    recorder = _recorder(config)
    n, t = config.data.num_clients, config.train
    global_model = build_model(architecture, input_shape=split.input_shape, num_classes=split.num_classes,
                               seed=config.seed, **split.model_options)
    ledgers = [
        PrivacyLedger(site_privacy_plan(config, split.clients[c].train, c)) if config.privacy.enabled else None
        for c in range(n)
    ]
    size = weight_bytes(global_model)
    history: list[dict] = []
    privacy: dict[int, dict] = {}
    for r in range(1, config.num_server_rounds + 1):
        round_start = time.monotonic()
        global_state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
        states, counts = [], []
        for c in range(n):
            model = build_site_model(config, split, c)
            model.load_state_dict(global_state)
            seed = site_seed(config, c, r)
            metrics: dict[str, float] = {}
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                if ledgers[c] is None:
                    metrics["train-loss"] = train_supervised(model, split.clients[c].train, epochs=t.local_epochs,
                                                             batch_size=t.batch_size, lr=t.lr, seed=seed)
                else:
                    private = train_private_site(model, split.clients[c].train, config=config,
                                                 ledger=ledgers[c], lr=config.privacy.lr, seed=seed)
                    metrics.update(privacy_metrics(ledgers[c]))
                    metrics["train-loss"] = private.loss
                    metrics["dp-stopped"] = float(private.stopped)
                    privacy[c] = _privacy_entry(ledgers[c], metrics, privacy.get(c))
            recorder.record("client-train", round=r, client=c, **metrics)
            states.append({k: v.detach().numpy() for k, v in model.state_dict().items()})
            counts.append(float(len(split.clients[c].train)))
        averaged = average_weights(states, num_examples=counts)
        global_model.load_state_dict({k: torch.from_numpy(v) for k, v in averaged.items()})
        entry: dict = {"round": r, "accepted": list(range(n)), "global-accuracy": accuracy(global_model, split.test)}
        if r % config.eval_every == 0 or r == config.num_server_rounds:
            entry.update(_record_evaluation(recorder, r, [
                evaluate_site(global_model, split.clients[c]) for c in range(n)
            ]))
        entry["seconds"] = time.monotonic() - round_start
        recorder.record("round", **entry)
        history.append(entry)
    summary = _summary(config, split, "fedavg", history, [size] * n, [size] * n, privacy, started)
    summary["model"] = architecture
    recorder.finish(summary)
    return recorder.run_dir
