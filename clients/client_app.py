"""fedkd ClientApp: unpack the server's message, run the site's round, pack the reply.

The site's model lives in ``context.state`` between rounds (persistent client state),
so each round continues from the last one instead of starting from a fresh model; with a
state directory the ``persist_site_state`` mod also keeps it on the site's disk, so it
survives a SuperNode restart and a resumed run (clients/site_state.py).

Under the deployment engine each SuperNode's node config says which partition it holds,
where its data is and which model it runs (fedkd.site.NODE_CONFIG_KEYS).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkd.adversary import corrupt
from fedkd.config import Config, build_config
from fedkd.data import ArrayDataset, FederatedSplit
from fedkd.knowledge import decode, site_record
from fedkd.privacy import PrivacyLedger
from fedkd.site import (
    build_site_model,
    build_site_teacher,
    evaluate_site,
    load_site_split,
    run_site_round,
    site_privacy_plan,
    site_settings,
)

from clients.site_state import persist_site_state

app = ClientApp(mods=[persist_site_state])


def _site(context: Context) -> tuple[Config, FederatedSplit, int]:
    config = build_config(context.run_config)
    settings = site_settings(context.node_config, num_clients=config.data.num_clients)
    torch.set_num_threads(1)
    return config, load_site_split(config, settings), settings.partition_id


def _load_model(context: Context, config: Config, split: FederatedSplit, client: int) -> torch.nn.Module:
    architecture = str(context.node_config.get("model", ""))  # a site may run its own model
    model = build_site_model(config, split, client, architecture=architecture)
    if "model" in context.state:
        model.load_state_dict(context.state["model"].to_torch_state_dict())
    return model


def _load_teacher(context: Context, config: Config, split: FederatedSplit, client: int) -> torch.nn.Module | None:
    teacher = build_site_teacher(config, split, client)  # None: a site without a teacher
    if teacher is not None and "teacher" in context.state:
        teacher.load_state_dict(context.state["teacher"].to_torch_state_dict())
    return teacher


def _load_ledger(context: Context, config: Config, train: ArrayDataset, client: int) -> PrivacyLedger | None:
    if not config.privacy.enabled:
        return None
    ledger = PrivacyLedger(site_privacy_plan(config, train, client))
    if "privacy" in context.state:
        ledger.load_state_dict(json.loads(str(context.state["privacy"]["ledger"])))
    return ledger


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, split, client = _site(context)
    round_config = msg.content["config"]
    if round_config["config-digest"] != config.digest():
        raise ValueError(
            f"site {client} refuses round {round_config['round']}: its run config differs "
            "from the server's (config digest mismatch)"
        )
    if round_config["public-fingerprint"] != split.public_fingerprint:
        raise ValueError(
            f"site {client} refuses round {round_config['round']}: its public transfer set "
            f"(fingerprint {split.public_fingerprint[:12]}) differs from the server's "
            f"({str(round_config['public-fingerprint'])[:12]}); check data.* settings"
        )
    everything = np.arange(len(split.public))  # absent positions mean the whole public set
    plan = msg.content.array_records.get("plan")
    release = plan["release-positions"].numpy() if plan else everything
    fused = fused_positions = None
    if "fused" in msg.content:
        record = msg.content["fused"]
        fused = decode(record["knowledge"].numpy()).astype(np.float32)
        fused_positions = record["positions"].numpy() if "positions" in record else everything

    model = _load_model(context, config, split, client)
    teacher = _load_teacher(context, config, split, client)
    ledger = _load_ledger(context, config, split.clients[client].train, client)
    result = run_site_round(
        model=model,
        config=config,
        client=client,
        round_number=int(round_config["round"]),
        data=split.clients[client],
        public_x=split.public.x,
        release_positions=release,
        fused=fused,
        fused_positions=fused_positions,
        ledger=ledger,
        teacher=teacher,
    )
    context.state["model"] = ArrayRecord(model.state_dict())
    if teacher is not None:
        context.state["teacher"] = ArrayRecord(teacher.state_dict())
    if ledger is not None:  # the run's one accountant history, kept across rounds
        context.state["privacy"] = ConfigRecord({"ledger": ledger.to_json()})
    rounds_trained = int(context.state["site"]["rounds-trained"]) + 1 if "site" in context.state else 1
    context.state["site"] = ConfigRecord({"rounds-trained": rounds_trained})

    arrays = {"knowledge": result.knowledge}
    if client in config.adversaries:
        arrays = corrupt(result.knowledge, config.adversaries[client], np.random.default_rng(client))
    wire = site_record(arrays, num_classes=split.num_classes, wire_format=config.knowledge.wire_format,
                       top_k=config.shield.top_k)
    knowledge = ArrayRecord({name: Array(a) for name, a in wire.items()})
    metrics = MetricRecord(
        {"partition-id": client, "rounds-trained": rounds_trained, **result.metrics}
    )
    return Message(RecordDict({"knowledge": knowledge, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, split, client = _site(context)
    model = _load_model(context, config, split, client)
    teacher = _load_teacher(context, config, split, client)
    scores = evaluate_site(model, split.clients[client], teacher=teacher, release=config.teacher.release)
    metrics = MetricRecord({"partition-id": client, **scores})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which partition this SuperNode holds: the server asks nodes it does not know yet
    (a resumed run, a site that rejoined under a new node id) before sending fused knowledge."""
    config = build_config(context.run_config)
    settings = site_settings(context.node_config, num_clients=config.data.num_clients)
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": settings.partition_id})}),
                   reply_to=msg)
