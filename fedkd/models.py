"""Model registry: every site may run its own architecture.

Models map inputs of shape ``[B, *input_shape]`` to logits ``[B, num_classes]``.
They use GroupNorm rather than BatchNorm so that Opacus can compute per-example
gradients for them (BatchNorm mixes examples within a batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fedkd.registry import Registry

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


def build_model(
    name: str, *, input_shape: tuple[int, ...], num_classes: int, seed: int | None = None
) -> nn.Module:
    """Instantiate model ``name``; with ``seed``, its initial weights are reproducible."""
    factory = MODELS.get(name)
    if seed is None:
        return factory(input_shape=tuple(input_shape), num_classes=num_classes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory(input_shape=tuple(input_shape), num_classes=num_classes)


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
