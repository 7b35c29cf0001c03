"""Validation strategies: disjoint splits that cover every row, k folds that validate
every row once, stratified shares, walk-forward order, sizes known before the rows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from launcher.data.splits import split_indices, split_sizes
from launcher.errors import UsageError
from launcher.recipe import DataConfig, load_recipe

STRATEGIES = ("holdout", "stratified", "kfold", "stratified_kfold", "walk_forward")
ROWS, SEEDS, TEST_FRACTIONS = (12, 37, 100, 1001), (0, 1, -7), (0.0, 0.15)
CASES = list(itertools.product(ROWS, SEEDS, TEST_FRACTIONS))


def _labels(num_rows: int, seed: int) -> np.ndarray:
    """Four classes of very different sizes (55%, 25%, 15%, 5%), in random row order."""
    return np.random.default_rng(seed % 100).choice(4, num_rows, p=[0.55, 0.25, 0.15, 0.05])


def _split(num_rows: int, seed: int, **settings):
    cfg = DataConfig(split_seed=seed, **settings)
    return split_indices(cfg, num_rows, labels=_labels(num_rows, seed)), split_sizes(cfg, num_rows)


def _class_counts(rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels[rows], minlength=4)


@pytest.mark.parametrize("validation", STRATEGIES)
@pytest.mark.parametrize(("num_rows", "seed", "test_fraction"), CASES)
def test_train_val_and_test_are_disjoint_cover_every_row_and_have_the_planned_sizes(
        validation, num_rows, seed, test_fraction):
    for fold in (0, 2):
        rows, sizes = _split(num_rows, seed, validation=validation, folds=3, fold=fold,
                             test_fraction=test_fraction)
        train, val, test = (set(part.tolist()) for part in rows)
        assert (len(train), len(val), len(test)) == tuple(map(len, rows)) == sizes  # no repeats
        assert len(train | val | test) == len(train) + len(val) + len(test)  # disjoint
        if validation != "walk_forward" or fold == 2:  # earlier windows leave out their future
            assert train | val | test == set(range(num_rows))
        assert len(val) > 0 and len(train) > 0
        assert len(test) == (0 if test_fraction == 0 else max(1, round(num_rows * test_fraction)))


@pytest.mark.parametrize("validation", STRATEGIES)
def test_splits_follow_the_split_seed_only(validation):
    first, _ = _split(200, 3, validation=validation, test_fraction=0.1)
    again, _ = _split(200, 3, validation=validation, test_fraction=0.1)
    other = split_indices(DataConfig(validation=validation, test_fraction=0.1, split_seed=4), 200,
                          labels=_labels(200, 3))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    if validation != "walk_forward":  # which has nothing to shuffle
        assert set(first.val.tolist()) != set(other.val.tolist())
        assert set(first.test.tolist()) != set(other.test.tolist())


@pytest.mark.parametrize("validation", ["kfold", "stratified_kfold"])
@pytest.mark.parametrize("folds", [2, 3, 5])
@pytest.mark.parametrize(("num_rows", "seed", "test_fraction"), CASES)
def test_the_k_validation_folds_partition_the_rows_the_test_split_leaves(
        validation, folds, num_rows, seed, test_fraction):
    splits = [_split(num_rows, seed, validation=validation, folds=folds, fold=fold,
                     test_fraction=test_fraction)[0] for fold in range(folds)]
    test = splits[0].test
    assert all(np.array_equal(split.test, test) for split in splits)  # one test split for all folds
    validated = np.concatenate([split.val for split in splits])
    pool = sorted(set(range(num_rows)) - set(test.tolist()))
    assert sorted(validated.tolist()) == pool  # every row validated exactly once
    for split in splits:  # and trained on in every other fold
        assert sorted([*split.train.tolist(), *split.val.tolist()]) == pool
    sizes = sorted(len(split.val) for split in splits)
    assert sizes[-1] - sizes[0] <= 1


@pytest.mark.parametrize(("num_rows", "seed", "test_fraction"), CASES)
def test_stratified_holdout_keeps_every_class_share_within_one_row(num_rows, seed, test_fraction):
    labels = _labels(num_rows, seed)
    rows, _ = _split(num_rows, seed, validation="stratified", val_fraction=0.3,
                     test_fraction=test_fraction)
    everyone, pool = np.arange(num_rows), np.concatenate([rows.train, rows.val])
    exact_test = _class_counts(everyone, labels) * len(rows.test) / num_rows
    assert np.all(np.abs(_class_counts(rows.test, labels) - exact_test) < 1)
    exact_val = _class_counts(pool, labels) * len(rows.val) / len(pool)
    assert np.all(np.abs(_class_counts(rows.val, labels) - exact_val) < 1)


@pytest.mark.parametrize("folds", [2, 3, 5])
@pytest.mark.parametrize(("num_rows", "seed", "test_fraction"), CASES)
def test_stratified_folds_keep_every_class_share_within_one_row(folds, num_rows, seed, test_fraction):
    labels = _labels(num_rows, seed)
    for fold in range(folds):
        rows, _ = _split(num_rows, seed, validation="stratified_kfold", folds=folds, fold=fold,
                         test_fraction=test_fraction)
        pool = np.concatenate([rows.train, rows.val])
        exact = _class_counts(pool, labels) / folds
        assert np.all(np.abs(_class_counts(rows.val, labels) - exact) < 1)


def _time_positions(rows, times: np.ndarray | None):
    """Each split's rows as positions in time order."""
    rank = np.empty(len(times), dtype=int)
    rank[np.argsort(times, kind="stable")] = np.arange(len(times))
    return [rank[part] for part in rows]


