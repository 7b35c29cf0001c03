"""Image rows as a torch Dataset: decoded, augmented and normalised as they are read (in
DataLoader workers when there are any). A row's image is a file of an image folder or
the encoded file itself, from a Parquet column. Separate from images.py, which the
planner imports and which must not import torch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from launcher.data.augment import ImageAugment, apply_draw, decode, draw, eval_view


class ImageRows(Dataset):
    """Image rows as normalised (image, label) pairs, decoded when read.

    A training set (``augment`` given) is read by (epoch, position) keys (see
    ``EpochKeys``): each view's random crop, flip and colour factors are ``draw``n from
    (seed, epoch, position), the same in any worker process and after a resume. An
    evaluation set is read by position and shows the centre view.
    """

    def __init__(self, files: Sequence[str] | Sequence[bytes], labels: np.ndarray, *, size: int,
                 mean: torch.Tensor, std: torch.Tensor, augment: ImageAugment | None = None,
                 seed: int = 0) -> None:
        self.files = files
        """Each row's image: a path, or the encoded JPEG/PNG file."""
        self.labels = torch.from_numpy(labels)
        self.size = size
        self.mean, self.std = mean.view(3, 1, 1), std.view(3, 1, 1)
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def encoded(self, position: int) -> np.ndarray:
        """A row's encoded image as uint8, as DALI's decoders take it."""
        file = self.files[position]
        return np.fromfile(file, dtype=np.uint8) if isinstance(file, str) else np.frombuffer(file, dtype=np.uint8)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment is None:
            position = key
            view = eval_view(decode(self.files[position]), self.size)
        else:
            epoch, position = key
            choice = draw(self.augment, self.seed, epoch, position)
            view = apply_draw(decode(self.files[position]), choice, self.size)
        return (view - self.mean) / self.std, self.labels[position]


def channel_stats(files: Sequence[str] | Sequence[bytes], size: int,
                  limit: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the evaluation views of up to ``limit`` of ``files``
    (evenly spaced: every class of a sorted folder is in), in float64. Callers pass the
    training rows only: statistics of validation or test images would leak into training."""
    picked = np.linspace(0, len(files) - 1, num=min(limit, len(files))).round().astype(int)
    pixels = torch.stack([eval_view(decode(files[i]), size) for i in picked]).double()
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3), correction=0).clamp(min=1e-6)
    return mean.float(), std.float()
