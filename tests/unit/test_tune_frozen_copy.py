"""The checkpoint a PBT trial hands to Tune: a hard-linked copy of a whole checkpoint, or
none when the run pruned it (wholly or in part) before it was linked."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cluster.tune import _frozen_copy
from launcher.checkpoint import TRAINER_STATE
from launcher.manifest import write_manifest


def checkpoint(root: Path) -> Path:
    step = root / "step-00000050"
    (step / "deepspeed").mkdir(parents=True)
    (step / TRAINER_STATE).write_text('{"step": 50}')
    (step / "deepspeed" / "model_states.pt").write_bytes(b"w" * 1000)
    write_manifest(step)
    return step


def test_a_whole_checkpoint_is_linked_not_copied(tmp_path):
    step = checkpoint(tmp_path)
    frozen = _frozen_copy(step, tmp_path / "frozen")
    assert frozen == tmp_path / "frozen"
    original, linked = step / "deepspeed" / "model_states.pt", frozen / "deepspeed" / "model_states.pt"
    assert os.path.samefile(original, linked)
    # Pruning the run's checkpoint leaves Tune's copy whole.
    shutil.rmtree(step)
    assert linked.read_bytes() == b"w" * 1000


def test_a_pruned_checkpoint_gives_none(tmp_path):
    assert _frozen_copy(tmp_path / "step-00000050", tmp_path / "frozen") is None


def test_a_checkpoint_pruned_in_part_gives_none(tmp_path):
    step = checkpoint(tmp_path)
    (step / "deepspeed" / "model_states.pt").unlink()
    assert _frozen_copy(step, tmp_path / "frozen") is None


def test_a_leftover_copy_from_an_earlier_report_is_replaced(tmp_path):
    step = checkpoint(tmp_path)
    (tmp_path / "frozen" / "stale").mkdir(parents=True)
    frozen = _frozen_copy(step, tmp_path / "frozen")
    assert frozen is not None and not (frozen / "stale").exists()