@pytest.mark.parametrize("gap", [0, 2])
@pytest.mark.parametrize("shuffled_times", [False, True])
@pytest.mark.parametrize("folds", [2, 3, 5])
@pytest.mark.parametrize(("num_rows", "seed", "test_fraction"), [c for c in CASES if c[0] > 12])
def test_walk_forward_validates_on_consecutive_windows_later_than_their_training_rows(
        gap, shuffled_times, folds, num_rows, seed, test_fraction):
    times = np.arange(num_rows) * 10.0
    if shuffled_times:  # rows stored out of time order: the time column orders them
        times = np.random.default_rng(seed % 100).permutation(times)
    cfg = DataConfig(validation="walk_forward", folds=folds, gap=gap, test_fraction=test_fraction)
    window_end = None
    for fold in range(folds):
        cfg = cfg.model_copy(update={"fold": fold})
        rows = split_indices(cfg, num_rows, times=times if shuffled_times else None)
        train, val, test = _time_positions(rows, times)
        assert np.array_equal(np.sort(train), np.arange(len(train)))  # everything before ...
        assert np.array_equal(np.sort(val), np.arange(len(val)) + len(train) + gap)  # ... the window
        if window_end is not None:
            assert val.min() == window_end  # windows follow each other
        window_end = val.max() + 1
        assert np.array_equal(np.sort(test), np.arange(num_rows - len(test), num_rows))  # the latest
    assert window_end == num_rows - len(test)  # the last window ends where the test split starts


def test_walk_forward_trains_on_more_rows_at_every_fold():
    cfg = DataConfig(validation="walk_forward", folds=4)
    sizes = [split_sizes(cfg.model_copy(update={"fold": fold}), 103) for fold in range(4)]
    # As TimeSeriesSplit: 103 // 5 = 20 rows per window, 23 rows before the first.
    assert [s.num_train for s in sizes] == [23, 43, 63, 83]
    assert {s.num_val for s in sizes} == {20}


@pytest.mark.parametrize(("settings", "num_rows", "key"), [
    ({"validation": "kfold", "folds": 5}, 4, "data.folds"),
    ({"validation": "kfold", "folds": 5, "test_fraction": 0.5}, 8, "data.folds"),
    ({"validation": "walk_forward", "folds": 5}, 5, "data.folds"),
    ({"validation": "walk_forward", "folds": 2, "gap": 4}, 12, "data.gap"),
    ({"val_fraction": 0.45, "test_fraction": 0.45}, 2, "data.val_fraction"),
])
def test_too_few_rows_for_the_split_is_a_usage_error(settings, num_rows, key):
    with pytest.raises(UsageError) as info:
        split_sizes(DataConfig(**settings), num_rows)
    assert info.value.key == key


@pytest.mark.parametrize(("overrides", "key", "message"), [
    (["data.validation=kfold", "data.folds=3", "data.fold=3"], "data.fold", "0..2"),
    (["data.fold=1"], "data.fold", "holdout makes one split"),
    (["data.source=synthetic", "data.kind=tokens", "data.validation=stratified_kfold"],
     "data.validation", "no classes"),
    (["data.val_fraction=0.5", "data.test_fraction=0.5"], "data.test_fraction", "no rows to train"),
    (["data.validation=kfold", "data.gap=3"], "data.gap", "walk_forward"),
    (["data.source=parquet", "data.path=x", "data.time_column=t"], "data.time_column", "walk_forward"),
    (["data.validation=walk_forward", "data.time_column=t"], "data.time_column", "Parquet"),
])
def test_split_settings_the_strategy_cannot_use_are_refused(overrides, key, message):
    with pytest.raises(UsageError, match=message) as info:
        load_recipe(None, overrides)
    assert info.value.key == key


def test_every_fold_of_every_strategy_is_a_valid_recipe():
    for validation, fold in (("kfold", 4), ("stratified_kfold", 0), ("walk_forward", 4)):
        recipe, _ = load_recipe(None, [f"data.validation={validation}", f"data.fold={fold}",
                                       "data.test_fraction=0.1"])
        assert recipe.data.fold == fold
