"""Streaming Parquet by rank (data.streaming): which rows each rank owns, the epoch
order, the sampler's exactly-once and resume guarantees, the reader, and the training
statistics a streamed run normalises with."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from launcher.data.datasets import _feature_stats, load_split
from launcher.data.facts import describe
from launcher.data.splits import split_indices
from launcher.data.stream_rows import RowGroupReader, StreamSampler, streamed_split
from launcher.data.streaming import epoch_order, rank_rows, train_rows_per_rank
from launcher.errors import UsageError
from launcher.recipe import DataConfig, Recipe
from tests.unit.test_plan import plan


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """576 rows of 4 features, in two files of row groups of 48 rows (12 groups)."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(576, 4)) * [1, 2, 3, 4] + [0, 1, 2, 3]
    table = pa.table({**{f"f{i}": x[:, i].astype(np.float32) for i in range(4)},
                      "label": rng.integers(0, 3, size=576)})
    pq.write_table(table.slice(0, 288), root / "a.parquet", row_group_size=48)
    pq.write_table(table.slice(288), root / "b.parquet", row_group_size=48)
    return root


def config(files, **data) -> DataConfig:
    return DataConfig(source="parquet", path=str(files), streaming=True, **data)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_own_disjoint_rows_that_cover_every_split(files, world_size):
    cfg = config(files, val_fraction=0.2, test_fraction=0.1)
    facts = describe(cfg)
    assert facts.row_groups == (48,) * 12
    every = [rank_rows(cfg, facts, rank, world_size) for rank in range(world_size)]
    train = np.concatenate([r for mine in every for r in mine.train])
    val = np.concatenate([mine.val for mine in every])
    test = np.concatenate([mine.test for mine in every])
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(576))
    # The same split as the whole-table loader's, read by ranks.
    whole = load_split(cfg, facts, test=True)
    assert (len(train), len(val), len(test)) == (len(whole.train), len(whole.val), len(whole.test))
    # Each rank's rows lie in its own row groups: 48-row blocks, dealt round-robin.
    for rank, mine in enumerate(every):
        groups = {int(r) // 48 for part in (*mine.train, mine.val, mine.test) for r in part}
        assert groups <= {g for g in range(12) if g % world_size == rank}


def test_an_epoch_goes_group_by_group_in_an_order_of_its_own(files):
    cfg = config(files)
    mine = rank_rows(cfg, describe(cfg), 1, 2)
    order = epoch_order(mine.train, seed=5, epoch=2, rank=1)
    groups = order // 48
    assert (np.diff(groups) != 0).sum() == len(mine.train) - 1  # each group's rows together
    assert sorted(order.tolist()) == sorted(np.concatenate(mine.train).tolist())
    assert np.array_equal(order, epoch_order(mine.train, seed=5, epoch=2, rank=1))
    assert not np.array_equal(order, epoch_order(mine.train, seed=5, epoch=3, rank=1))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_training_row_once_an_epoch_across_ranks_and_after_a_resume(files, world_size):
    cfg = config(files, val_fraction=0.0)  # 576 rows, 12 equal groups: every world size here divides them
    facts = describe(cfg)
    micro, per_rank = 8, train_rows_per_rank(cfg, facts, world_size)
    assert per_rank * world_size == 576

    def samplers():
        return [StreamSampler(rank_rows(cfg, facts, r, world_size).train, rank=r, micro_batch=micro,
                              batches_per_epoch=per_rank // micro, seed=3) for r in range(world_size)]

    for epoch in (0, 1):
        seen = []
        for first, then in zip(samplers(), samplers(), strict=True):
            first.set_epoch(epoch)
            seen += [i for batch in list(first)[:5] for i in batch]
            then.set_epoch(epoch, start_batch=5)  # a new process resuming after 5 micro-batches
            seen += [i for batch in then for i in batch]
        assert sorted(seen) == list(range(576))


def test_the_reader_returns_the_asked_rows_in_order(files):
    cfg = config(files, normalize=False)
    reader = RowGroupReader(cfg, describe(cfg))
    rows = np.array([300, 5, 47, 48, 575, 5])
    x, y = reader.read(rows)
    table = pq.read_table(files).take(rows)
    assert np.array_equal(x.numpy(), np.column_stack([table.column(f"f{i}").to_numpy() for i in range(4)]))
    assert y.tolist() == table.column("label").to_pylist()


def test_a_streamed_rank_normalises_with_the_training_split_statistics(files):
    cfg = config(files, val_fraction=0.25)
    facts = describe(cfg)
    streamed = streamed_split(cfg, facts, 0, 1, device=torch.device("cpu"))
    whole = load_split(cfg, facts)  # the same rows, read whole: the leakage-guarded statistics
    raw = load_split(config(files, val_fraction=0.25, normalize=False), facts)
    mean, std = _feature_stats(raw.train.tensors[0])
    assert torch.allclose(streamed.train.reader.mean, mean, atol=1e-5)
    assert torch.allclose(streamed.train.reader.std, std, atol=1e-5)
    # The same validation rows, normalised alike (the whole split's in its shuffled order).
    by_row = np.argsort(split_indices(cfg, 576).val)
    x, y = streamed.val.reader.read(streamed.val.rows)
    assert torch.allclose(x, whole.val.tensors[0][by_row], atol=1e-5)
    assert torch.equal(y, whole.val.tensors[1][by_row])


def test_the_plan_gives_every_rank_the_steps_of_the_smallest_share(files):
    # 12 groups over 5 ranks: ranks 0 and 1 own 3 groups (144 rows), the others 2 (96).
    cfg = config(files, val_fraction=0.0)
    recipe = Recipe.model_validate({"data": cfg.model_dump(), "train": {"micro_batch_size": 8, "max_steps": 50,
                                                                     "early_stopping": {"patience": None}}})
    steps = plan(recipe, data=describe(cfg), procs=5).training.steps
    assert steps.per_epoch == 96 * 5 // 40


@pytest.mark.parametrize("data,key", [
    ({"source": "digits", "streaming": True}, "data.streaming"),
    ({"source": "parquet", "path": "x", "streaming": True, "validation": "stratified"}, "data.validation"),
])
def test_streaming_settings_that_cannot_work_are_refused(data, key):
    from launcher.recipe import recipe_from_data
    from launcher.yamlio import SourceMap

    with pytest.raises(UsageError) as info:
        recipe_from_data({"data": data}, SourceMap())
    assert info.value.key == key
