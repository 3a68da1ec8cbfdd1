"""fedkd ClientApp: a Message in, the site's round (:mod:`fedkd.federation.site`), a Message out.

The site's state (:class:`~fedkd.federation.site.SiteState`: model, teacher, privacy
ledger, rounds trained) lives in ``context.state`` between rounds; with a state directory
the ``persist_site_state`` mod also keeps it on the site's disk, so it survives a SuperNode
restart and a resumed run (clients/site_state.py). Under the deployment engine each
SuperNode's node config says which partition it holds, where its data is and which model
it runs (:data:`fedkd.ops.node.NODE_CONFIG_KEYS`).

Identities: when the server's message carries a challenge (record ``identity``) and the
node config names this site's ``identity-key``, every reply (train, evaluate, query) gets
a record ``identity`` holding its signature (:func:`fedkd.identity.sign_reply` over the
reply's metrics and arrays as the server will decode them).
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkd.config import Config, build_config
from fedkd.data import FederatedSplit
from fedkd.federation.site import NoiseSource, SiteInbox, SiteState, site_evaluation, site_round
from fedkd.identity import load_private_key, sign_reply
from fedkd.ops.node import load_site_split, site_noise_seed, site_settings
from fedkd.seeds import new_site_secret

from clients.site_state import persist_site_state, state_store

app = ClientApp(mods=[persist_site_state])


def _site(context: Context) -> tuple[Config, FederatedSplit, int]:
    config = build_config(context.run_config)
    settings = site_settings(context.node_config, num_clients=config.data.num_clients)
    torch.set_num_threads(1)
    return config, load_site_split(config, settings), settings.partition_id


def site_noise(context: Context, config: Config) -> NoiseSource:
    """Where this site's private randomness comes from (:func:`fedkd.ops.node.site_noise_seed`:
    site-secret when deployed, run-seed when simulated, unless configured). The secret of
    ``site-secret`` is the site's own: kept in its state directory (mode 0600,
    :meth:`fedkd.checkpoint.SiteStateStore.noise_secret`), or drawn afresh for this message
    when the site keeps no state on disk. It never leaves the site."""
    settings = site_settings(context.node_config, num_clients=config.data.num_clients)
    kind = site_noise_seed(config, context.node_config, settings)
    if kind != "site-secret":
        return NoiseSource(kind)
    store = state_store(context)
    return NoiseSource(kind, store.noise_secret() if store is not None else new_site_secret())


MODEL_RECORDS = ("teacher", "student", "average")
"""The site's optional models, each kept as an array record of its torch state dict: a teacher
site's teacher, a DP site's public-set student (``privacy.student``) and the average of its DP
model's iterates (``privacy.ema-decay``)."""


def load_state(context: Context, config: Config, split: FederatedSplit, client: int,
               noise: NoiseSource | None = None) -> SiteState:
    """The site's :class:`SiteState` from ``context.state`` (fresh before its first round),
    with noise source ``noise`` (default: the run's seeds; evaluation draws no noise)."""
    state = SiteState.fresh(config=config, split=split, client=client, noise=noise,
                            architecture=str(context.node_config.get("model", "")))  # a site's own model
    records = context.state
    if "model" in records:
        saved = {"model": records["model"].to_torch_state_dict(),
                 "rounds-trained": int(records["site"]["rounds-trained"]) if "site" in records else 0}
        for name in MODEL_RECORDS:
            if name in records:
                saved[name] = records[name].to_torch_state_dict()
        if "privacy" in records:
            saved["privacy"] = str(records["privacy"]["ledger"])
        if "site" in records and "target-scores" in records["site"]:
            saved["target-scores"] = str(records["site"]["target-scores"])
        state.load_state_dict(saved)
    return state


def save_state(context: Context, state: SiteState) -> None:
    """``state`` into ``context.state`` as records (``model``, ``teacher``, ``student``, ``average``, ``privacy``, ``site``)."""
    saved = state.state_dict()
    for name in ("model", *MODEL_RECORDS):
        if name in saved:
            context.state[name] = ArrayRecord(saved[name])
    if "privacy" in saved:  # the run's one accountant history, kept across rounds
        context.state["privacy"] = ConfigRecord({"ledger": saved["privacy"]})
    site = {"rounds-trained": saved["rounds-trained"]}
    if "target-scores" in saved:  # a validated site's pooled scores (fedkd/targets.py)
        site["target-scores"] = saved["target-scores"]
    context.state["site"] = ConfigRecord(site)


def inbox_from_message(msg: Message) -> SiteInbox:
    """The train message's records (see ``server/server_app.py``) as a :class:`SiteInbox`."""
    round_config = msg.content["config"]
    plan = msg.content.array_records.get("plan")
    fused = msg.content.array_records.get("fused")
    privacy = msg.content.array_records.get("privacy")
    return SiteInbox(
        round_number=int(round_config["round"]),
        public_fingerprint=str(round_config["public-fingerprint"]),
        config_digest=str(round_config["config-digest"]),
        release_positions=plan["release-positions"].numpy() if plan else None,
        fused=fused["knowledge"].numpy() if fused else None,
        fused_positions=fused["positions"].numpy() if fused and "positions" in fused else None,
        consensus=fused["consensus"].numpy() if fused and "consensus" in fused else None,
        privacy_history=privacy["history"].numpy() if privacy else None,
        dp_stop=bool(round_config.get("dp-stop", False)),
    )


def signed_reply(msg: Message, context: Context, content: RecordDict, *, num_clients: int) -> Message:
    """``content`` as the reply to ``msg``, signed when the server sent a challenge and this
    site has an ``identity-key`` (unsigned otherwise: a server with identities on refuses it)."""
    identity = msg.content.config_records.get("identity")
    settings = site_settings(context.node_config, num_clients=num_clients)
    if identity is not None and settings.identity_key:
        metrics = dict(content["metrics"]) if "metrics" in content.metric_records else None
        arrays = ({name: a.numpy() for name, a in content["knowledge"].items()}
                  if "knowledge" in content.array_records else None)
        signature = sign_reply(load_private_key(settings.identity_key), run_id=context.run_id,
                               kind=msg.metadata.message_type, round_number=int(msg.content["config"]["round"]),
                               partition_id=settings.partition_id, challenge=identity["challenge"],
                               metrics=metrics, arrays=arrays)
        content["identity"] = ConfigRecord({"signature": signature})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, split, client = _site(context)
    state = load_state(context, config, split, client, noise=site_noise(context, config))
    reply = site_round(config=config, split=split, client=client, inbox=inbox_from_message(msg), state=state)
    save_state(context, state)
    knowledge = ArrayRecord({name: Array(a) for name, a in reply.arrays.items()})
    return signed_reply(msg, context, RecordDict({"knowledge": knowledge, "metrics": MetricRecord(reply.metrics)}),
                        num_clients=config.data.num_clients)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, split, client = _site(context)
    state = load_state(context, config, split, client)
    metrics = site_evaluation(config=config, split=split, client=client, state=state)
    return signed_reply(msg, context, RecordDict({"metrics": MetricRecord(metrics)}),
                        num_clients=config.data.num_clients)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which partition this SuperNode holds: the server asks nodes it does not know yet
    (a resumed run, a site that rejoined under a new node id) before sending fused knowledge."""
    config = build_config(context.run_config)
    settings = site_settings(context.node_config, num_clients=config.data.num_clients)
    return signed_reply(msg, context, RecordDict({"metrics": MetricRecord({"partition-id": settings.partition_id})}),
                        num_clients=config.data.num_clients)
