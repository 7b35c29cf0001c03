"""A rank's own Parquet rows as torch batches (``data.streaming``): its row groups read
one at a time, only the columns the run needs, memory-mapped; ``streamed_split`` builds
the training and validation sets, ``StreamSampler`` orders an epoch.

Normalisation statistics come from the training rows of every rank, each rank summing
its own and an all-reduce adding the sums: the statistics the whole-table loader
computes, without any rank reading another's rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from launcher.data.datasets import Split, feature_rows, parquet_columns, token_rows
from launcher.data.facts import DataFacts, parquet_files
from launcher.data.parquet_shards import RowGroups, deal_row_groups, read_rows
from launcher.data.streaming import epoch_order, rank_rows, val_rows_per_rank
from launcher.recipe import DataConfig

Batch = tuple[torch.Tensor, torch.Tensor]
log = logging.getLogger("launcher.data")


class RowGroupReader:
    """Rows by global number, read a row group at a time; the last group read stays in
    memory, since an epoch goes through the rank's groups one after another."""

    def __init__(self, cfg: DataConfig, facts: DataFacts) -> None:
        self.cfg = cfg
        self.shape = facts.input_shape
        self.groups = RowGroups.of(parquet_files(cfg.path or ""))
        self.starts = np.array([g.start for g in self.groups.groups], dtype=np.int64)
        self.columns = parquet_columns(cfg)
        self._cached: tuple[int, Batch] | None = None
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def read(self, rows: np.ndarray) -> Batch:
        """(inputs, targets) of ``rows``, in their order, normalised when the run is."""
        owner = np.searchsorted(self.starts, rows, side="right") - 1
        parts = []
        for group in dict.fromkeys(owner.tolist()):  # each group once, in order of first use
            picked = owner == group
            x, y = self._group(group)
            local = torch.from_numpy(rows[picked] - self.starts[group])
            parts.append((np.flatnonzero(picked), x[local], y[local]))
        where = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        order = torch.empty_like(where)
        order[where] = torch.arange(len(where))
        x = torch.cat([p[1] for p in parts])[order]
        y = torch.cat([p[2] for p in parts])[order]
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return x, y

    def _group(self, group: int) -> Batch:
        if self._cached is None or self._cached[0] != group:
            [table] = read_rows([self.groups.groups[group]], self.columns)
            if self.cfg.kind == "tokens":
                seq = token_rows(self.cfg, table)
                self._cached = (group, (seq[:, :-1], seq[:, 1:]))
            else:
                x, y = feature_rows(self.cfg, table)
                self._cached = (group, (x.reshape(len(x), *self.shape), y))
        return self._cached[1]


class StreamRows(Dataset):
    """Some of a rank's rows. A DataLoader hands ``__getitems__`` a whole micro-batch of
    row numbers (its collate_fn must pass the batch through: ``collate``)."""

    def __init__(self, reader: RowGroupReader, rows: np.ndarray, *, padded: int | None = None,
                 groups: list[np.ndarray] | None = None) -> None:
        self.reader = reader
        self.rows = rows
        self.padded = len(rows) if padded is None else padded
        """Rows every rank evaluates: the largest rank's count, fillers weighing 0."""
        self.groups = groups or [rows]
        """``rows`` by row group: the unit an epoch shuffles."""

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, rows: list[int]) -> Batch:
        return self.reader.read(np.asarray(rows, dtype=np.int64))

    def eval_batches(self, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        filler = self.rows[-1:] if len(self.rows) else self.reader.starts[:1]
        rows = np.concatenate([self.rows, np.repeat(filler, self.padded - len(self.rows))])
        weight = (torch.arange(len(rows)) < len(self.rows)).float()
        for start in range(0, len(rows), batch):
            x, y = self.reader.read(rows[start:start + batch])
            yield x, y, weight[start:start + batch]


def collate(batch: Batch) -> Batch:
    return batch


class StreamSampler(Sampler[list[int]]):
    """A rank's micro-batches of global row numbers: ``epoch_order`` cut to
    ``batches_per_epoch`` micro-batches (the same on every rank); ``set_epoch`` as
    ResumableDistributedSampler's."""

    def __init__(self, train: list[np.ndarray], *, rank: int, micro_batch: int, batches_per_epoch: int,
                 seed: int) -> None:
        self.train, self.rank, self.micro_batch, self.seed = train, rank, micro_batch, seed
        self.batches_per_epoch = batches_per_epoch
        self.epoch = self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.train, seed=self.seed, epoch=self.epoch, rank=self.rank)
        batches = order[:self.batches_per_epoch * self.micro_batch].reshape(self.batches_per_epoch, -1)
        for batch in batches[self.start_batch:]:
            yield batch.tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def streamed_split(cfg: DataConfig, facts: DataFacts, rank: int, world_size: int, *,
                   device: torch.device) -> Split:
    """This rank's training and validation rows; with ``cfg.normalize``, the training
    split's statistics, summed over all ranks (a collective on ``device`` when
    world_size > 1). The test rows are left out: `dlaunch eval` reads them, whole."""
    reader = RowGroupReader(cfg, facts)
    mine = rank_rows(cfg, facts, rank, world_size)
    owners = deal_row_groups(facts.row_groups, world_size)
    log.info("streaming row groups %s of %d", [i for i, owner in enumerate(owners) if owner == rank],
             len(owners))
    if cfg.normalize and cfg.kind == "classification":
        reader.mean, reader.std = _train_stats(reader, mine.train, world_size, device)
    val = StreamRows(reader, mine.val, padded=val_rows_per_rank(cfg, facts, world_size))
    train = StreamRows(reader, np.concatenate(mine.train) if mine.train else np.zeros(0, dtype=np.int64),
                       groups=mine.train)
    return Split(train, val)


def _train_stats(reader: RowGroupReader, groups: list[np.ndarray], world_size: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std of every rank's training rows, per channel for images
    (N, C, H, W), else per feature, as ``datasets._feature_stats`` computes them on the
    whole split: float64 sums of x, x² and the count over this rank's rows, then added
    across ranks."""
    channels = reader.shape[0]
    sums = torch.zeros(2 * channels + 1, dtype=torch.float64)
    for rows in groups:
        if len(rows):
            x = reader.read(rows)[0].double()
            dims = (0, 2, 3) if x.dim() == 4 else (0,)
            sums += torch.cat([x.sum(dim=dims), (x * x).sum(dim=dims), torch.tensor([x.numel() / channels])])
    if world_size > 1:
        on_device = sums.to(device)
        dist.all_reduce(on_device)
        sums = on_device.cpu()
    count = sums[-1]
    mean = sums[:channels] / count
    std = (sums[channels:-1] / count - mean * mean).clamp(min=0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    if len(reader.shape) == 3:
        return mean.view(-1, 1, 1).float(), std.view(-1, 1, 1).float()
    return mean.float(), std.float()
