"""The trainer's batches, from whichever loader the recipe names (``data.loader``).

``train_batches`` gives one rank's training micro-batches in the resumable sampler's
order, through a torch DataLoader, a DALI pipeline, or (rows already in memory) by
indexing the tensors; ``eval_batches`` gives one rank's
share of an evaluation split with a weight per row, the same number of batches on every
rank (under ZeRO-3 and FSDP a forward pass is a collective), padded rows weighing 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from launcher.data.image_rows import ImageRows
from launcher.data.sampler import EpochKeys, ResumableDistributedSampler
from launcher.data.stream_rows import StreamRows, StreamSampler, collate
from launcher.recipe import DataConfig

Batch = tuple[torch.Tensor, torch.Tensor]
WeightedBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TrainBatches(Protocol):
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` next, from its micro-batch ``start_batch``."""
        ...

    def __iter__(self) -> Iterator[Batch]: ...


class TorchBatches:
    """A DataLoader over the sampler's micro-batches."""

    def __init__(self, dataset: Dataset, sampler: Sampler[list[int]], cfg: DataConfig, *,
                 on_gpu: bool, seed: int) -> None:
        self.sampler = sampler
        workers = cfg.num_workers
        streamed = isinstance(dataset, StreamRows)  # its __getitems__ returns a whole batch
        # A generator of its own: creating a DataLoader iterator draws a worker seed,
        # which from the global RNG would shift dropout after every resume.
        self.loader = DataLoader(
            dataset, batch_sampler=EpochKeys(sampler) if isinstance(dataset, ImageRows) else sampler,
            num_workers=workers, pin_memory=on_gpu if cfg.pin_memory is None else cfg.pin_memory,
            prefetch_factor=cfg.prefetch_factor, persistent_workers=cfg.persistent_workers and workers > 0,
            generator=torch.Generator().manual_seed(seed), collate_fn=collate if streamed else None)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.loader)


class TensorBatches:
    """The sampler's micro-batches of an in-memory TensorDataset, each taken by indexing
    its tensors once: the rows, in the order, that a DataLoader without workers gives,
    without its per-row ``__getitem__`` and collate (up to 2% of a 65 ms step in one A/B
    run; within the spread of bench/trainer_overhead.py)."""

    def __init__(self, dataset: TensorDataset, sampler: Sampler[list[int]], *, pin_memory: bool) -> None:
        self.tensors = dataset.tensors
        self.sampler = sampler
        self.pin_memory = pin_memory

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[Batch]:
        for rows in self.sampler:
            index = torch.as_tensor(rows)
            inputs, targets = (tensor[index] for tensor in self.tensors)
            yield (inputs.pin_memory(), targets.pin_memory()) if self.pin_memory else (inputs, targets)


def train_batches(dataset: Dataset, cfg: DataConfig, *, rank: int, world_size: int, micro_batch: int,
                  batches_per_step: int, steps_per_epoch: int, on_gpu: bool, seed: int) -> TrainBatches:
    """One rank's training micro-batches: ``steps_per_epoch`` optimizer steps' worth an
    epoch, in the order of the resumable sampler (or, streaming, the rank's own)."""
    if isinstance(dataset, StreamRows):
        sampler = StreamSampler(dataset.groups, rank=rank, micro_batch=micro_batch,
                                batches_per_epoch=steps_per_epoch * batches_per_step, seed=seed)
        return TorchBatches(dataset, sampler, cfg, on_gpu=on_gpu, seed=seed + rank)
    sampler = ResumableDistributedSampler(len(dataset), rank=rank, world_size=world_size, micro_batch=micro_batch,
                                          batches_per_step=batches_per_step, seed=seed)
    if sampler.steps_per_epoch != steps_per_epoch:
        raise RuntimeError(f"the data gives {sampler.steps_per_epoch} steps an epoch, the plan "
                           f"{steps_per_epoch}; did the data change since the run was planned?")
    if cfg.loader == "dali":
        assert isinstance(dataset, ImageRows)  # the recipe and the data facts allow DALI for images only
        from launcher.data.dali_loader import DaliTrainLoader, dali_device

        return DaliTrainLoader(dataset.encoded, dataset.labels.numpy(),
                               sampler, dataset.augment, seed=dataset.seed, mean=dataset.mean.flatten().tolist(),
                               std=dataset.std.flatten().tolist(), num_threads=cfg.dali.num_threads,
                               prefetch_queue_depth=cfg.dali.prefetch_queue_depth,
                               device_id=dali_device() if on_gpu else None)
    if isinstance(dataset, TensorDataset) and cfg.num_workers == 0:
        return TensorBatches(dataset, sampler, pin_memory=on_gpu if cfg.pin_memory is None else cfg.pin_memory)
    return TorchBatches(dataset, sampler, cfg, on_gpu=on_gpu, seed=seed + rank)


def eval_batches(dataset: Dataset, cfg: DataConfig, *, rank: int, world_size: int, batch: int,
                 on_gpu: bool = False) -> Iterator[WeightedBatch]:
    """Rank ``rank``'s rows of ``dataset`` (rank, rank + world_size, ...; DALI shards
    its own way; a streaming rank evaluates its own rows), each batch with the weight of
    each row."""
    if isinstance(dataset, StreamRows):
        return dataset.eval_batches(batch)
    # DALI's file reader shards the files of an image folder; encoded images from a
    # Parquet column are evaluated by the torch path (the views are the same).
    if cfg.loader == "dali" and isinstance(dataset, ImageRows) and isinstance(dataset.files[0], str):
        from launcher.data.dali_loader import dali_device, dali_eval_batches

        return dali_eval_batches(dataset.files, dataset.labels.numpy(), rank=rank, world_size=world_size,
                                 batch=batch, size=dataset.size, mean=dataset.mean.flatten().tolist(),
                                 std=dataset.std.flatten().tolist(), num_threads=cfg.dali.num_threads,
                                 device_id=dali_device() if on_gpu else None)
    per_rank = math.ceil(len(dataset) / world_size)
    index = torch.arange(rank, per_rank * world_size, world_size)
    weight = (index < len(dataset)).float()
    index = index.clamp(max=len(dataset) - 1)
    chunks = list(torch.arange(per_rank).split(batch))
    if isinstance(dataset, TensorDataset):
        inputs, targets = dataset.tensors
        return ((inputs[index[rows]], targets[index[rows]], weight[rows]) for rows in chunks)
    loader = DataLoader(dataset, batch_sampler=[index[rows].tolist() for rows in chunks],
                        num_workers=cfg.num_workers)
    return ((x, y, weight[rows]) for (x, y), rows in zip(loader, chunks, strict=True))
