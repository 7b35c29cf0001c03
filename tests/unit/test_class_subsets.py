"""data.classes: the rows of the listed classes, relabelled 0..k-1 in the listed order,
counted by the planner as the loaders load them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.datasets import load_digits

from launcher.data.classes import keep_classes
from launcher.data.datasets import load_split
from launcher.data.facts import DIGITS_CLASS_ROWS, describe
from launcher.data.images import scan_image_folder
from launcher.data.pattern_images import write_pattern_images
from launcher.errors import UsageError
from launcher.recipe import DataConfig, recipe_from_data
from launcher.yamlio import SourceMap


def test_keep_classes_keeps_listed_rows_in_order_and_relabels_them_by_list_position():
    rows, labels = keep_classes(np.array([3, 7, 5, 3, 9, 7]), [7, 3])
    assert rows.tolist() == [0, 1, 3, 5]
    assert labels.tolist() == [1, 0, 1, 0]


def test_the_digit_counts_are_scikit_learns():
    assert DIGITS_CLASS_ROWS == tuple(np.bincount(load_digits().target))


def _rows(split) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [split.train, split.val]
    return torch.cat([p.tensors[0] for p in parts]), torch.cat([p.tensors[1] for p in parts])


def test_digits_five_to_nine_become_classes_zero_to_four():
    cfg = DataConfig(source="digits", classes=[5, 6, 7, 8, 9], normalize=False)
    facts = describe(cfg)
    assert (facts.num_rows, facts.num_classes) == (sum(DIGITS_CLASS_ROWS[5:]), 5)
    x, y = _rows(load_split(cfg, facts))
    assert len(y) == facts.num_train + facts.num_val == facts.num_rows
    assert torch.bincount(y).tolist() == list(DIGITS_CLASS_ROWS[5:])
    # Each row is the image of the digit its new label stands for.
    digits = load_digits()
    images = {tuple(image): label for image, label in zip(digits.data / 16.0, digits.target, strict=True)}
    assert all(images[tuple(row.flatten().tolist())] == 5 + label
               for row, label in zip(x, y.tolist(), strict=True))


def test_synthetic_rows_are_counted_before_they_are_generated():
    cfg = DataConfig(source="synthetic", samples=103, num_classes=4, classes=[3, 1])
    facts = describe(cfg)
    assert (facts.num_rows, facts.num_classes) == (25 + 26, 2)
    _, y = _rows(load_split(cfg, facts))
    assert torch.bincount(y).tolist() == [25, 26]  # class 3 is now 0, class 1 is 1


def test_parquet_rows_keep_their_features_with_their_new_labels(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": list(range(60)), "label": [i % 6 for i in range(60)]}), path)
    cfg = DataConfig(source="parquet", path=str(path), classes=[4, 0, 2], normalize=False, val_fraction=0.25)
    facts = describe(cfg)
    assert (facts.num_rows, facts.num_classes, facts.num_train + facts.num_val) == (30, 3, 30)
    x, y = _rows(load_split(cfg, facts))
    assert sorted(zip(x[:, 0].long().tolist(), y.tolist())) == sorted(
        (i, [4, 0, 2].index(i % 6)) for i in range(60) if i % 6 in (4, 0, 2))


def test_an_image_folder_keeps_the_files_of_the_listed_class_folders(tmp_path):
    root = write_pattern_images(tmp_path / "images", per_class=3, sizes=(8, 8))
    folder = scan_image_folder(str(root))
    cfg = DataConfig(source="images", path=str(root), image_size=8, classes=[2, 0], val_fraction=0.5)
    facts = describe(cfg)
    assert (facts.num_rows, facts.num_classes) == (6, 2)
    split = load_split(cfg, facts)
    rows = [(Path(path).parent.name, int(label)) for part in (split.train, split.val)
            for path, label in zip(part.files, part.labels, strict=True)]
    assert sorted(rows) == sorted([(folder.classes[2], 0)] * 3 + [(folder.classes[0], 1)] * 3)


@pytest.mark.parametrize("data,message", [
    ({"source": "digits", "classes": [5, 10]},
     "data.classes: class 10 has no rows; the data's labels are 0..9"),
    ({"source": "synthetic", "num_classes": 3, "classes": [0, 3]},
     "data.classes: class 3 has no rows; the data's labels are 0..2"),
])
def test_a_class_without_rows_is_refused_when_planned(data, message):
    with pytest.raises(UsageError) as info:
        describe(DataConfig(**data))
    assert str(info.value) == f"error: {message}"


@pytest.mark.parametrize("data,message", [
    ({"classes": [1, 2, 1]}, "class 1 is listed twice"),
    ({"classes": [-1, 2]}, "class labels are 0 or more, not -1"),
    ({"source": "synthetic", "kind": "tokens", "classes": [0, 1]}, "token data has none"),
    ({"source": "parquet", "path": "x", "streaming": True, "classes": [0, 1]}, "set data.streaming: false"),
])
def test_classes_the_data_cannot_have_are_refused_with_the_recipe(data, message):
    with pytest.raises(UsageError) as info:
        recipe_from_data({"data": data}, SourceMap(filename="recipe.yaml"))
    assert info.value.key == "data.classes" and message in info.value.message
