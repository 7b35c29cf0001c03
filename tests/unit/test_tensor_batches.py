"""In-memory rows are batched by indexing their tensors: the same micro-batches, in the
same order, as the DataLoader they replace, whole epochs and resumed ones alike."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from launcher.data.loaders import TensorBatches, TorchBatches, train_batches
from launcher.data.sampler import ResumableDistributedSampler
from launcher.recipe import DataConfig


def batches_both_ways(epoch: int, start_batch: int) -> tuple[list, list]:
    dataset = TensorDataset(torch.randn(103, 3, 5), torch.randint(0, 4, (103,)))

    def sampler() -> ResumableDistributedSampler:
        return ResumableDistributedSampler(len(dataset), rank=1, world_size=2, micro_batch=4, batches_per_step=2,
                                           seed=7)

    indexed = TensorBatches(dataset, sampler(), pin_memory=False)
    loaded = TorchBatches(dataset, sampler(), DataConfig(), on_gpu=False, seed=7)
    for batches in (indexed, loaded):
        batches.set_epoch(epoch, start_batch)
    return list(indexed), list(loaded)


def test_indexed_batches_are_the_dataloaders_in_whole_and_resumed_epochs():
    for epoch, start_batch in ((0, 0), (1, 0), (2, 5)):
        indexed, loaded = batches_both_ways(epoch, start_batch)
        assert len(indexed) == len(loaded) > 0
        for (x, y), (x_loaded, y_loaded) in zip(indexed, loaded, strict=True):
            assert torch.equal(x, x_loaded) and torch.equal(y, y_loaded)
            assert x.dtype == x_loaded.dtype and y.shape == y_loaded.shape


def test_in_memory_rows_without_workers_are_indexed_and_with_workers_loaded():
    dataset = TensorDataset(torch.randn(64, 2), torch.zeros(64, dtype=torch.long))
    common = {"rank": 0, "world_size": 1, "micro_batch": 8, "batches_per_step": 1, "steps_per_epoch": 8,
              "on_gpu": False, "seed": 0}
    assert isinstance(train_batches(dataset, DataConfig(), **common), TensorBatches)
    assert isinstance(train_batches(dataset, DataConfig(num_workers=2), **common), TorchBatches)
