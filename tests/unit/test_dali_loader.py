"""The DALI loaders on real pipelines (DALI's CPU operators) over real JPEG and PNG files:
the sampler's rows in the sampler's order, exact resumes, clean epochs, ``draw``'s
augmentations, and evaluation shards that cover every row once with the same number of
batches on every rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launcher.data.augment import ImageAugment, draw
from launcher.data.dali_loader import DaliTrainLoader, dali_eval_batches
from launcher.data.images import ImageFolder, scan_image_folder
from launcher.data.sampler import ResumableDistributedSampler

SIZE = 8
MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)
PLAIN = ImageAugment(size=SIZE, random_crop=False, flip=False, color_jitter=0.0)
FULL = ImageAugment(size=SIZE, random_crop=True, flip=True, color_jitter=0.4)
CLOSE = 3
"""Pixel levels (of 255) within which DALI's decode and resize agree with PIL's."""


def _write_folder(root: Path, per_class: list[int], sizes: tuple[tuple[int, int], ...]) -> ImageFolder:
    """Class folders of small JPEGs and PNGs (of ``sizes``, in turn) whose red level names
    their row (10 + 6 * row), with a horizontal green ramp (so a flip shows) and a vertical
    blue one."""
    row = 0
    for label, count in enumerate(per_class):
        (root / f"class{label}").mkdir(parents=True)
        for i in range(count):
            width, height = sizes[row % len(sizes)]
            pixels = np.empty((height, width, 3), dtype=np.uint8)
            pixels[..., 0] = 10 + 6 * row
            pixels[..., 1] = np.linspace(0, 200, width, dtype=np.uint8)[None, :]
            pixels[..., 2] = (40 + 80 * label + 3 * np.arange(height, dtype=np.uint8))[:, None]
            image = Image.fromarray(pixels)
            if row % 2:
                image.save(root / f"class{label}" / f"{i:02d}.png")
            else:
                image.save(root / f"class{label}" / f"{i:02d}.jpg", quality=95, subsampling=0)
            row += 1
    folder = scan_image_folder(str(root))
    assert len(folder.files) == row  # rows are in the order written
    return folder


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory) -> ImageFolder:
    return _write_folder(tmp_path_factory.mktemp("train"), [12, 12, 12], sizes=((20, 16),))


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory) -> ImageFolder:
    return _write_folder(tmp_path_factory.mktemp("val"), [11, 10, 10], sizes=((28, 16), (16, 28), (28, 16)))


def _sampler(folder: ImageFolder, rank: int = 0, world_size: int = 1) -> ResumableDistributedSampler:
    return ResumableDistributedSampler(len(folder.files), rank=rank, world_size=world_size,
                                       micro_batch=4, batches_per_step=2, seed=3)


def _loader(folder: ImageFolder, aug: ImageAugment = PLAIN, *, seed: int = 5, rank: int = 0,
            world_size: int = 1, num_threads: int = 2) -> DaliTrainLoader:
    paths = folder.paths()
    return DaliTrainLoader(lambda row: np.fromfile(paths[row], dtype=np.uint8), folder.labels,
                           _sampler(folder, rank, world_size), aug, seed=seed, mean=MEAN, std=STD,
                           num_threads=num_threads, prefetch_queue_depth=2, device_id=None)


def _epoch(loader: DaliTrainLoader, epoch: int, start_batch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch, start_batch)
    return list(loader)


def _pixels(inputs: torch.Tensor) -> np.ndarray:
    """Normalised CHW inputs back to HWC pixel levels (0..255, float)."""
    mean = torch.tensor(MEAN).view(-1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(-1, 3, 1, 1) * 255
    return (inputs * std + mean).permute(0, 2, 3, 1).numpy()


def _rows_shown(inputs: torch.Tensor) -> list[int]:
    """The rows whose images these are, read from their red level."""
    return [round((red - 10) / 6) for red in _pixels(inputs)[..., 0].mean(axis=(1, 2))]


def _resized(path: str, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """PIL's reference: the image (or its whole-pixel ``box``) resized to SIZE x SIZE."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if box is not None:
            image = image.crop(box)
        return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float64)


