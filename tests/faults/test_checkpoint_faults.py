"""Checkpoints survive their faults: a rank SIGKILLed while writing one, a file of one
damaged afterwards (bytes flipped, cut short). `dlaunch run --resume` then goes back to
the newest checkpoint that verifies, says which one it passed over and why, and ends
with the weights of an uninterrupted run (DeepSpeed ZeRO-2, fp32, CPU, two ranks); when
no checkpoint verifies, the run ends with an error that names them. Real processes,
real DeepSpeed checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from launcher.faults import spec
from tests.conftest import dlaunch, kill_after, metrics, only_run_dir, resume_to_identical_weights

pytestmark = pytest.mark.integration

# 10 steps an epoch (as tests/integration/test_resume.py): a resume from step 4 crosses
# into epoch 1, and dropout makes each rank's restored RNG state matter.
RECIPE = """
name: ckpt-faults
model: {{name: mlp, kwargs: {{hidden: [32], dropout: 0.1}}}}
data: {{source: synthetic, samples: 400, num_features: 8, num_classes: 3, val_fraction: 0.2}}
optim: {{lr: 1.0e-2}}
schedule: {{name: cosine, warmup_steps: 3}}
engine: {{name: deepspeed, zero_stage: 2}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 8, grad_accum: 2, max_steps: 12, eval_every: 4, checkpoint_every: 4, keep_last: 2,
        early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, progress: false, report: false}}
"""
ZERO_FILES = "engine/deepspeed"


def train(root: Path, env: dict[str, str] | None = None):
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=root / "runs"))
    result = dlaunch("run", str(recipe), "--procs-per-node", "2", env=env)
    return result, only_run_dir(root / "runs")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every case must end identical to."""
    result, run_dir = train(tmp_path_factory.mktemp("straight"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A run SIGKILLed after step 8, its checkpoints at steps 4 and 8; each case damages
    a copy of it."""
    result, run_dir = train(tmp_path_factory.mktemp("killed"), env=kill_after(8))
    assert result.returncode != 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest", "step-00000004", "step-00000008"]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    """The run copied under ``tmp_path``, its plan pointing at the copy."""
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    plan = json.loads((copy / "plan.json").read_text())
    (copy / "plan.json").write_text(json.dumps({**plan, "run_dir": str(copy)}))
    return copy


def flip_bytes(path: Path) -> str:
    """Damage ``path`` as a bad disk would; what verification says of it."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return "sha256 mismatch"


def cut_short(path: Path) -> str:
    """Damage ``path`` as a full disk would; what verification says of it."""
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    return f"{size // 2} bytes, {size} in the manifest"


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_killed_while_writing_a_checkpoint_resumes_from_the_one_before(straight, tmp_path, rank):
    result, run_dir = train(tmp_path, env=spec({"kind": "kill_in_checkpoint", "rank": rank, "step": 8}))
    assert result.returncode != 0
    checkpoints = run_dir / "checkpoints"
    # Step 8's files were written and never renamed into place: latest still says step 4.
    assert (checkpoints / ".tmp-step-00000008" / ZERO_FILES).is_dir()
    assert not step_dir(run_dir, 8).exists()
    assert (checkpoints / "latest").read_text().strip() == "step-00000004"

    resume_to_identical_weights(run_dir, straight, killed_after=4)
    assert metrics(run_dir, "checkpoint_rejected") == []
    assert not (checkpoints / ".tmp-step-00000008").exists()


@pytest.mark.parametrize("damage,file", [(flip_bytes, "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                                         (cut_short, "mp_rank_00_model_states.pt")])
def test_a_damaged_checkpoint_is_reported_and_the_one_before_resumed(
        straight, killed, tmp_path, damage: Callable[[Path], str], file):
    run_dir = copy_of(killed, tmp_path)
    problem = damage(step_dir(run_dir, 8) / ZERO_FILES / file)

    resumed = resume_to_identical_weights(run_dir, straight, killed_after=4)
    warning = f"checkpoint step-00000008 is corrupt: {ZERO_FILES}/{file}: {problem}; resuming from step-00000004"
    assert [line for line in resumed.stderr.splitlines() if "corrupt" in line] == [f"dlaunch: {warning}"]
    assert warning in (run_dir / "logs" / "rank-0.log").read_text()
    [rejected] = metrics(run_dir, "checkpoint_rejected")
    assert (rejected["checkpoint"], rejected["resuming_from"]) == ("step-00000008", "step-00000004")


def test_a_run_whose_checkpoints_are_all_damaged_ends_with_an_error_naming_them(killed, tmp_path):
    run_dir = copy_of(killed, tmp_path)
    flip_bytes(step_dir(run_dir, 8) / ZERO_FILES / "mp_rank_00_model_states.pt")
    (step_dir(run_dir, 4) / ZERO_FILES / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()

    resumed = dlaunch("run", "--resume", str(run_dir))
    assert resumed.returncode != 0
    assert (f"no checkpoint in {run_dir / 'checkpoints'} verifies: step-00000008 ({ZERO_FILES}/"
            "mp_rank_00_model_states.pt: sha256 mismatch); step-00000004 "
            f"({ZERO_FILES}/zero_pp_rank_0_mp_rank_00_optim_states.pt: missing)") in resumed.stderr
    assert "aside to train from step 0" in resumed.stderr
    assert [r["checkpoint"] for r in metrics(run_dir, "checkpoint_rejected")] == ["step-00000008", "step-00000004"]
    assert metrics(run_dir, "resume") == []
    assert not (run_dir / "model.pt").exists()
