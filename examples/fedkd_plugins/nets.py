"""A model plugin: any callable ``(*, input_shape, num_classes) -> nn.Module``."""

from __future__ import annotations

import math

from torch import nn


class TinyNet(nn.Sequential):
    """Flatten, one hidden layer of 16 units with a tanh, a linear head."""

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int) -> None:
        width = math.prod(input_shape)
        super().__init__(nn.Flatten(), nn.Linear(width, 16), nn.Tanh(), nn.Linear(16, num_classes))