def _twisted(pixels: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """DALI's colour twist on uint8 pixels: saturation scales YIQ chroma, contrast scales
    around level 128, brightness scales the whole (dali/operators/image/color/color_twist.h)."""
    rgb_to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
    chroma = np.linalg.inv(rgb_to_yiq) @ np.diag([1.0, saturation, saturation]) @ rgb_to_yiq
    twisted = brightness * contrast * pixels @ chroma.T + (128 - 128 * contrast) * brightness
    return np.clip(np.round(twisted), 0, 255)


@pytest.mark.parametrize("world_size", [1, 2])
def test_an_epoch_yields_the_samplers_rows_in_the_samplers_order(train_folder, world_size):
    seen: list[int] = []
    for rank in range(world_size):
        loader = _loader(train_folder, rank=rank, world_size=world_size)
        batches = _epoch(loader, 2)
        expected = list(loader.sampler)  # the sampler is still set to epoch 2
        assert len(batches) == len(expected) == len(loader) == loader.sampler.batches_per_epoch
        for (inputs, targets), rows in zip(batches, expected, strict=True):
            assert inputs.shape == (4, 3, SIZE, SIZE) and inputs.dtype == torch.float32
            assert targets.dtype == torch.int64
            assert targets.tolist() == train_folder.labels[rows].tolist()
            assert _rows_shown(inputs) == rows
            seen += rows
    kept = loader.sampler.batches_per_epoch * world_size * 4
    assert len(seen) == len(set(seen)) == kept


def test_a_resumed_epoch_yields_the_tail_of_the_uninterrupted_one(train_folder):
    loader = _loader(train_folder, FULL)
    whole = _epoch(loader, 1)
    tail = _epoch(loader, 1, start_batch=3)
    assert len(tail) == len(whole) - 3 == len(loader)
    for (inputs, targets), (want_inputs, want_targets) in zip(tail, whole[3:], strict=True):
        assert torch.equal(inputs, want_inputs) and torch.equal(targets, want_targets)
    assert _epoch(loader, 1, start_batch=len(whole)) == []


def test_a_new_epoch_holds_no_batch_queued_for_the_last_one(train_folder):
    fresh = _epoch(_loader(train_folder, FULL), 1)
    loader = _loader(train_folder, FULL)
    _epoch(loader, 0)
    loader.set_epoch(0)
    for _ in zip(range(2), loader):  # an epoch left part-way, batches still queued
        pass
    after = _epoch(loader, 1)
    assert len(after) == len(fresh)
    for (inputs, targets), (want_inputs, want_targets) in zip(after, fresh, strict=True):
        assert torch.equal(inputs, want_inputs) and torch.equal(targets, want_targets)


def test_a_plain_draw_is_the_whole_image_resized(train_folder):
    loader = _loader(train_folder, PLAIN)
    paths = train_folder.paths()
    for (inputs, _), rows in zip(_epoch(loader, 0), list(loader.sampler), strict=True):
        for pixels, row in zip(_pixels(inputs), rows, strict=True):
            assert np.abs(pixels - _resized(paths[row])).max() <= CLOSE


def test_crops_and_colours_follow_draw(train_folder):
    aug = ImageAugment(size=SIZE, random_crop=True, crop_scale=(0.2, 1.0), flip=False,
                       color_jitter=0.4)
    loader = _loader(train_folder, aug)
    paths = train_folder.paths()
    width, height = 20, 16  # the training images' size
    for (inputs, _), rows in zip(_epoch(loader, 4), list(loader.sampler), strict=True):
        for pixels, row in zip(_pixels(inputs), rows, strict=True):
            choice = draw(aug, 5, 4, row)
            x, y, w, h = choice.crop
            # DALI's slice rounds the crop's edges to whole pixels, halves up.
            box = tuple(int(np.floor(v + 0.5)) for v in (x * width, y * height, (x + w) * width,
                                                         (y + h) * height))
            want = _twisted(_resized(paths[row], box), choice.brightness, choice.contrast,
                            choice.saturation)
            # The twist scales resize differences by up to (1 + j)^2.
            assert np.abs(pixels - want).max() <= 2 * CLOSE, (row, choice)


def test_flips_follow_draw(train_folder):
    aug = ImageAugment(size=SIZE, random_crop=False, flip=True, color_jitter=0.0)
    flipped = _epoch(_loader(train_folder, aug), 0)
    plain = _epoch(_loader(train_folder, PLAIN), 0)
    rows = [row for batch in _sampler(train_folder) for row in batch]
    inputs = torch.cat([batch for batch, _ in flipped])
    plain_inputs = torch.cat([batch for batch, _ in plain])
    flips = [draw(aug, 5, 0, row).flip for row in rows]
    assert any(flips) and not all(flips)
    for image, plain_image, flip in zip(inputs, plain_inputs, flips, strict=True):
        assert torch.equal(image, plain_image.flip(-1) if flip else plain_image)


def test_the_same_seed_epoch_and_row_give_the_same_sample_whatever_the_threads(train_folder):
    one = _epoch(_loader(train_folder, FULL, num_threads=1), 3)
    two = _epoch(_loader(train_folder, FULL, num_threads=2), 3)
    for (inputs, targets), (other_inputs, other_targets) in zip(one, two, strict=True):
        assert torch.equal(inputs, other_inputs) and torch.equal(targets, other_targets)
    other_seed = _epoch(_loader(train_folder, FULL, seed=6), 3)
    assert not torch.equal(one[0][0], other_seed[0][0])


def _centre_view(path: str) -> np.ndarray:
    """PIL's reference evaluation view: shorter side to SIZE, the centre SIZE x SIZE."""
    with Image.open(path) as image:
        width, height = image.size
        scale = SIZE / min(width, height)
        resized = image.convert("RGB").resize((round(width * scale), round(height * scale)),
                                              Image.Resampling.BILINEAR)
    left, top = (resized.width - SIZE) // 2, (resized.height - SIZE) // 2
    return np.asarray(resized.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float64)


# 31 rows: shards of 15 and 16, or 10, 10 and 11 rows; with batches of 5 the 10-row
# shards need a third batch of fillers alone to keep step with the 11-row one.
@pytest.mark.parametrize(("world_size", "batch"), [(1, 4), (2, 4), (3, 4), (3, 5)])
def test_eval_shards_cover_every_row_once_in_the_same_number_of_batches(val_folder, world_size,
                                                                        batch):
    paths = val_folder.paths()
    assert len(paths) == 31
    counted: list[int] = []
    batch_counts = set()
    for rank in range(world_size):
        batches = list(dali_eval_batches(paths, val_folder.labels, rank=rank,
                                         world_size=world_size, batch=batch, size=SIZE, mean=MEAN,
                                         std=STD, num_threads=2, device_id=None))
        batch_counts.add(len(batches))
        for inputs, targets, weight in batches:
            assert inputs.shape == (batch, 3, SIZE, SIZE) and inputs.dtype == torch.float32
            assert targets.shape == weight.shape == (batch,)
            assert targets.dtype == torch.int64 and weight.dtype == torch.float32
            assert set(weight.tolist()) <= {0.0, 1.0}
            for pixels, target, row in zip(_pixels(inputs)[weight == 1], targets[weight == 1],
                                           np.array(_rows_shown(inputs))[weight == 1], strict=True):
                assert target == val_folder.labels[row]
                assert np.abs(pixels - _centre_view(paths[row])).max() <= CLOSE
                counted.append(int(row))
    assert len(batch_counts) == 1
    assert sorted(counted) == list(range(len(paths)))
