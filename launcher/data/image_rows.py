"""Image folder rows as a torch Dataset: decoded, augmented and normalised as they are
read (in DataLoader workers when there are any). Separate from images.py, which the
planner imports and which must not import torch."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from launcher.data.augment import ImageAugment, apply_draw, decode, draw, eval_view


class ImageRows(Dataset):
    """Some rows of an image folder as normalised (image, label) pairs, decoded when read.

    A training set (``augment`` given) is read by (epoch, position) keys (see
    ``EpochKeys``): each view's random crop, flip and colour factors are ``draw``n from
    (seed, epoch, position), the same in any worker process and after a resume. An
    evaluation set is read by position and shows the centre view.
    """

    def __init__(self, paths: list[str], labels: np.ndarray, *, size: int, mean: torch.Tensor,
                 std: torch.Tensor, augment: ImageAugment | None = None, seed: int = 0) -> None:
        self.paths = paths
        self.labels = torch.from_numpy(labels)
        self.size = size
        self.mean, self.std = mean.view(3, 1, 1), std.view(3, 1, 1)
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment is None:
            position = key
            view = eval_view(decode(self.paths[position]), self.size)
        else:
            epoch, position = key
            choice = draw(self.augment, self.seed, epoch, position)
            view = apply_draw(decode(self.paths[position]), choice, self.size)
        return (view - self.mean) / self.std, self.labels[position]


def channel_stats(paths: list[str], size: int, limit: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the evaluation views of up to ``limit`` of ``paths``
    (evenly spaced: every class of a sorted folder is in), in float64. Callers pass the
    training rows only: statistics of validation or test images would leak into training."""
    picked = np.linspace(0, len(paths) - 1, num=min(limit, len(paths))).round().astype(int)
    pixels = torch.stack([eval_view(decode(paths[i]), size) for i in picked]).double()
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3), correction=0).clamp(min=1e-6)
    return mean.float(), std.float()
