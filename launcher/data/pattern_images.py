"""A small image-classification folder generated on the spot, for tests, benchmarks and
trying the image loaders without a download: three classes of stripe patterns
(horizontal, vertical, checkerboard) in random colours, periods, phases and sizes, with
pixel noise; JPEG and PNG files alternate. A small CNN learns it in a few dozen steps,
and flips and crops keep each class's pattern.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("checker", "horizontal", "vertical")


def write_pattern_images(root: str | Path, per_class: int, *, seed: int = 0,
                         sizes: tuple[int, int] = (36, 48), suffixes: tuple[str, ...] = (".jpg", ".png")) -> Path:
    """``per_class`` images of each class under root/<class>/, each side drawn from
    ``sizes``, the formats taking turns as ``suffixes`` lists them; returns root."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = rng.integers(sizes[0], sizes[1] + 1, size=2)
            image = Image.fromarray(_pattern(name, int(height), int(width), rng))
            suffix = suffixes[i % len(suffixes)]
            image.save(root / name / f"{i:05d}{suffix}", **({"quality": 90} if suffix == ".jpg" else {}))
    return root


def _pattern(name: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    period = int(rng.integers(3, 7))
    ys, xs = np.mgrid[:height, :width] + rng.integers(0, period, size=2)[:, None, None]
    stripes = {"horizontal": ys // period, "vertical": xs // period,
               "checker": ys // period + xs // period}[name] % 2
    colours = rng.integers(0, 256, size=(2, 3))
    pixels = colours[stripes] + rng.normal(0, 12, size=(height, width, 3))
    return pixels.clip(0, 255).astype(np.uint8)
