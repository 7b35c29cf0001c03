"""The distributed batch sampler: disjoint shards, per-epoch orders, exact resume."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from launcher.data.sampler import ResumableDistributedSampler

NUM_SAMPLES = 203  # not a multiple of any global batch: there is a tail to drop


def _sampler(rank: int = 0, world_size: int = 1, **kwargs) -> ResumableDistributedSampler:
    settings = {"micro_batch": 4, "batches_per_step": 2, "seed": 7} | kwargs
    return ResumableDistributedSampler(NUM_SAMPLES, rank=rank, world_size=world_size, **settings)


def _epoch(sampler: ResumableDistributedSampler, epoch: int, start_batch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, start_batch)
    return list(sampler)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_share_an_epoch_without_overlap(world_size):
    samplers = [_sampler(rank, world_size) for rank in range(world_size)]
    steps = NUM_SAMPLES // (4 * world_size * 2)
    seen: list[int] = []
    for sampler in samplers:
        batches = _epoch(sampler, 0)
        assert sampler.steps_per_epoch == steps
        assert len(batches) == steps * 2  # the same number of micro-batches on every rank
        assert all(len(batch) == 4 for batch in batches)
        seen += [i for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == steps * 4 * world_size * 2
    assert all(0 <= i < NUM_SAMPLES for i in seen)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("stop_at", [1, 3, 5])
def test_every_sample_once_per_epoch_across_ranks_with_a_resume_mid_epoch(world_size, stop_at):
    """192 samples, which every global batch here divides: each epoch, over all ranks, sees
    each sample exactly once, also when every rank stops after `stop_at` micro-batches and
    new samplers (new processes) resume there; the next epoch too."""
    num = 192

    def ranks() -> list[ResumableDistributedSampler]:
        return [ResumableDistributedSampler(num, rank=r, world_size=world_size, micro_batch=4,
                                            batches_per_step=2, seed=3) for r in range(world_size)]

    for epoch in (4, 5):
        before = [i for sampler in ranks() for batch in _epoch(sampler, epoch)[:stop_at] for i in batch]
        after = [i for sampler in ranks() for batch in _epoch(sampler, epoch, stop_at) for i in batch]
        assert sorted(before + after) == list(range(num))


def test_epochs_have_different_orders_and_each_is_reproducible():
    sampler = _sampler()
    first, second = _epoch(sampler, 0), _epoch(sampler, 1)
    assert first != second
    assert _epoch(_sampler(), 1) == second
    assert _epoch(_sampler(seed=8), 1) != second


@pytest.mark.parametrize("start_batch", [0, 1, 5, 24])
def test_resume_yields_exactly_the_rest_of_the_uninterrupted_epoch(start_batch):
    uninterrupted = _epoch(_sampler(rank=1, world_size=2), 3)
    resumed = _sampler(rank=1, world_size=2)
    resumed.set_epoch(3, start_batch)
    assert len(resumed) == len(uninterrupted) - start_batch
    assert list(resumed) == uninterrupted[start_batch:]


def test_the_epoch_after_a_resumed_one_matches_the_uninterrupted_run():
    """accelerate#2823: a resumed run must not replay another epoch's order."""
    uninterrupted = _sampler()
    expected = [_epoch(uninterrupted, 2), _epoch(uninterrupted, 3)]
    resumed = _sampler()  # a new process, restored at epoch 2, micro-batch 5
    assert [_epoch(resumed, 2, start_batch=5), _epoch(resumed, 3)] == [expected[0][5:], expected[1]]


def test_data_loader_draws_the_sampler_batches():
    sampler = _sampler(rank=1, world_size=2)
    dataset = TensorDataset(torch.arange(NUM_SAMPLES))
    sampler.set_epoch(0, start_batch=2)
    loader = DataLoader(dataset, batch_sampler=sampler)
    assert len(loader) == len(sampler)
    assert [batch.tolist() for (batch,) in loader] == _epoch(_sampler(rank=1, world_size=2), 0)[2:]


def test_too_few_samples_for_one_step_is_an_error():
    with pytest.raises(ValueError, match="do not fill one optimizer step"):
        ResumableDistributedSampler(15, rank=0, world_size=2, micro_batch=4, batches_per_step=2, seed=0)


def test_start_batch_past_the_epoch_or_bad_rank_is_an_error():
    with pytest.raises(ValueError, match="start_batch"):
        _sampler().set_epoch(0, start_batch=_sampler().batches_per_epoch + 1)
    with pytest.raises(ValueError, match="rank 2"):
        _sampler(rank=2, world_size=2)
