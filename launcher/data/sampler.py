"""A distributed batch sampler whose order is a function of (seed, epoch) alone.

A run resumed in epoch n must replay epoch n's order, not the order that the global RNG
happens to produce after restoring (huggingface/accelerate#2823: a resumed loader ignored
``set_epoch`` and yielded epoch n+1's sequence). Here each epoch's permutation comes from
its own generator seeded with ``seed + epoch``, and a resume only skips micro-batches of
that same order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[list[int]]):
    """Micro-batches of dataset indices for one rank; pass as ``DataLoader(batch_sampler=...)``.

    Every epoch keeps ``steps_per_epoch`` whole optimizer steps' worth of samples (the
    tail that cannot fill a step is dropped), so every rank sees the same number of
    micro-batches and no collective waits on a rank that ran out. Micro-batch ``i`` of an
    epoch is the ``i``-th chunk of ``micro_batch * world_size`` samples of its permutation,
    of which rank ``r`` takes the ``r``-th slice. As with DistributedSampler, call
    ``set_epoch`` before each epoch.
    """

    def __init__(self, num_samples: int, *, rank: int, world_size: int, micro_batch: int,
                 batches_per_step: int, seed: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if micro_batch < 1 or batches_per_step < 1:
            raise ValueError("micro_batch and batches_per_step must be positive")
        samples_per_step = micro_batch * world_size * batches_per_step
        self.steps_per_epoch = num_samples // samples_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_samples} samples do not fill one optimizer step of "
                             f"{samples_per_step}")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.micro_batch = micro_batch
        self.batches_per_epoch = self.steps_per_epoch * batches_per_step
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` next, skipping its first ``start_batch`` micro-batches
        (those a resumed run has already trained on)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is not in 0..{self.batches_per_epoch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        used = self.batches_per_epoch * self.world_size * self.micro_batch
        batches = order[:used].view(self.batches_per_epoch, self.world_size, self.micro_batch)
        for batch in batches[self.start_batch:, self.rank]:
            yield batch.tolist()

    def __len__(self) -> int:
        """Micro-batches left in the current epoch."""
        return self.batches_per_epoch - self.start_batch


class EpochKeys(Sampler[list[tuple[int, int]]]):
    """``sampler``'s micro-batches as (epoch, index) keys, for datasets whose samples are
    random per epoch (augmented images): a DataLoader worker gets the epoch with each
    index, which a copy of the dataset in a persistent worker could not learn otherwise."""

    def __init__(self, sampler: ResumableDistributedSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(epoch, index) for index in batch]

    def __len__(self) -> int:
        return len(self.sampler)
