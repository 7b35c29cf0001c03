"""Loading every data source into train/validation tensors."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from launcher.data.datasets import load_split
from launcher.data.facts import describe
from launcher.errors import UsageError
from launcher.recipe import DataConfig


def _load(**kwargs):
    cfg = DataConfig(**kwargs)
    facts = describe(cfg)
    return load_split(cfg, facts), facts


def _write(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def _ids(dataset) -> list[int]:
    """Row ids of a split whose first feature column is the row id (normalize off)."""
    return dataset.tensors[0][:, 0].long().tolist()


@pytest.fixture
def id_file(tmp_path) -> str:
    """100 rows: feature `id` (the row number), feature `b`, a label in 0..2."""
    return _write(tmp_path / "rows.parquet", {"id": list(range(100)),
                                              "b": [float(i % 7) for i in range(100)],
                                              "label": [i % 3 for i in range(100)]})


def test_digits_are_image_shaped_pixels_in_unit_range():
    split, facts = _load(source="digits", normalize=False)
    x, y = split.train.tensors
    assert x.shape == (facts.num_train, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (facts.num_train,) and y.dtype == torch.int64
    assert len(split.val) == facts.num_val
    assert x.min() == 0 and x.max() == 1
    assert set(y.tolist()) == set(range(10))


def test_rows_take_the_shape_the_recipe_asks_for(id_file):
    split, _ = _load(source="parquet", path=id_file, shape=[2, 1], normalize=False)
    assert split.train.tensors[0].shape[1:] == (2, 1)


def test_split_is_disjoint_and_covers_every_row(id_file):
    split, facts = _load(source="parquet", path=id_file, normalize=False, val_fraction=0.3)
    train, val = _ids(split.train), _ids(split.val)
    assert (len(train), len(val)) == (facts.num_train, facts.num_val) == (70, 30)
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(100))


def test_split_follows_split_seed_only(id_file):
    first, _ = _load(source="parquet", path=id_file, normalize=False)
    again, _ = _load(source="parquet", path=id_file, normalize=False)
    other, _ = _load(source="parquet", path=id_file, normalize=False, split_seed=1)
    assert _ids(first.val) == _ids(again.val)
    assert set(_ids(first.val)) != set(_ids(other.val))


def test_holdout_keeps_the_rows_of_runs_made_before_other_strategies(tmp_path):
    for num_rows, val_fraction, seed in ((100, 0.2, 0), (37, 0.3, 1), (1000, 0.1, 12345), (10, 0.5, -3)):
        path = _write(tmp_path / f"{num_rows}.parquet", {"id": list(range(num_rows)),
                                                         "label": [i % 2 for i in range(num_rows)]})
        split, facts = _load(source="parquet", path=path, normalize=False,
                             val_fraction=val_fraction, split_seed=seed)
        # The reference: _split_indices as it was, for (num_rows, facts.num_val, seed).
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
        train, val = perm[:num_rows - facts.num_val], perm[num_rows - facts.num_val:]
        assert _ids(split.train) == train.tolist() and _ids(split.val) == val.tolist()  # in order


SPLITS = [{}, {"test_fraction": 0.1}, {"validation": "stratified", "test_fraction": 0.15},
          {"validation": "kfold", "fold": 2, "test_fraction": 0.1},
          {"validation": "walk_forward", "fold": 1, "test_fraction": 0.1}]


@pytest.mark.parametrize("settings", SPLITS[1:4])
def test_test_rows_are_neither_trained_nor_validated_on(id_file, settings):
    split, facts = _load(source="parquet", path=id_file, normalize=False, **settings)
    seen = _ids(split.train) + _ids(split.val)
    assert (len(split.train), len(split.val)) == (facts.num_train, facts.num_val)
    assert facts.num_test == round(100 * settings["test_fraction"])
    assert len(set(seen)) == len(seen) == 100 - facts.num_test


def test_every_fold_leaves_out_the_same_test_rows(id_file):
    seen = [set(_ids(split.train) + _ids(split.val)) for split, _ in
            (_load(source="parquet", path=id_file, normalize=False, validation="stratified_kfold",
                   fold=fold, test_fraction=0.2) for fold in range(5))]
    assert all(rows == seen[0] for rows in seen) and len(seen[0]) == 80


def _replace_b(tmp_path, name: str, rows: set[int], value: float) -> str:
    """The id file with feature `b` set to ``value`` on ``rows``."""
    b = [value if i in rows else float(i % 7) for i in range(100)]
    return _write(tmp_path / name, {"id": list(range(100)), "b": b, "label": [i % 3 for i in range(100)]})


@pytest.mark.parametrize("settings", SPLITS)
def test_normalization_statistics_come_from_the_train_split_only(tmp_path, id_file, settings):
    raw, facts = _load(source="parquet", path=id_file, normalize=False, **settings)
    train_rows = set(_ids(raw.train))
    held_out = set(range(100)) - train_rows  # validation, test (and later windows)
    assert len(held_out) >= facts.num_val + facts.num_test
    clean, _ = _load(source="parquet", path=id_file, **settings)
    # Extreme outliers in every held-out row change nothing the training rows see ...
    outliers, _ = _load(source="parquet", path=_replace_b(tmp_path, "out.parquet", held_out, 1e6),
                        **settings)
    assert torch.equal(clean.train.tensors[0], outliers.train.tensors[0])
    # ... while one in a single training row does: the check is not blind.
    moved, _ = _load(source="parquet", path=_replace_b(tmp_path, "in.parquet", {min(train_rows)}, 1e6),
                     **settings)
    assert not torch.equal(clean.train.tensors[0], moved.train.tensors[0])
    x_train = clean.train.tensors[0]
    assert torch.allclose(x_train.mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(x_train.std(0, correction=0), torch.ones(2), atol=1e-5)
    mean, std = raw.train.tensors[0].mean(0), raw.train.tensors[0].std(0, correction=0)
    assert torch.allclose(clean.val.tensors[0], (raw.val.tensors[0] - mean) / std, atol=1e-5)


def test_stratified_split_keeps_a_rare_class_share(tmp_path):
    labels = [1 if i % 10 == 0 else 0 for i in range(200)]  # 10% of class 1
    path = _write(tmp_path / "rare.parquet", {"id": list(range(200)), "label": labels})
    split, facts = _load(source="parquet", path=path, normalize=False, validation="stratified",
                         val_fraction=0.25, test_fraction=0.1)
    assert (facts.num_train, facts.num_val, facts.num_test) == (130, 50, 20)
    assert split.val.tensors[1].sum() == 5 and split.train.tensors[1].sum() == 13


def test_walk_forward_follows_the_time_column_which_is_no_feature(tmp_path):
    order = torch.randperm(60, generator=torch.Generator().manual_seed(0)).tolist()
    # Rows stored out of time order; `t` holds timestamps, `id` each row's place in time.
    times = [pa.scalar(1_700_000_000 + 3600 * i, pa.timestamp("s")).as_py() for i in order]
    path = _write(tmp_path / "times.parquet", {"id": order, "t": times, "label": [i % 2 for i in order]})
    split, facts = _load(source="parquet", path=path, normalize=False, validation="walk_forward",
                         time_column="t", folds=3, fold=1, test_fraction=0.1)
    assert facts.input_shape == (1,)  # `id` alone: the time column is not a feature
    # 54 rows before the 6 latest (the test split) make 3 windows of 54 // 4 = 13 rows.
    assert (facts.num_train, facts.num_val, facts.num_test) == (28, 13, 6)
    assert _ids(split.train) == list(range(28)) and _ids(split.val) == list(range(28, 41))


def test_a_missing_time_column_is_a_usage_error(id_file):
    with pytest.raises(UsageError, match="'t' not in") as info:
        _load(source="parquet", path=id_file, validation="walk_forward", time_column="t")
    assert info.value.key == "data.time_column"


def test_rows_without_a_time_are_a_usage_error(tmp_path):
    path = _write(tmp_path / "gaps.parquet", {"x": [1.0] * 12, "t": [1, None, *range(10)],
                                              "label": [0, 1] * 6})
    with pytest.raises(UsageError, match="1 missing") as info:
        _load(source="parquet", path=path, validation="walk_forward", time_column="t", folds=2)
    assert info.value.key == "data.time_column"


def test_images_are_normalized_per_channel(tmp_path):
    # 4 pixels per channel; channel 1 is channel 0 scaled by 100 and shifted by 5.
    rows = torch.rand(64, 4) + torch.arange(4.0)  # pixels with different means
    columns = {f"c0_{i}": rows[:, i].tolist() for i in range(4)}
    columns |= {f"c1_{i}": (rows[:, i] * 100 + 5).tolist() for i in range(4)}
    path = _write(tmp_path / "img.parquet", columns | {"label": [0, 1] * 32})
    split, _ = _load(source="parquet", path=path, shape=[2, 2, 2], val_fraction=0.25)
    x = split.train.tensors[0]
    for channel in range(2):
        values = x[:, channel]
        assert abs(values.mean().item()) < 1e-4 and abs(values.std(correction=0).item() - 1) < 1e-3
    # Per channel, not per pixel: the pixels keep their different means.
    assert x[:, 0, 1, 1].mean() > x[:, 0, 0, 0].mean() + 1
    assert torch.allclose(x[:, 0], x[:, 1], atol=1e-4)


def test_a_feature_constant_on_train_is_left_unscaled(tmp_path, id_file):
    raw, _ = _load(source="parquet", path=id_file, normalize=False)
    val_rows = set(_ids(raw.val))
    # `c` is 0 on every training row (a digits border pixel) and 1 on validation rows.
    c = [1.0 if i in val_rows else 0.0 for i in range(100)]
    path = _write(tmp_path / "const.parquet", {"id": list(range(100)), "c": c,
                                               "label": [i % 3 for i in range(100)]})
    split, _ = _load(source="parquet", path=path)
    assert torch.equal(split.train.tensors[0][:, 1], torch.zeros(80))
    assert torch.equal(split.val.tensors[0][:, 1], torch.ones(20))


def test_synthetic_classes_are_deterministic_and_learnable():
    split, facts = _load(source="synthetic", num_features=4, num_classes=4, samples=800)
    again, _ = _load(source="synthetic", num_features=4, num_classes=4, samples=800)
    assert all(torch.equal(a, b) for a, b in zip(split.train.tensors, again.train.tensors))
    x, y = split.train.tensors
    assert x.shape == (facts.num_train, 4) and set(y.tolist()) == {0, 1, 2, 3}
    # Nearest class mean, a linear classifier, is far above chance (25%) on val.
    centers = torch.stack([x[y == c].mean(0) for c in range(4)])
    xv, yv = split.val.tensors
    accuracy = (torch.cdist(xv, centers).argmin(1) == yv).float().mean()
    assert accuracy > 0.6


def test_synthetic_tokens_continue_arithmetic_sequences():
    split, facts = _load(source="synthetic", kind="tokens", samples=200, seq_len=12, vocab_size=20)
    x, y = split.train.tensors
    assert x.shape == y.shape == (facts.num_train, 11) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    step = (y - x) % 20
    assert torch.equal(step, step[:, :1].expand_as(step))  # one step per row
    assert set(step[:, 0].tolist()) == {1, 2, 3}
    again, _ = _load(source="synthetic", kind="tokens", samples=200, seq_len=12, vocab_size=20)
    assert torch.equal(x, again.train.tensors[0])


def test_parquet_classification_round_trip_across_files(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for part, ids in (("b", range(10, 20)), ("a", range(10))):
        _write(folder / f"{part}.parquet", {"id": list(ids), "unused": [0.5] * 10,
                                            "label": [i % 4 for i in ids]})
    split, facts = _load(source="parquet", path=str(folder), feature_columns=["id"],
                         normalize=False)
    assert facts.input_shape == (1,)
    rows = sorted(zip(_ids(split.train) + _ids(split.val),
                      split.train.tensors[1].tolist() + split.val.tensors[1].tolist()))
    assert rows == [(i, i % 4) for i in range(20)]
    assert split.train.tensors[1].dtype == torch.int64


def test_parquet_tokens_round_trip_takes_the_first_seq_len_tokens(tmp_path):
    sequences = [[r * 10 + t for t in range(8 + r % 3)] for r in range(10)]  # 8 to 10 tokens
    path = _write(tmp_path / "tok.parquet", {"tokens": sequences})
    split, facts = _load(source="parquet", kind="tokens", path=path, seq_len=8, vocab_size=100)
    assert facts.input_shape == (7,)
    x = torch.cat([split.train.tensors[0], split.val.tensors[0]])
    y = torch.cat([split.train.tensors[1], split.val.tensors[1]])
    seen = sorted(torch.cat([x, y[:, -1:]], dim=1).tolist())
    assert seen == [s[:8] for s in sequences]
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_parquet_token_rows_shorter_than_seq_len_are_a_usage_error(tmp_path):
    path = _write(tmp_path / "tok.parquet", {"tokens": [[1, 2, 3, 4], [1, 2]]})
    with pytest.raises(UsageError, match="1 rows") as info:
        _load(source="parquet", kind="tokens", path=path, seq_len=3, val_fraction=0.5)
    assert info.value.key == "data.tokens_column"


def test_parquet_token_ids_outside_the_vocabulary_are_a_usage_error(tmp_path):
    path = _write(tmp_path / "tok.parquet", {"tokens": [[1, 2, 70], [1, 2, 3]]})
    with pytest.raises(UsageError, match="0..63") as info:
        _load(source="parquet", kind="tokens", path=path, seq_len=3, val_fraction=0.5)
    assert info.value.key == "data.vocab_size"


def test_non_numeric_feature_columns_are_a_usage_error(tmp_path):
    path = _write(tmp_path / "rows.parquet", {"name": ["a", "b"], "x": [1.0, 2.0], "label": [0, 1]})
    with pytest.raises(UsageError, match="'name'") as info:
        _load(source="parquet", path=path, val_fraction=0.5)
    assert info.value.key == "data.feature_columns"


def test_rows_changed_since_the_plan_are_a_usage_error(tmp_path, id_file):
    cfg = DataConfig(source="parquet", path=id_file)
    facts = describe(cfg)
    _write(id_file, {"id": [1, 2], "b": [0.0, 1.0], "label": [0, 1]})
    with pytest.raises(UsageError, match="plan the run again") as info:
        load_split(cfg, facts)
    assert info.value.key == "data.path"
