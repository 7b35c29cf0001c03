"""A small ResNet (He et al., 2016) for little images such as digits' 8x8."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_norm(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: no running statistics, so nothing depends on the
    # per-rank batch size, and no fp32 buffers beside bf16 weights (DeepSpeed casts
    # parameters, not buffers, and CPU batch_norm refuses the mix). No conv bias: the
    # norm that follows has its own shift.
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
                         nn.GroupNorm(min(8, c_out), c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut; a 1x1 projection where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_norm(c_in, c_out, 3, stride)
        self.conv2 = _conv_norm(c_out, c_out, 3, 1)
        # Each block starts as the identity (Goyal et al., 2017): zero-initialised last norm
        # scale, which makes the early steps of training stable at higher learning rates.
        nn.init.zeros_(self.conv2[1].weight)
        changes_shape = stride != 1 or c_in != c_out
        self.shortcut = _conv_norm(c_in, c_out, 1, stride) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


class CNN(nn.Module):
    """Stem conv, stages of residual blocks (stride 2 between stages), global average
    pool, linear head."""

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 channels: Sequence[int] = (32, 64), blocks_per_stage: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs image-shaped inputs (C, H, W), got {list(input_shape)}")
        if not channels or blocks_per_stage < 1:
            raise ValueError("cnn needs at least one stage (channels) of at least one block")
        # No stride or pooling in the stem: an 8x8 image has no resolution to spare.
        self.stem = nn.Sequential(_conv_norm(input_shape[0], channels[0], 3, 1), nn.ReLU())
        blocks: list[nn.Module] = []
        width = channels[0]
        for stage, out in enumerate(channels):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(width, out, stride))
                width = out
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = x.mean(dim=(2, 3))  # global average pool
        return self.head(self.dropout(x))
