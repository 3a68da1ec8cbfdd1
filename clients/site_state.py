"""A ClientApp mod that keeps each site's persistent state on the site's own disk.

Flower keeps ``context.state`` in the SuperNode's memory, per run: it is lost when the
SuperNode restarts (a site that crashed and rejoins) and it starts empty in a new run
(a stopped run resumed from its checkpoint is a new Flower run). With a state directory
(node config ``state-dir``, else run config ``checkpoint.site-state-dir``) this mod

* before a ``train`` message for round r, makes ``context.state`` the site's state after
  its latest round before r (from memory when it is that one, else from disk, else empty:
  a fresh model), so a round retried or resumed starts from where it started the first
  time; a state file that cannot be read is passed over for the one kept before it;
* before an ``evaluate`` message for round r, the latest state up to r;
* after a successful ``train`` reply, saves ``context.state`` (model, privacy ledger,
  counters: every record the handlers keep there) as ``round-NNNN.npz``
  (:class:`fedkd.checkpoint.SiteStateStore`, keyed by run-name and partition id).

Without a state directory, ``context.state`` is used as Flower keeps it. The handlers
themselves do not change.
"""

from __future__ import annotations

import base64
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from fedkd.checkpoint import SiteStateStore
from fedkd.config import build_config
from fedkd.ops.node import site_settings

ROUND_RECORD = "site-state"  # context.state record: the round the state corresponds to


def state_store(context: Context) -> SiteStateStore | None:
    """The site's store for this run, or None when no state directory is configured."""
    config = build_config(context.run_config)
    settings = site_settings(context.node_config, num_clients=config.data.num_clients)
    directory = settings.state_dir or config.checkpoint.site_state_dir
    if not directory:
        return None
    if not config.run_name:
        log(WARNING, "fedkd: run-name is empty, so site %d keeps its state in memory only "
            "(state-dir needs a run-name to key it by)", settings.partition_id)
        return None
    return SiteStateStore(directory, run_key=config.run_name, client=settings.partition_id)


def held_round(state: RecordDict) -> int:
    return int(state[ROUND_RECORD]["round"]) if ROUND_RECORD in state.config_records else 0


# ------------------------------------------------------------- RecordDict <-> files


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"__bytes__"}:
        return base64.b64decode(value["__bytes__"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def state_to_arrays(state: RecordDict) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every record of ``state`` as named arrays plus a JSON description."""
    arrays: dict[str, np.ndarray] = {}
    records: list[dict[str, Any]] = []
    for name, record in state.items():
        if isinstance(record, ArrayRecord):
            keys = list(record.keys())
            for i, key in enumerate(keys):
                arrays[f"{len(records)}/{i}"] = record[key].numpy()
            records.append({"name": name, "type": "array", "keys": keys})
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            kind = "config" if isinstance(record, ConfigRecord) else "metric"
            records.append({"name": name, "type": kind,
                            "values": {k: _encode(v) for k, v in record.items()}})
        else:  # pragma: no cover - Flower has no other record type today
            raise TypeError(f"cannot save context.state record {name!r} of type {type(record).__name__}")
    return arrays, {"records": records}


def arrays_to_state(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
    """The records saved by :func:`state_to_arrays`, by name."""
    out: dict[str, Any] = {}
    for index, entry in enumerate(meta["records"]):
        if entry["type"] == "array":
            out[entry["name"]] = ArrayRecord(
                {key: Array(arrays[f"{index}/{i}"]) for i, key in enumerate(entry["keys"])}
            )
        else:
            cls = ConfigRecord if entry["type"] == "config" else MetricRecord
            out[entry["name"]] = cls({k: _decode(v) for k, v in entry["values"].items()})
    return out


def _replace_state(state: RecordDict, records: dict[str, Any]) -> None:
    for name in list(state.keys()):
        del state[name]
    for name, record in records.items():
        state[name] = record


# ------------------------------------------------------------- the mod


def persist_site_state(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001
    """Flower mod (``ClientApp(mods=[persist_site_state])``); see the module doc."""
    kind = msg.metadata.message_type.split(".")[0]
    if kind not in ("train", "evaluate") or "config" not in msg.content.config_records:
        return call_next(msg, context)
    round_number = int(msg.content["config"]["round"])
    store = state_store(context)
    if store is not None:
        upto = round_number - 1 if kind == "train" else round_number
        found = store.load_latest(before=upto + 1)  # an unreadable file falls back to the one before
        held = held_round(context.state)
        if found is None and held > upto:
            _replace_state(context.state, {})  # a retried first round starts afresh
        elif found is not None and found[0] != held:
            _, arrays, meta = found
            _replace_state(context.state, arrays_to_state(arrays, meta))
    reply = call_next(msg, context)
    if kind == "train" and not reply.has_error():
        context.state[ROUND_RECORD] = ConfigRecord({"round": round_number})
        if store is not None:
            arrays, meta = state_to_arrays(context.state)
            store.save(round_number, arrays=arrays, meta=meta)
    return reply
