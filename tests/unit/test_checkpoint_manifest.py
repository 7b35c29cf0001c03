"""Checkpoints carry a manifest (each file's size and sha256); a damaged file is found
and named, a resume picks the newest checkpoint that verifies, and pruning never
deletes the only intact one. Real files, written by the real `checkpoint.save` in a
one-rank gloo process group; the engine is a stand-in that writes two files, as
DeepSpeed's save writes its tag folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launcher import checkpoint
from launcher.errors import UsageError
from launcher.manifest import MANIFEST, NO_MANIFEST, verify
from launcher.models.weights import resolve

MODEL_FILE = "engine/deepspeed/mp_rank_00_model_states.pt"
OPTIM_FILE = "engine/deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"


class FilesEngine:
    """Writes what a ZeRO engine's save writes, in shape: a model and an optimizer file."""

    def __init__(self, step: int) -> None:
        self.step = step

    def save(self, directory: Path) -> None:
        (directory / "deepspeed").mkdir(parents=True)
        torch.save({"w": torch.full((64,), float(self.step))}, directory / "deepspeed" / Path(MODEL_FILE).name)
        torch.save({"m": torch.arange(256.0) * self.step}, directory / "deepspeed" / Path(OPTIM_FILE).name)


@pytest.fixture(scope="module", autouse=True)
def one_rank(tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def save(run_dir: Path, step: int, keep_last: int = 5) -> Path:
    return checkpoint.save(run_dir, step, FilesEngine(step), {"step": step}, keep_last)


def run_with(tmp_path: Path, steps: list[int], keep_last: int = 5) -> Path:
    for step in steps:
        save(tmp_path, step, keep_last)
    return tmp_path


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def test_a_saved_checkpoint_lists_every_file_with_its_size_and_sha256(tmp_path):
    saved = save(tmp_path, 4)
    listed = json.loads((saved / MANIFEST).read_text())["files"]
    files = sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert [entry["path"] for entry in listed] == files == sorted(
        [MODEL_FILE, OPTIM_FILE, "rng/rank-0.pt", "trainer.json"])
    for entry in listed:
        data = (saved / entry["path"]).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert verify(saved) == []


def flipped(saved: Path) -> str:
    flip_a_byte(saved / OPTIM_FILE)
    return f"{OPTIM_FILE}: sha256 mismatch"


def truncated(saved: Path) -> str:
    size = (saved / MODEL_FILE).stat().st_size
    truncate(saved / MODEL_FILE)
    return f"{MODEL_FILE}: {size - 10} bytes, {size} in the manifest"


def deleted(saved: Path) -> str:
    (saved / MODEL_FILE).unlink()
    return f"{MODEL_FILE}: missing"


def manifest_deleted(saved: Path) -> str:
    (saved / MANIFEST).unlink()
    return NO_MANIFEST


def manifest_torn(saved: Path) -> str:
    (saved / MANIFEST).write_text('{"files": [{"path": ')
    return f"{MANIFEST}: unreadable"


@pytest.mark.parametrize("damage", [flipped, truncated, deleted, manifest_deleted, manifest_torn])
def test_verify_names_the_damaged_file_and_what_is_wrong(tmp_path, damage):
    saved = save(tmp_path, 4)
    problem = damage(saved)
    assert verify(saved) == [problem]


def test_an_unparsable_trainer_state_is_named_beside_its_hash(tmp_path):
    saved = save(tmp_path, 4)
    state = saved / "trainer.json"
    state.write_text(state.read_text()[:-1] + ",")  # its closing brace lost, its size kept
    assert verify(saved) == ["trainer.json: not JSON", "trainer.json: sha256 mismatch"]


def test_a_size_check_alone_passes_a_flipped_byte_and_catches_a_truncation(tmp_path):
    saved = save(tmp_path, 4)
    flip_a_byte(saved / OPTIM_FILE)
    assert verify(saved, hashes=False) == []
    truncate(saved / MODEL_FILE)
    assert len(verify(saved, hashes=False)) == 1


def test_a_resume_takes_latest_when_it_verifies(tmp_path):
    run = run_with(tmp_path, [4, 8, 12])
    assert checkpoint.choose(run) == checkpoint.Choice(run / "checkpoints" / "step-00000012")


def test_a_resume_passes_over_corrupt_checkpoints_newest_first(tmp_path):
    run = run_with(tmp_path, [4, 8, 12])
    root = run / "checkpoints"
    flip_a_byte(root / "step-00000012" / OPTIM_FILE)
    (root / "step-00000008" / MODEL_FILE).unlink()
    choice = checkpoint.choose(run)
    assert choice.checkpoint == root / "step-00000004"
    assert choice.rejected == (checkpoint.Rejected(root / "step-00000012", (f"{OPTIM_FILE}: sha256 mismatch",)),
                               checkpoint.Rejected(root / "step-00000008", (f"{MODEL_FILE}: missing",)))
    assert choice.warnings() == [
        f"checkpoint step-00000012 is corrupt: {OPTIM_FILE}: sha256 mismatch; resuming from step-00000004",
        f"checkpoint step-00000008 is corrupt: {MODEL_FILE}: missing; resuming from step-00000004"]


def test_when_no_checkpoint_verifies_there_is_none_to_resume_and_the_error_names_them_all(tmp_path):
    run = run_with(tmp_path, [4, 8])
    root = run / "checkpoints"
    truncate(root / "step-00000008" / MODEL_FILE)
    flip_a_byte(root / "step-00000004" / MODEL_FILE)
    choice = checkpoint.choose(run)
    assert choice.checkpoint is None
    assert [r.checkpoint.name for r in choice.rejected] == ["step-00000008", "step-00000004"]
    error = choice.error()
    assert f"step-00000008 ({MODEL_FILE}: " in error and f"step-00000004 ({MODEL_FILE}: sha256 mismatch)" in error
    assert f"move {root} aside to train from step 0" in error


def test_a_run_without_checkpoints_has_nothing_to_reject(tmp_path):
    assert checkpoint.choose(tmp_path) == checkpoint.Choice(None)


def test_a_checkpoint_without_a_manifest_is_resumed_from_with_a_warning(tmp_path):
    """An older dlaunch wrote no manifest (launcher/manifest.py, `loadable`)."""
    run = run_with(tmp_path, [4, 8])
    (run / "checkpoints" / "step-00000008" / MANIFEST).unlink()
    choice = checkpoint.choose(run)
    assert (choice.checkpoint.name, choice.unverified, choice.rejected) == ("step-00000008", True, ())
    assert choice.warnings() == [f"checkpoint step-00000008 has no {MANIFEST} (written by an older dlaunch): "
                                 "resuming from it unverified"]


def test_staging_folders_and_checkpoints_past_latest_are_never_chosen(tmp_path):
    """A save killed before its rename leaves a staging folder (manifest and all, when it
    died just before the rename); one killed between its rename and the pointer's move
    leaves a checkpoint past ``latest``."""
    run = run_with(tmp_path, [4, 8])
    root = run / "checkpoints"
    shutil.copytree(root / "step-00000008", root / ".tmp-step-00000016")
    shutil.copytree(root / "step-00000008", root / "step-00000012")
    assert checkpoint.choose(run).checkpoint == root / "step-00000008"
    (root / "latest").unlink()
    assert checkpoint.choose(run).checkpoint == root / "step-00000012"


def test_the_next_save_removes_every_staging_folder_a_crash_left(tmp_path):
    run = run_with(tmp_path, [4])
    root = run / "checkpoints"
    shutil.copytree(root / "step-00000004", root / ".tmp-step-00000006")
    save(run, 8)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000008"]


def test_pruning_keeps_the_newest_keep_last(tmp_path):
    run = run_with(tmp_path, [4, 8, 12], keep_last=2)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000008", "step-00000012"]


def test_pruning_never_deletes_the_newest_intact_checkpoint(tmp_path):
    run = run_with(tmp_path, [4, 8])
    root = run / "checkpoints"
    truncate(root / "step-00000008" / OPTIM_FILE)
    checkpoint._prune(root, keep_last=1)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000004", "step-00000008"]
    assert checkpoint.choose(run).checkpoint == root / "step-00000004"


def test_latest_is_none_when_its_pointer_names_no_checkpoint(tmp_path):
    run = run_with(tmp_path, [4])
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    assert checkpoint.latest(run) is None


def test_init_from_a_damaged_checkpoint_or_a_staging_folder_is_refused(tmp_path):
    run = run_with(tmp_path, [4, 8])
    root = run / "checkpoints"
    assert resolve(str(root / "step-00000008")).format == "deepspeed"
    flip_a_byte(root / "step-00000008" / OPTIM_FILE)
    with pytest.raises(UsageError, match=f"step-00000008' is corrupt: {OPTIM_FILE}: sha256 mismatch; give another"):
        resolve(str(root / "step-00000008"))
    shutil.copytree(root / "step-00000004", root / ".tmp-step-00000012")
    with pytest.raises(UsageError, match="still being written, or one a crash cut short"):
        resolve(str(root / ".tmp-step-00000012"))
