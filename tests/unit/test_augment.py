"""Augmentation: the draws, the torch views, and their agreement with DALI's operators."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import nvidia.dali as dali
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from launcher.data.augment import (
    ImageAugment,
    SampleDraw,
    apply_draw,
    color_twist,
    decode,
    draw,
    eval_view,
    mix_batch,
    to_tensor,
)

AUG = ImageAugment(size=16, color_jitter=0.4)
PLAIN = SampleDraw((0.0, 0.0, 1.0, 1.0), False, 1.0, 1.0, 1.0)


def saved(tmp_path: Path, pixels: np.ndarray, name: str = "image.png") -> Path:
    """A real image file, as a dataset would hold it."""
    path = tmp_path / name
    Image.fromarray(pixels).save(path)
    return path


def random_pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def batch_of(samples: list) -> Callable[[], list]:
    """An external_source callback; a closure, since DALI passes arguments to one that has
    parameters (so a defaulted lambda parameter would not do)."""
    return lambda: samples


def dali_run(images: list[np.ndarray], op, **per_sample: list[float]) -> list[np.ndarray]:
    """One batch of HWC images through a CPU-only DALI pipeline running ``op``, with each
    keyword fed per sample, as the DALI loader feeds the drawn factors."""

    @dali.pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipeline():
        x = dali.fn.external_source(source=batch_of(images), layout="HWC")
        args = {k: dali.fn.external_source(source=batch_of([np.float32(f) for f in v]))
                for k, v in per_sample.items()}
        return op(x, **args)

    pipe = pipeline()
    pipe.build()
    (out,) = pipe.run()
    return [np.asarray(out[i]) for i in range(len(images))]


# draw


def test_draw_is_a_function_of_seed_epoch_and_row():
    assert draw(AUG, 7, 3, 11) == draw(AUG, 7, 3, 11)
    assert draw(AUG, 7, 3, 11).crop != draw(AUG, 7, 4, 11).crop
    assert draw(AUG, 7, 3, 11).crop != draw(AUG, 7, 3, 12).crop


def test_draw_crops_lie_in_the_unit_square_within_scale_and_ratio():
    for row in range(500):
        choice = draw(AUG, 0, 0, row)
        x, y, w, h = choice.crop
        assert 0 <= x and 0 <= y and x + w <= 1 + 1e-12 and y + h <= 1 + 1e-12
        assert AUG.crop_scale[0] - 1e-12 <= w * h <= AUG.crop_scale[1] + 1e-12
        assert AUG.crop_ratio[0] - 1e-12 <= w / h <= AUG.crop_ratio[1] + 1e-12
        for factor in (choice.brightness, choice.contrast, choice.saturation):
            assert 1 - AUG.color_jitter <= factor <= 1 + AUG.color_jitter


def test_draw_flips_about_half_the_time():
    flips = sum(draw(AUG, 1, 0, row).flip for row in range(2000))
    assert 0.44 < flips / 2000 < 0.56  # sd 0.011: six of them either side


def test_draw_falls_back_to_the_whole_image_when_no_crop_fits():
    # the whole area at aspect 2..3 is wider than the image every time
    aug = ImageAugment(size=16, crop_scale=(1.0, 1.0), crop_ratio=(2.0, 3.0))
    assert {draw(aug, 0, 0, row).crop for row in range(20)} == {(0.0, 0.0, 1.0, 1.0)}


# apply_draw


def test_apply_draw_of_the_whole_image_unflipped_untwisted_is_a_plain_resize(tmp_path):
    image = decode(str(saved(tmp_path, random_pixels(23, 37))))
    view = apply_draw(image, PLAIN, 16)
    assert view.shape == (3, 16, 16) and view.dtype == torch.float32
    assert torch.equal(view, to_tensor(image.resize((16, 16), Image.Resampling.BILINEAR)))


def test_decode_takes_bytes_and_converts_to_rgb(tmp_path):
    grey = Image.fromarray(random_pixels(9, 11)[..., 0])
    grey.save(tmp_path / "grey.png")
    image = decode((tmp_path / "grey.png").read_bytes())
    assert image.mode == "RGB" and image.size == (11, 9)


def test_apply_draw_flip_mirrors_left_right(tmp_path):
    image = decode(str(saved(tmp_path, random_pixels(20, 30))))
    crop = (0.1, 0.2, 0.5, 0.6)
    plain = apply_draw(image, SampleDraw(crop, False, 1.0, 1.0, 1.0), 12)
    flipped = apply_draw(image, SampleDraw(crop, True, 1.0, 1.0, 1.0), 12)
    assert torch.equal(flipped, plain.flip(-1))


def test_apply_draw_crop_inside_the_red_half_is_all_red(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20, 0] = 255  # left half red
    pixels[:, 20:, 2] = 255  # right half blue
    image = decode(str(saved(tmp_path, pixels)))
    # The left 40%, not the whole half: the resampling filter reaches a pixel or two past
    # the box (as DALI's resize with an ROI does), so a box ending at the boundary has a
    # blue fringe.
    view = apply_draw(image, SampleDraw((0.0, 0.0, 0.4, 1.0), False, 1.0, 1.0, 1.0), 8)
    assert torch.equal(view, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 8, 8))


def test_apply_draw_crop_matches_dali_resize_with_a_relative_roi(tmp_path):
    # DALI's resize of a relative ROI (y, x order), linear, antialiased, resamples the same box
    # (the DALI loader decodes the box rounded to whole pixels: see test_dali_loader.py)
    pixels = random_pixels(30, 50, seed=3)
    image = decode(str(saved(tmp_path, pixels)))
    x, y, w, h = crop = (0.1, 0.2, 0.6, 0.5)
    [dali_view] = dali_run([pixels], lambda img: dali.fn.resize(
        img, size=(16, 16), roi_start=(y, x), roi_end=(y + h, x + w), roi_relative=True,
        interp_type=dali.types.INTERP_LINEAR, antialias=True))
    view = apply_draw(image, SampleDraw(crop, False, 1.0, 1.0, 1.0), 16)
    assert np.abs(view.permute(1, 2, 0).numpy() * 255 - dali_view).max() <= 1 + 1e-3


# color_twist: the two loaders must twist colours alike

TWISTS = [(1.0, 1.0, 1.0), (1.3, 0.7, 1.4), (0.6, 1.5, 0.3), (1.2, 1.2, 0.0), (0.8, 0.6, 1.6),
          (1.6, 1.4, 1.0)]


def test_color_twist_matches_dali_color_twist_on_uint8_images():
    images = [random_pixels(12, 17, seed=i) for i in range(len(TWISTS))]
    brightness, contrast, saturation = (list(f) for f in zip(*TWISTS))
    expected = dali_run(images, dali.fn.color_twist, brightness=brightness, contrast=contrast,
                        saturation=saturation)
    for pixels, twist, dali_out in zip(images, TWISTS, expected):
        assert dali_out.dtype == np.uint8
        ours = color_twist(to_tensor(Image.fromarray(pixels)), *twist).permute(1, 2, 0).numpy()
        # DALI rounds to whole levels; ours does not: half a level apart at most
        assert np.abs(ours * 255 - dali_out).max() <= 0.5 + 1e-3, twist
        assert ours.min() >= 0 and ours.max() <= 1


def test_color_twist_clamps_to_the_unit_range():
    bright = color_twist(torch.full((3, 2, 2), 0.9), 1.6, 1.4, 1.0)
    dark = color_twist(torch.full((3, 2, 2), 0.1), 0.5, 1.5, 1.0)
    assert torch.equal(bright, torch.ones(3, 2, 2)) and torch.equal(dark, torch.zeros(3, 2, 2))


def test_apply_draw_applies_the_drawn_color_twist(tmp_path):
    image = decode(str(saved(tmp_path, random_pixels(20, 20))))
    twisted = apply_draw(image, SampleDraw((0.0, 0.0, 1.0, 1.0), False, 1.2, 0.8, 1.3), 10)
    assert torch.allclose(twisted, color_twist(apply_draw(image, PLAIN, 10), 1.2, 0.8, 1.3))


# eval_view


def test_eval_view_keeps_the_aspect_then_centre_crops(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[6:14, 16:24] = 255  # an 8x8 square in the centre of a 40x20 image
    view = eval_view(decode(str(saved(tmp_path, pixels))), 10)
    assert view.shape == (3, 10, 10)
    # halved to 20x10, the square is 4x4 in the middle of the centre 10x10; squashed, it
    # would be 2 wide; cropped off centre, it would not sit at rows and columns 3..6
    marker = (view[0] > 0.5).nonzero()
    assert marker[:, 0].unique().tolist() == [3, 4, 5, 6]
    assert marker[:, 1].unique().tolist() == [3, 4, 5, 6]
    assert len(marker) == 16


def test_eval_view_rounds_halves_up_as_dali(tmp_path):
    # 41x20 to shorter side 10: the longer side is 20.5 -> 21 and the crop's left edge
    # (21 - 10) / 2 = 5.5 -> 6, as DALI's resize_shorter and crop do (round() gives 20, 5)
    image = decode(str(saved(tmp_path, random_pixels(20, 41))))
    expected = image.resize((21, 10), Image.Resampling.BILINEAR).crop((6, 0, 16, 10))
    assert torch.equal(eval_view(image, 10), to_tensor(expected))


# mix_batch


def mixed(x, y, *, seed=0, mixup=0.0, cutmix=0.0, smoothing=0.0, num_classes=5):
    return mix_batch(x, y, num_classes=num_classes, mixup_alpha=mixup, cutmix_alpha=cutmix,
                     label_smoothing=smoothing, generator=torch.Generator().manual_seed(seed))


IMAGES = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 16, 16).contiguous()
LABELS = torch.tensor([0, 1, 2, 3, 4, 1])  # no sample shares its mirror's label


@pytest.mark.parametrize("mixup, cutmix", [(0.0, 0.0), (0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mix_batch_target_rows_sum_to_one(mixup, cutmix):
    for seed in range(5):
        _, targets = mixed(IMAGES, LABELS, seed=seed, mixup=mixup, cutmix=cutmix, smoothing=0.1)
        assert targets.dtype == torch.float32 and targets.shape == (6, 5)
        assert torch.allclose(targets.sum(1), torch.ones(6))


def test_mix_batch_with_smoothing_only_gives_on_and_off_values_and_leaves_x():
    x, targets = mixed(IMAGES, LABELS, smoothing=0.1)
    off, on = 0.1 / 5, 1 - 0.1 + 0.1 / 5
    expected = torch.full((6, 5), off)
    expected[torch.arange(6), LABELS] = on
    assert torch.allclose(targets, expected) and torch.equal(x, IMAGES)


def test_mixup_mixes_inputs_and_targets_by_the_same_lam():
    features = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))  # (N, F) rows
    x, targets = mixed(features, LABELS, seed=2, mixup=0.8)
    lam = targets[0, LABELS[0]].item()
    assert 0 < lam < 1
    expected = lam * F.one_hot(LABELS, 5) + (1 - lam) * F.one_hot(LABELS.flip(0), 5)
    assert torch.allclose(targets, expected.float())
    assert torch.allclose(x, lam * features + (1 - lam) * features.flip(0))


def test_cutmix_pastes_a_box_whose_area_share_is_one_minus_lam():
    boxes = 0
    for seed in range(20):
        x, targets = mixed(IMAGES, LABELS, seed=seed, cutmix=1.0)
        lam = targets[0, LABELS[0]].item()
        pasted = x != IMAGES  # every sample differs from its mirror everywhere
        assert torch.equal(x[pasted], IMAGES.flip(0)[pasted])
        mask = pasted[0, 0]
        assert (pasted == mask).all()  # the same box in every sample and channel
        assert mask.float().mean().item() == pytest.approx(1 - lam)
        if mask.any():
            boxes += 1
            rows, cols = mask.nonzero().unbind(1)
            box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert mask.sum() == box_area  # a filled rectangle
    assert boxes >= 10


def test_both_alphas_pick_mixup_or_cutmix_per_batch():
    cutmix_batches = 0
    for seed in range(100):
        x, _ = mixed(IMAGES, LABELS, seed=seed, mixup=0.8, cutmix=1.0)
        # cutmix keeps the original pixel values; mixup blends them
        cutmix_batches += bool(((x == IMAGES) | (x == IMAGES.flip(0))).all())
    assert 30 < cutmix_batches < 70


def test_mix_batch_is_deterministic_given_the_generator_seed():
    first = mixed(IMAGES, LABELS, seed=5, mixup=0.8, cutmix=1.0, smoothing=0.1)
    again = mixed(IMAGES, LABELS, seed=5, mixup=0.8, cutmix=1.0, smoothing=0.1)
    other = mixed(IMAGES, LABELS, seed=6, mixup=0.8, cutmix=1.0, smoothing=0.1)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_cutmix_on_feature_rows_raises():
    with pytest.raises(ValueError, match="cutmix needs"):
        mixed(torch.randn(4, 7), LABELS[:4], cutmix=1.0)


def test_cross_entropy_of_mixup_targets_is_the_lam_weighted_hard_label_loss():
    # what the trainer relies on: F.cross_entropy with the soft targets is mixup's loss
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    _, targets = mixed(torch.randn(6, 7), LABELS, seed=4, mixup=0.8)
    lam = targets[0, LABELS[0]].item()
    hard = lam * F.cross_entropy(logits, LABELS) + (1 - lam) * F.cross_entropy(logits, LABELS.flip(0))
    assert math.isclose(F.cross_entropy(logits, targets).item(), hard.item(), rel_tol=1e-5)


@pytest.mark.parametrize("seed", [1234, -1])
def test_a_micro_batch_is_mixed_the_same_way_for_any_seed_the_schema_allows(seed):
    """The trainer's draw from (seed, rank, step, micro-batch): a negative train.seed,
    which the schema allows, mixes as well as a positive one, and the same draw twice
    mixes alike (a resumed run mixes as the uninterrupted one did)."""
    from types import SimpleNamespace

    from launcher.trainer import mix_micro_batch

    augment = SimpleNamespace(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
    plan = SimpleNamespace(recipe=SimpleNamespace(train=SimpleNamespace(seed=seed), data=SimpleNamespace(augment=augment)),
                           training=SimpleNamespace(data=SimpleNamespace(num_classes=3)))
    batch = (torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    first = mix_micro_batch(batch, plan, rank=1, step=5, micro=0)
    again = mix_micro_batch(batch, plan, rank=1, step=5, micro=0)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], batch[0])
