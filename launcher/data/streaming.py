"""Which rows each rank streams (``data.streaming``): the planner and every rank compute
it alike from the row-group sizes (Parquet footers) and the recipe, reading no row.

A rank owns the row groups ``deal_row_groups`` gives it and trains on the training rows
among them; an epoch goes through its groups in a shuffled order, the rows of each
group shuffled, so that it holds one group in memory at a time. Every rank must run the
same number of steps, so an epoch is as long as the smallest rank's share allows; with
groups of equal size (as `dlaunch data prepare` writes them) nothing is left out.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from launcher.data.facts import DataFacts
from launcher.data.parquet_shards import deal_row_groups
from launcher.data.splits import split_indices
from launcher.recipe import DataConfig


class RankRows(NamedTuple):
    train: list[np.ndarray]
    """The training rows of each of the rank's row groups (global row numbers, in order)."""
    val: np.ndarray
    """The rank's validation rows."""
    test: np.ndarray
    """The rank's test rows."""


def rank_rows(cfg: DataConfig, facts: DataFacts, rank: int, world_size: int) -> RankRows:
    starts = np.cumsum([0, *facts.row_groups])
    owners = deal_row_groups(facts.row_groups, world_size)
    split = split_indices(cfg, facts.num_rows)  # numpy's shuffle: the planner has no torch
    part = np.zeros(facts.num_rows, dtype=np.int8)  # 0 train, 1 val, 2 test
    part[split.val], part[split.test] = 1, 2
    groups = [np.arange(starts[i], starts[i + 1]) for i, owner in enumerate(owners) if owner == rank]
    mine = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
    return RankRows([g[part[g] == 0] for g in groups], mine[part[mine] == 1], mine[part[mine] == 2])


def train_rows_per_rank(cfg: DataConfig, facts: DataFacts, world_size: int) -> int:
    """Training rows every rank has: the smallest rank's."""
    return min(sum(len(g) for g in rank_rows(cfg, facts, rank, world_size).train)
               for rank in range(world_size))


def val_rows_per_rank(cfg: DataConfig, facts: DataFacts, world_size: int, split: str = "val") -> int:
    """The largest rank's validation (or test) rows: every rank evaluates that many, its
    own and then padding that weighs nothing."""
    return max(len(getattr(rank_rows(cfg, facts, rank, world_size), split)) for rank in range(world_size))


def epoch_order(train: list[np.ndarray], *, seed: int, epoch: int, rank: int) -> np.ndarray:
    """A rank's training rows in epoch ``epoch``'s order: its groups shuffled, then the
    rows within each group; a function of (seed, epoch, rank) alone, so a resume replays it."""
    rng = np.random.default_rng([seed % 2**64, epoch, rank])
    order = [train[i][rng.permutation(len(train[i]))] for i in rng.permutation(len(train))]
    return np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
