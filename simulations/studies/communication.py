"""Communication: bytes per site per round, knowledge (each wire format, top-k) vs FedAvg.

    python -m simulations.studies.benchmark communication --out runs/bench/communication

Knowledge: one short federation per wire format / top-k setting through the floor
runner (the same bytes the ServerApp records: ``bytes`` in summary.json, the arrays
of the knowledge record up and of the fused record down; Flower's message framing and
the metrics record are not counted, for either side). Round 1 sends no fused knowledge
down, so the table gives the steady state (round 2 on): down = |P| x C values, and up the
same except with ``shield.top-k = k``, where a site sends its k kept entries and their
classes (fedkd.wire.pack_release).

FedAvg: the weights of the same student, float32, each way, for every image model in
fedkd/models/registry.py (parameters counted by :func:`fedkd.fedavg.parameter_count`) and, when
the text models can be built offline, the text models at the topic corpus's vocabulary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedkd.config import load_config, parse_overrides
from fedkd.data import load_federation
from fedkd.fedavg import parameter_count
from fedkd.models import MODELS, build_model, model_modality
from fedkd.reporting import read_summary


def _knowledge_bytes(args: argparse.Namespace) -> list[dict]:
    from simulations.studies.benchmark import run_point

    rows = []
    base = parse_overrides(args.overrides)
    for wire in ("float16", "uint8"):
        for top_k in (0, 3):
            name = f"{wire}-top{top_k}"
            config = load_config(args.config, overrides={
                **base, "num-server-rounds": 2, "knowledge.wire-format": wire, "shield.top-k": top_k,
                "train.local-epochs": 1, "train.distill-epochs": 1, "global-student.enabled": False,
                "output-dir": str(args.out.resolve()), "run-name": name,
            })
            summary = run_point(config, method=config.fusion.method, runner="floor")
            if summary is None:
                continue
            up = summary["bytes"]["uplink-per-client-round"]
            down_mean = summary["bytes"]["downlink-per-client-round"]  # round 1 sends none
            rows.append({"wire": wire, "top-k": top_k, "up": up, "down": down_mean * 2,
                         "public": None, "classes": None})
    return rows


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides=parse_overrides(args.overrides))
    split = load_federation(config.data, config.seed)
    p, c = len(split.public), split.num_classes
    knowledge = _knowledge_bytes(args)
    models = []
    for name in MODELS.names():
        if model_modality(name) == "text":
            continue
        model = build_model(name, input_shape=split.input_shape, num_classes=c, seed=0)
        models.append({"model": name, "data": config.data.dataset, "parameters": parameter_count(model)})
    text = _text_models()
    lines = [f"Knowledge: public set |P| = {p}, C = {c} ({config.data.dataset}); per site per round, "
             "steady state (round >= 2). Measured by the floor runner (= the ServerApp's count).", "",
             "| wire format | top-k | up (bytes) | down (bytes) | up + down |", "|---|---|---|---|---|"]
    for r in knowledge:
        lines.append(f"| {r['wire']} | {r['top-k'] or 'off'} | {r['up']:,.0f} | {r['down']:,.0f} | "
                     f"{r['up'] + r['down']:,.0f} |")
    smallest = min((r["up"] + r["down"] for r in knowledge), default=float("nan"))
    lines += ["", "FedAvg: the same student's weights, float32, up and down each round.", "",
              "| model | data | parameters | up = down (bytes) | up + down | × knowledge (float16) | × knowledge (uint8) |",
              "|---|---|---|---|---|---|---|"]
    f16 = next((r["up"] + r["down"] for r in knowledge if r["wire"] == "float16" and not r["top-k"]), float("nan"))
    u8 = next((r["up"] + r["down"] for r in knowledge if r["wire"] == "uint8" and not r["top-k"]), float("nan"))
    for m in models + text:
        both = 2 * 4 * m["parameters"]
        if m["data"] == config.data.dataset:
            k16, k8 = f16, u8
        else:  # text: that corpus's knowledge, |P| x C values each way
            k16, k8 = 2 * 2 * m["public"] * m["classes"], 2 * m["public"] * m["classes"]
        lines.append(f"| {m['model']} | {m['data']} | {m['parameters']:,} | {4 * m['parameters']:,} | "
                     f"{both:,} | {both / k16:,.1f} | {both / k8:,.1f} |")
    for m in text[:1]:
        lines += ["", f"Text ({m['data']}): knowledge is |P| = {m['public']:,} x C = {m['classes']} values: "
                  f"{m['public'] * m['classes'] * 2:,} bytes float16 / {m['public'] * m['classes']:,} bytes "
                  "uint8 each way (computed: |P| x C x bytes per value)."]
    lines += ["", "Top-k (shield.top-k = 3): the uplink carries each row's 3 kept values and their "
              "classes (float16: 3 x 2 + 3 bytes a row; uint8: 3 + 1 values summing to 255 + 3 class "
              "bytes); the downlink stays dense |P| x C (fused rows mix many sites' top-k sets)."]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"knowledge": knowledge, "fedavg": models + text, "public": p, "classes": c, "smallest": smallest},
        indent=2))
    return 0


def _text_models() -> list[dict]:
    """Text students at the topic corpus's tokenizer (skipped when it cannot be built offline)."""
    try:
        from fedkd.config import load_config as _load

        text_config = _load(Path("simulations/text.toml")) if Path("simulations/text.toml").is_file() else None
        if text_config is None:
            return []
        split = load_federation(text_config.data, text_config.seed)
        rows = []
        for name in ("bert-tiny", "bert-mini", "minilm"):
            try:
                model = build_model(name, input_shape=split.input_shape, num_classes=split.num_classes,
                                    seed=0, **split.model_options)
            except Exception:  # noqa: BLE001  e.g. the packaged MiniLM is not installed
                continue
            rows.append({"model": name, "data": text_config.data.dataset, "parameters": parameter_count(model),
                         "public": len(split.public), "classes": split.num_classes})
        return rows
    except Exception:  # noqa: BLE001  text extra missing: image models only
        return []
