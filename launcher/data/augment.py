"""Image augmentation whose random choices are drawn here, once, for both loaders.

Each training sample's crop, flip and colour factors are a function of (seed, epoch,
row) alone: ``draw`` picks them, and the torch loader (``apply_draw``) and the DALI
pipeline (which takes them as per-sample inputs) both apply them. So the two loaders
see the same augmentations, a resumed run sees the ones the uninterrupted run would
have, and neither depends on how many loader workers or DALI threads there are.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class ImageAugment:
    """The recipe's image augmentation settings (``data.augment``), for training only."""

    size: int
    """Side of the square image the model sees."""
    random_crop: bool = True
    """Random resized crop (else the whole image, resized)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Range of the crop's share of the image area."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop's aspect ratio (width / height, relative to the image's own:
    equal to torchvision's for square images), drawn log-uniformly."""
    flip: bool = True
    """Horizontal flip with probability 0.5."""
    color_jitter: float = 0.0
    """Brightness, contrast and saturation factors drawn from [1 - j, 1 + j]."""


@dataclass(frozen=True)
class SampleDraw:
    """One training sample's random choices."""

    crop: tuple[float, float, float, float]
    """(x, y, width, height) of the crop as fractions of the image's width and height."""
    flip: bool
    brightness: float
    contrast: float
    saturation: float


CROP_ATTEMPTS = 10
"""As torchvision's RandomResizedCrop: after 10 crops that do not fit, the whole image."""


def draw(aug: ImageAugment, seed: int, epoch: int, row: int) -> SampleDraw:
    rng = np.random.default_rng([seed % 2**64, epoch, row])
    crop = (0.0, 0.0, 1.0, 1.0)
    if aug.random_crop:
        log_ratio = (math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]))
        for _ in range(CROP_ATTEMPTS):
            area = rng.uniform(*aug.crop_scale)
            ratio = math.exp(rng.uniform(*log_ratio))
            width, height = math.sqrt(area * ratio), math.sqrt(area / ratio)
            if width <= 1 and height <= 1:
                crop = (rng.uniform(0, 1 - width), rng.uniform(0, 1 - height), width, height)
                break
    flip = bool(aug.flip and rng.random() < 0.5)
    j = aug.color_jitter
    brightness, contrast, saturation = (rng.uniform(max(0.0, 1 - j), 1 + j, size=3) if j > 0
                                        else (1.0, 1.0, 1.0))
    return SampleDraw(tuple(float(v) for v in crop), flip, float(brightness), float(contrast),
                      float(saturation))


def decode(data: bytes | str) -> Image.Image:
    """An image file's bytes (as a dataset row holds them) or its path, as RGB.

    RGB always, because the model's first layer wants three channels whatever the file
    stored (greyscale, palette, RGBA), and DALI's decoder gives RGB too."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """float32 CHW in [0, 1], the layout and range the model and ``color_twist`` take."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


def apply_draw(image: Image.Image, choice: SampleDraw, size: int) -> torch.Tensor:
    """The training view of ``image``: the drawn crop, flip and colour twist, size x size.

    Crop and resize are one PIL call, so the crop is resampled once (with antialiasing)
    rather than cut to whole pixels and then resized; DALI's ``fn.resize`` of the same
    relative ROI computes the same to within a level. (The DALI loader decodes the box
    rounded to whole pixels, which is faster and differs by about a level on average.)"""
    width, height = image.size
    x, y, w, h = choice.crop
    box = (x * width, y * height, (x + w) * width, (y + h) * height)
    view = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if choice.flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    tensor = to_tensor(view)
    if (choice.brightness, choice.contrast, choice.saturation) == (1.0, 1.0, 1.0):
        return tensor
    return color_twist(tensor, choice.brightness, choice.contrast, choice.saturation)


RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                           [0.596, -0.274, -0.321],
                           [0.211, -0.523, 0.311]], dtype=torch.float64)
"""DALI's ``Rgb2Yiq`` (dali/operators/image/color/color_twist.h)."""
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)
"""DALI's ``Yiq2Rgb = inverse(Rgb2Yiq)``: the exact inverse, not the rounded textbook matrix
(whose product with RGB_TO_YIQ is off identity by up to 1.4e-3, a third of a uint8 level)."""
UINT8_GRAY = 128 / 255
"""Contrast's fixed point: DALI's ``half_range_`` is 128 for integer input. The DALI
pipeline twists decoded uint8 images, so here it is 128/255, not the 0.5 DALI would use
for float input."""


