"""A multilayer perceptron over flattened features."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Linear → GELU → Dropout per hidden layer, then a linear head.

    The input is flattened first, so image-shaped rows (digits' (1, 8, 8)) work as is.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 hidden: Sequence[int] = (256, 256), dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
