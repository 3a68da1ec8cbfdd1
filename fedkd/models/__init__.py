"""Models: every site may run its own architecture.

* :mod:`fedkd.models.registry`: the registry :data:`MODELS` of architectures by name,
  :func:`build_model`, the models of float inputs (``mlp-small``, ``mlp-large``,
  ``cnn-small``) and the names of the text models (``minilm``, ``bert-tiny``,
  ``bert-mini``, ``hf:/path``), re-exported here (``from fedkd.models import
  build_model, MODELS``);
* :mod:`fedkd.models.text`: the transformers classifiers that read token ids
  (:class:`~fedkd.models.text.TextClassifier`,
  :func:`~fedkd.models.text.pretrained_classifier`,
  :func:`~fedkd.models.text.bert_classifier`,
  :func:`~fedkd.models.text.frozen_embeddings`; import them from there).
"""

from __future__ import annotations

from fedkd.models.registry import (
    HF_PREFIX,
    MODELS,
    ModelFactory,
    SmallCNN,
    bert_mini,
    bert_tiny,
    build_model,
    is_model_name,
    minilm,
    mlp_large,
    mlp_small,
    model_factory,
    model_modality,
)

__all__ = [
    "HF_PREFIX",
    "MODELS",
    "ModelFactory",
    "SmallCNN",
    "bert_mini",
    "bert_tiny",
    "build_model",
    "is_model_name",
    "minilm",
    "mlp_large",
    "mlp_small",
    "model_factory",
    "model_modality",
]