def color_twist(x: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """DALI's ``fn.color_twist`` (hue 0) on a float CHW image in [0, 1], as DALI applies it
    to the uint8 image the DALI pipeline decodes, so both loaders twist colours alike.

    DALI's ColorTwist (dali/operators/image/color/color_twist.h) maps each RGB pixel p to
    ``b * c * (Yiq2Rgb @ diag(1, s, s) @ Rgb2Yiq) @ p + (half - half * c) * b``: saturation
    scales the chroma (I, Q) in YIQ space, contrast scales around the grey level ``half``
    (128 for uint8), brightness scales the whole. For uint8 DALI then rounds and saturates
    to [0, 255]; so this clamps to [0, 1] (it does not round to 1/255 steps: the result
    stays within half a level of DALI's). (For float input DALI uses half = 0.5 and does
    not clamp; that is not the path the pipeline takes.)
    """
    chroma = torch.diag(torch.tensor([1.0, saturation, saturation], dtype=torch.float64))
    matrix = brightness * contrast * (YIQ_TO_RGB @ chroma @ RGB_TO_YIQ)
    offset = (UINT8_GRAY - UINT8_GRAY * contrast) * brightness
    twisted = torch.einsum("oc,chw->ohw", matrix.to(x.dtype), x) + offset
    return twisted.clamp_(0.0, 1.0)


def round_half_up(value: float) -> int:
    """DALI's rounding of sizes and crop anchors (Python's ``round`` rounds halves to even)."""
    return math.floor(value + 0.5)


def eval_view(image: Image.Image, size: int) -> torch.Tensor:
    """The evaluation view: shorter side resized to ``size``, then the centre size x size.

    The geometry is DALI's ``fn.resize(resize_shorter=size)`` + ``fn.crop(crop=(size, size))``
    (the longer side and the anchor rounded half up), so both loaders evaluate the same pixels."""
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = (size if width <= height else round_half_up(width * scale),
                             size if height <= width else round_half_up(height * scale))
    resized = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left, top = round_half_up((new_width - size) / 2), round_half_up((new_height - size) / 2)
    return to_tensor(resized.crop((left, top, left + size, top + size)))


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """timm's label smoothing: ``smoothing / C`` off the class, ``1 - smoothing + off`` on it."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return F.one_hot(y, num_classes).to(torch.float32) * (on - off) + off


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm's ``rand_bbox``: a box of about (1 - lam) of the area, any centre, clipped.

    (top, bottom, left, right); the halves are ``cut // 2`` on each side of the centre, as
    timm's, so the box may be a pixel narrower than ``cut``."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height),
            max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width))


def mix_batch(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, mixup_alpha: float,
              cutmix_alpha: float, label_smoothing: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mixup / cutmix with label smoothing, as timm's ``Mixup`` (mode "batch", prob 1,
    switch_prob 0.5, correct_lam): the mixed inputs and float32 (N, C) soft targets.

    Every sample is mixed with its mirror in the batch (``x.flip(0)``) by one lam per
    batch. Cutmix pastes a box of the partner's pixels and sets lam to the share of the
    image left unpasted. ``x`` is not changed. All randomness comes from ``generator``
    (one seed for a numpy Generator, which has the Beta distribution), so a batch's mix is
    reproducible from the generator's state."""
    if cutmix_alpha > 0 and x.dim() != 4:
        raise ValueError(f"cutmix needs (N, C, H, W) images, got a {x.dim()}-D batch of shape "
                         f"{tuple(x.shape)}: set cutmix_alpha to 0 for feature rows")
    targets = smooth_one_hot(y, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, targets
    rng = np.random.default_rng(int(torch.randint(0, 2**63 - 1, (1,), generator=generator)))
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    partner = x.flip(0)
    if use_cutmix:
        top, bottom, left, right = cutmix_box(x.shape[-2], x.shape[-1], lam, rng)
        mixed = x.clone()
        mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])
    else:
        mixed = lam * x + (1.0 - lam) * partner
    return mixed, lam * targets + (1.0 - lam) * targets.flip(0)
