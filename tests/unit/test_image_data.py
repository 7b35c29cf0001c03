"""Image folders as a data source: listing, facts for the planner, splits, the training
images' normalisation statistics (the leakage guard), training views keyed by (epoch,
row), and the recipe checks of loader and augmentation settings."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from launcher.data.datasets import load_split
from launcher.data.facts import describe
from launcher.data.image_rows import ImageRows
from launcher.data.images import scan_image_folder
from launcher.data.pattern_images import write_pattern_images
from launcher.data.sampler import EpochKeys, ResumableDistributedSampler
from launcher.errors import UsageError
from launcher.recipe import DataConfig, Recipe, load_recipe
from tests.unit.test_plan import refusal


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_pattern_images(tmp_path_factory.mktemp("patterns"), 20, sizes=(20, 30))


def config(folder, **data) -> DataConfig:
    return DataConfig(source="images", path=str(folder), image_size=16, **data)


def test_a_folder_lists_classes_and_files_in_sorted_order(folder):
    listed = scan_image_folder(str(folder))
    assert listed.classes == ("checker", "horizontal", "vertical")
    assert len(listed.files) == 60 and list(listed.files) == sorted(listed.files)
    assert [listed.labels[listed.files.index(f)] for f in ("checker/00000.jpg", "vertical/00019.png")] == [0, 2]


@pytest.mark.parametrize("layout,message", [
    ({"only": ["a.jpg"]}, "holds 1 class folder(s)"),
    ({"cats": ["a.jpg"], "dogs": ["notes.txt"]}, "class folder 'dogs'"),
])
def test_a_folder_that_is_no_classification_set_is_a_usage_error(tmp_path, layout, message):
    for name, files in layout.items():
        (tmp_path / name).mkdir()
        for file in files:
            Image.new("RGB", (4, 4)).save(tmp_path / name / file, format="PNG")
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        scan_image_folder(str(tmp_path))
    assert info.value.key == "data.path"


def test_facts_come_from_the_listing_without_importing_torch(folder):
    probe = ("import sys; from launcher.data.facts import describe; from launcher.recipe import DataConfig; "
             f"f = describe(DataConfig(source='images', path={str(folder)!r}, image_size=16)); "
             "print(f.num_rows, f.input_shape, f.num_classes, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["60", "(3,", "16,", "16)", "3", "False"]


def test_the_split_normalises_with_the_training_images_statistics_only(folder, tmp_path):
    cfg = config(folder, validation="stratified", val_fraction=0.25, augment={"random_crop": False, "flip": False})
    split = load_split(cfg, describe(cfg), test=False)
    assert (len(split.train), len(split.val)) == (45, 15)
    assert not set(split.train.files) & set(split.val.files)
    # Brighten every validation image to white: the statistics must not move.
    leaked = tmp_path / "leaked"
    leaked.mkdir()
    for path in scan_image_folder(str(folder)).paths():
        target = leaked / path.split(str(folder) + "/")[1]
        target.parent.mkdir(exist_ok=True)
        if path in split.val.files:
            Image.new("RGB", Image.open(path).size, "white").save(target)
        else:
            shutil.copyfile(path, target)
    cfg_leaked = config(leaked, validation="stratified", val_fraction=0.25)
    other = load_split(cfg_leaked, describe(cfg_leaked))
    assert torch.equal(other.train.mean, split.train.mean) and torch.equal(other.train.std, split.train.std)
    # The normalised training images are centred.
    pixels = torch.stack([split.train[(0, i)][0] for i in range(len(split.train))])
    assert pixels.mean(dim=(0, 2, 3)).abs().max() < 0.05


def test_given_mean_and_std_are_used_as_they_are(folder):
    cfg = config(folder, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    split = load_split(cfg, describe(cfg))
    assert split.train.mean.flatten().tolist() == [0.5] * 3 and split.val.std.flatten().tolist() == [0.25] * 3


def test_training_views_depend_on_seed_epoch_and_row_alone(folder):
    cfg = config(folder, augment={"color_jitter": 0.3})
    split = load_split(cfg, describe(cfg), seed=7)
    first, again = split.train[(2, 5)][0], split.train[(2, 5)][0]
    assert torch.equal(first, again)
    assert not torch.equal(first, split.train[(3, 5)][0])
    reseeded = load_split(cfg, describe(cfg), seed=8)
    assert not torch.equal(first, reseeded.train[(2, 5)][0])
    # Evaluation views have no randomness and are read by row.
    assert torch.equal(split.val[0][0], split.val[0][0])


def test_epoch_keys_tag_each_index_with_the_samplers_epoch():
    sampler = ResumableDistributedSampler(12, rank=0, world_size=1, micro_batch=4, batches_per_step=1, seed=0)
    sampler.set_epoch(3, start_batch=1)
    keyed = list(EpochKeys(sampler))
    assert [[i for _, i in batch] for batch in keyed] == list(sampler)
    assert {e for batch in keyed for e, _ in batch} == {3} and len(EpochKeys(sampler)) == 2


def test_image_rows_give_float_images_and_labels(folder):
    listed = scan_image_folder(str(folder))
    rows = ImageRows(listed.paths(np.arange(3)), listed.labels[:3], size=16, mean=torch.zeros(3), std=torch.ones(3))
    image, label = rows[1]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert int(label) == 0


@pytest.mark.parametrize("data,message", [
    ("{source: images}", "data.path: data.source is images; set data.path"),
    ("{source: digits, loader: dali}", "data.loader: DALI decodes image files; digits rows are tensors"),
    ("{num_workers: 0, prefetch_factor: 4}", "data.prefetch_factor: prefetch_factor is per DataLoader worker"),
    ("{source: images, path: x, mean: [0.5, 0.5, 0.5]}", "data.std: give data.mean and data.std together"),
    ("{source: images, path: x, mean: [0.5], std: [0.2]}", "data.mean: data.mean is three per-channel values"),
    ("{source: images, path: x, shape: [3, 8, 8]}", "data.shape: images reach the model as 3 x image_size"),
    ("{augment: {crop_scale: [0.5, 0.2]}}", "data.augment.crop_scale: crop_scale [0.5, 0.2] must satisfy"),
    ("{source: synthetic, kind: tokens, augment: {mixup_alpha: 0.2}}", "data.augment: mixup, cutmix and label"),
])
def test_loader_and_augmentation_settings_that_cannot_work_are_refused(tmp_path, data, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"data: {data}\n")
    with pytest.raises(UsageError) as info:
        load_recipe(path)
    key, text = message.split(": ", 1)
    assert info.value.key == key and info.value.message.startswith(text), info.value


def test_cutmix_on_feature_rows_is_refused_by_the_planner():
    recipe = Recipe.model_validate({"data": {"source": "synthetic", "augment": {"cutmix_alpha": 1.0}}})
    from launcher.data.facts import describe as facts_of

    assert "cutmix pastes boxes of images" in refusal(recipe, data=facts_of(recipe.data)).message
