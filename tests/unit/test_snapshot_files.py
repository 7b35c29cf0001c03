"""The snapshots folder of a resumed run: the snapshots its crashed attempt wrote past
the checkpoint it resumes from are dropped (file and index entry), the others kept."""

from __future__ import annotations

import json

import torch

from launcher.snapshots import INDEX, SNAPSHOTS, SnapshotWriter, read_index, snapshot_name


def crashed_run(tmp_path, steps: list[int]):
    """A run dir whose crashed attempt wrote snapshots after ``steps``, and an orphan
    file past the last (its index entry never written)."""
    folder = tmp_path / SNAPSHOTS
    folder.mkdir()
    entries = []
    for cycle, step in enumerate(steps, start=1):
        torch.save({"w": torch.full((2,), float(step))}, folder / snapshot_name(cycle, step))
        entries.append({"file": snapshot_name(cycle, step), "cycle": cycle, "step": step, "lr": 0.0})
    torch.save({"w": torch.zeros(2)}, folder / snapshot_name(len(steps) + 1, steps[-1] + 5))
    (folder / INDEX).write_text(json.dumps({"snapshots": entries}))
    return folder


def test_a_resume_drops_the_snapshots_past_its_checkpoint(tmp_path):
    folder = crashed_run(tmp_path, [8, 20])
    SnapshotWriter(tmp_path, [8, 20, 44], rank=0).forget_after(18)
    assert [entry["step"] for entry in read_index(tmp_path)] == [8]
    assert sorted(p.name for p in folder.iterdir()) == [snapshot_name(1, 8), INDEX]
    assert torch.load(folder / snapshot_name(1, 8))["w"].tolist() == [8.0, 8.0]


def test_a_resume_from_a_snapshot_step_keeps_that_snapshot(tmp_path):
    folder = crashed_run(tmp_path, [8, 20])
    SnapshotWriter(tmp_path, [8, 20, 44], rank=0).forget_after(20)
    assert [entry["step"] for entry in read_index(tmp_path)] == [8, 20]
    assert sorted(p.name for p in folder.iterdir()) == [snapshot_name(1, 8), snapshot_name(2, 20), INDEX]


def test_only_rank_0_touches_the_folder(tmp_path):
    folder = crashed_run(tmp_path, [8, 20])
    before = sorted(p.name for p in folder.iterdir())
    SnapshotWriter(tmp_path, [8, 20, 44], rank=1).forget_after(0)
    assert sorted(p.name for p in folder.iterdir()) == before
