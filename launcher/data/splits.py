"""Which rows train, which validate and which are kept for the test: ``split_indices``
picks them, ``split_sizes`` counts them without reading a row.

The planner sizes steps from the counts before any process starts; the loader picks the
rows later. So every count follows from the number of rows and the recipe alone, never
from the labels: a stratified split balances each class within the same totals.

The test rows are carved off first, from all rows and whatever the fold: every fold of
a k-fold run leaves out the same test rows, and no fold trains or validates on them.
Everything is numpy and deterministic from ``split_seed``; only the holdout shuffle may
come from the caller (see ``split_indices``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from launcher.errors import UsageError
from launcher.recipe import DataConfig

Permutation = Callable[[int, int], np.ndarray]
"""``(num_rows, seed) -> a permutation of range(num_rows)``."""

_STRATIFIED = ("stratified", "stratified_kfold")
_TEST_STREAM, _POOL_STREAM = 0, 1


class SplitSizes(NamedTuple):
    num_train: int
    num_val: int
    num_test: int


class SplitIndices(NamedTuple):
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_sizes(cfg: DataConfig, num_rows: int) -> SplitSizes:
    """Rows in each split: the one rule the planner and the loader share."""
    num_test = _share(num_rows, cfg.test_fraction)
    pool = num_rows - num_test
    if cfg.validation in ("kfold", "stratified_kfold"):
        if pool < cfg.folds:
            raise UsageError(f"{pool} rows cannot fill {cfg.folds} folds; lower data.folds",
                             key="data.folds")
        num_val = len(range(cfg.fold, pool, cfg.folds))  # fold f validates rows f, f+K, ...
        return SplitSizes(pool - num_val, num_val, num_test)
    if cfg.validation == "walk_forward":
        return _walk_forward_sizes(cfg, pool, num_test)
    num_val = _share(num_rows, cfg.val_fraction)
    if pool - num_val < 1:
        raise UsageError(f"{num_rows} rows leave none to train on after {num_val} validation "
                         f"and {num_test} test rows", key="data.val_fraction")
    return SplitSizes(pool - num_val, num_val, num_test)


def _share(num_rows: int, fraction: float) -> int:
    """Rows that ``fraction`` of ``num_rows`` stands for: rounded, and at least one when
    the fraction is above 0, so that asking for a split always makes one."""
    count = int(round(num_rows * fraction))
    return max(count, 1) if fraction > 0 else count


def _walk_forward_sizes(cfg: DataConfig, pool: int, num_test: int) -> SplitSizes:
    """As scikit-learn's TimeSeriesSplit: ``folds`` windows of ``pool // (folds + 1)``
    rows end the time line; the first training window takes what is left before them."""
    window = pool // (cfg.folds + 1)
    if window == 0:
        raise UsageError(f"{pool} rows cannot make a training window and {cfg.folds} "
                         f"validation windows; lower data.folds", key="data.folds")
    if pool - cfg.folds * window - cfg.gap < 1:  # fold 0 trains on the fewest rows
        raise UsageError(f"a gap of {cfg.gap} rows leaves fold 0 nothing to train on",
                         key="data.gap")
    num_train = pool - (cfg.folds - cfg.fold) * window - cfg.gap
    return SplitSizes(num_train, window, num_test)


def seeded_permutation(num_rows: int, seed: int) -> np.ndarray:
    """numpy's seeded shuffle, the holdout's unless the caller passes another."""
    return _rng(seed, _POOL_STREAM).permutation(num_rows)


def split_indices(cfg: DataConfig, num_rows: int, *, labels: np.ndarray | None = None,
                  times: np.ndarray | None = None,
                  permutation: Permutation = seeded_permutation) -> SplitIndices:
    """The (train, val, test) row indices of ``num_rows`` rows, sized by ``split_sizes``.

    ``labels`` (one class per row) are needed by the stratified strategies; ``times``
    (any sortable values) give walk_forward its time order, the row order when None.
    ``permutation`` shuffles the rows a holdout split draws from: the loader passes
    torch's randperm, which drew every split before the other strategies existed, so that
    the runs and checkpoints made then keep their rows.
    """
    sizes = split_sizes(cfg, num_rows)
    if cfg.validation == "walk_forward":
        by_time = np.arange(num_rows) if times is None else np.argsort(times, kind="stable")
        return _walk_forward(cfg, sizes, by_time)
    strata = None
    if cfg.validation in _STRATIFIED:
        if labels is None:
            raise ValueError(f"a {cfg.validation} split needs the labels")
        strata = labels
    test, pool = _carve_test(cfg.split_seed, sizes.num_test, num_rows, strata)
    if cfg.validation == "holdout":
        order = pool[permutation(len(pool), cfg.split_seed)]
        return SplitIndices(order[:sizes.num_train], order[sizes.num_train:], test)
    order = _by_class(pool, strata, _rng(cfg.split_seed, _POOL_STREAM))
    if cfg.validation == "stratified":
        in_val = _mask(len(order), _evenly(sizes.num_val, len(order)))
    else:
        in_val = np.arange(len(order)) % cfg.folds == cfg.fold
    return SplitIndices(order[~in_val], order[in_val], test)


def _rng(seed: int, stream: int) -> np.random.Generator:
    # One independent stream per use; the seed taken modulo 2**64, as torch.manual_seed
    # does, since numpy's seeds cannot be negative.
    return np.random.default_rng([stream, seed % 2**64])


def _carve_test(seed: int, num_test: int, num_rows: int,
                strata: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(test rows, the other rows in row order): a seeded sample, stratified by ``strata``.
    With no test rows the others are range(num_rows), as before test splits existed."""
    order = _by_class(np.arange(num_rows), strata, _rng(seed, _TEST_STREAM))
    in_test = _mask(num_rows, order[_evenly(num_test, num_rows)])
    return np.flatnonzero(in_test), np.flatnonzero(~in_test)


def _by_class(rows: np.ndarray, labels: np.ndarray | None,
              rng: np.random.Generator) -> np.ndarray:
    """``rows`` shuffled, then grouped by class (a stable sort: each class stays shuffled).
    Any rows spread evenly over the result take each class's share within one row."""
    shuffled = rows[rng.permutation(len(rows))]
    if labels is None:
        return shuffled
    return shuffled[np.argsort(labels[shuffled], kind="stable")]


def _evenly(count: int, total: int) -> np.ndarray:
    """``count`` positions spread evenly over range(total), the middles of ``count``
    equal parts: any run of consecutive positions holds its length x count / total of
    them, rounded up or down."""
    return (2 * np.arange(count) + 1) * total // (2 * max(count, 1))


def _mask(size: int, positions: np.ndarray) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[positions] = True
    return mask


def _walk_forward(cfg: DataConfig, sizes: SplitSizes, by_time: np.ndarray) -> SplitIndices:
    """Fold f validates on window f and trains on every row before it (less the gap);
    the test rows are the latest of all."""
    pool = len(by_time) - sizes.num_test
    start = pool - (cfg.folds - cfg.fold) * sizes.num_val
    return SplitIndices(by_time[:start - cfg.gap], by_time[start:start + sizes.num_val],
                        by_time[pool:])
