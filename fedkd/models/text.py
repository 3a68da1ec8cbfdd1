"""Text models: transformers classifiers on the federation's token ids.

``transformers`` is imported lazily, so image runs never pay for it; the tokenizer and
the packaged MiniLM folder are in :mod:`fedkd.data.text`, the registered names
(``minilm``, ``bert-tiny``, ``bert-mini``, ``hf:/path``) in :mod:`fedkd.models.registry`.

* **Models** (:class:`TextClassifier`): a Hugging Face encoder, masked mean pooling over
  tokens, dropout and a linear head. The pretrained teacher (``minilm``, or any local
  model directory as ``hf:/path``) is loaded with ``AutoModel.from_pretrained`` from a
  local path (:func:`pretrained_classifier`); students (``bert-tiny``, ``bert-mini``) are
  built from a ``BertConfig`` on the same vocabulary, with no download
  (:func:`bert_classifier`). Models are read from local folders only
  (``local_files_only=True``): nothing is fetched at run time.

DP-SGD on these models (Opacus): the forward pass builds ``position_ids`` [B, L]
(contiguous) and ``token_type_ids`` [B, L] explicitly, since the encoders' own
broadcast [1, L] buffers break per-example gradients of the embedding layers; Opacus's
ghost clipping (``privacy.grad-sample-mode``) avoids per-example gradient tensors, and
:func:`frozen_embeddings` keeps the (large, vocabulary-sized) embedding tables out of the
DP step (``privacy.freeze-embeddings``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from fedkd.data.text import _local_dir


class TextClassifier(nn.Module):
    """Sequence classifier: encoder -> masked mean pooling -> dropout -> linear head.

    Input: token ids ``int64 [B, L]`` (padded with ``pad_id``); output: logits ``[B, C]``.
    With m = (ids != pad_id), the sentence vector is sum_t m_t h_t / max(1, sum_t m_t)
    over the encoder's last hidden states h_t (the pooling all-MiniLM-L6-v2 was trained
    with). The forward pass trims the batch to its longest non-pad length (padding only
    costs time) and passes ``attention_mask``, ``position_ids`` [B, L] (contiguous) and
    ``token_type_ids`` [B, L] explicitly, which Opacus needs for per-example gradients.
    """

    def __init__(self, encoder: nn.Module, *, num_classes: int, pad_id: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_id = int(pad_id)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad_id
        if ids.shape[0] > 0:
            length = max(int(mask.sum(dim=1).max()), 1)
            ids, mask = ids[:, :length].contiguous(), mask[:, :length]  # Opacus views ids
        batch, length = ids.shape
        position_ids = torch.arange(length, device=ids.device).unsqueeze(0).expand(batch, length).contiguous()
        hidden = self.encoder(
            input_ids=ids,
            attention_mask=mask.long(),
            position_ids=position_ids,
            token_type_ids=torch.zeros_like(ids),
        ).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters of the encoder's embedding layers (word, position, token type, norm)."""
        embeddings = getattr(self.encoder, "embeddings", None)
        module = embeddings if isinstance(embeddings, nn.Module) else self.encoder.get_input_embeddings()
        return list(module.parameters())


@contextlib.contextmanager
def frozen_embeddings(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block the embedding parameters of a :class:`TextClassifier` do not train
    (``requires_grad = False``); restored afterwards. No-op for other models.

    Under DP-SGD this removes the vocabulary-sized tables (about half of MiniLM's weights)
    from per-example clipping and from the noise dimension; they keep training in the
    public (free) distillation steps.
    """
    if not enabled or not isinstance(model, TextClassifier):
        yield model
        return
    params = [p for p in model.embedding_parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def _check_vocab(encoder: nn.Module, vocab_size: int | None, where: str) -> None:
    size = encoder.get_input_embeddings().num_embeddings
    if vocab_size is not None and size < vocab_size:
        raise ValueError(
            f"model {where} has {size} token embeddings but the federation's tokenizer has "
            f"{vocab_size} tokens; use the model's own tokenizer (data.tokenizer = its folder)"
        )


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Sites reload their pretrained teacher every round: no progress bar or load report
    (the unused pooler weights) each time; transformers' settings are restored after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def pretrained_classifier(
    path: str | Path, *, input_shape: tuple[int, ...], num_classes: int,
    vocab_size: int | None = None, pad_id: int = 0,
) -> TextClassifier:
    """A pretrained encoder from a local Hugging Face folder + a fresh linear head."""
    from transformers import AutoModel

    folder = _local_dir(path, "model folder")
    with _quiet_loading():
        try:  # BERT-like encoders carry a pooler fedkd does not use (and Opacus would refuse)
            encoder = AutoModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
        except TypeError:
            encoder = AutoModel.from_pretrained(folder, local_files_only=True)
    _check_vocab(encoder, vocab_size, f"'{folder}'")
    max_positions = getattr(encoder.config, "max_position_embeddings", None)
    if max_positions is not None and input_shape[0] > max_positions:
        raise ValueError(
            f"data.max-length {input_shape[0]} exceeds the {max_positions} positions of '{folder}'"
        )
    model = TextClassifier(encoder, num_classes=num_classes, pad_id=pad_id)
    model.train()  # from_pretrained returns eval mode; fedkd switches modes itself
    return model


def bert_classifier(
    *, input_shape: tuple[int, ...], num_classes: int, vocab_size: int | None, pad_id: int,
    hidden: int, layers: int, heads: int,
) -> TextClassifier:
    """A BERT encoder built from a ``BertConfig`` (random weights, no download)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size or 30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max(int(input_shape[0]), 8),
        pad_token_id=pad_id,
    )
    return TextClassifier(BertModel(config, add_pooling_layer=False), num_classes=num_classes, pad_id=pad_id)
