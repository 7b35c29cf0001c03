"""A run root that cannot take the run directory, found before training: on a full file
system or a read-only one, `dlaunch run` ends with one line `error: logging.run_root ...`
and exit code 2, and leaves nothing behind: no staging directory, no part of a run
directory, no run root it made itself. (A regular file in the way of the run root is
tests/integration/test_cli_errors.py::test_unwritable_run_dir.)

So is one without room for a single checkpoint (launcher/disk_room.py), for a run, a
sweep's largest model or a resume. A disk that fills mid-run is named as the cause of
the failure, and the run resumes once there is room again.

The file systems are real: a 64 KiB tmpfs, filled, grown or remounted read-only.
Mounting needs root, as CI has; elsewhere these tests are skipped and say why."""

from __future__ import annotations

import argparse
import os
import re
import subprocess

import pytest

from cluster.failure import KILLED, rank_failure_report
from launcher import cli, rundir
from launcher.errors import UsageError
from launcher.plan import Topology
from tests.conftest import dlaunch, metrics

pytestmark = pytest.mark.integration

RECIPE = """name: tiny
data: {{source: synthetic, samples: 64, num_features: 4}}
model: {{name: mlp, kwargs: {{hidden: [8]}}}}  # checkpoints of 1 KiB: room for them is not what is tested
precision: {{dtype: fp32}}
train: {{micro_batch_size: 8, max_steps: 2}}
logging:
  run_root: {root}
  progress: false
  report: false
"""


@pytest.fixture
def tiny_fs(tmp_path):
    """A fresh 64 KiB tmpfs, unmounted at the end whatever happened."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(mount, free_pages: int) -> None:
    """Leave exactly ``free_pages`` pages of ``mount`` free."""
    (mount / "filler").unlink(missing_ok=True)
    stats = os.statvfs(mount)
    (mount / "filler").write_bytes(bytes((stats.f_bavail - free_pages) * stats.f_frsize))
    assert os.statvfs(mount).f_bavail == free_pages


def run_on(tmp_path, run_root):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=run_root))
    return dlaunch("run", str(recipe), cwd=tmp_path)


def refused(result, reason: str, run_root) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: logging.run_root (line 7): cannot create run directory '{run_root}/tiny-")
    assert line.endswith(f"': {reason}") and "Traceback" not in result.stderr


def test_a_full_file_system_is_refused_before_training_and_keeps_nothing(tmp_path, tiny_fs):
    fill(tiny_fs, 2)  # room for a checkpoint, and for plan.json, but not for the next file
    refused(run_on(tmp_path, tiny_fs / "runs"), "No space left on device", tiny_fs / "runs")
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["filler"], "a part of the run dir was left"
    assert os.statvfs(tiny_fs).f_bavail == 2


def test_a_file_system_without_room_for_one_checkpoint_is_refused_before_anything_is_written(tmp_path, tiny_fs):
    """The run would train until its first checkpoint and fail there."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=tiny_fs / "runs").replace("hidden: [8]", "hidden: [512, 512]"))
    result = dlaunch("run", str(recipe), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == (f"error: logging.run_root (line 7): the file system of {tiny_fs / 'runs'} has 64.0 KiB "
                             "free, and one checkpoint of this run takes about 4.1 MiB: free space, or put the "
                             "run elsewhere\n")
    assert list(tiny_fs.iterdir()) == []


def test_running_out_of_space_at_any_write_of_the_run_dir_leaves_nothing(tmp_path, tiny_fs):
    """rundir.create, as `dlaunch run` calls it, given one page less each time than the run
    dir needs: each of its writes meets ENOSPC in turn, and each time it all goes."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=tiny_fs / "runs"))
    args = argparse.Namespace(recipe=str(recipe), overrides=[], address=None, script=None, cluster=None,
                              nodes=None, procs_per_node=None)
    plan, _ = cli._make_plan(args, [], "20260101-000000")
    free = os.statvfs(tiny_fs).f_bavail
    made = rundir.create(plan, ["dlaunch", "run"])
    needed = free - os.statvfs(tiny_fs).f_bavail
    written = sorted(p.name for p in made.iterdir())
    assert written == ["ds_config.json", "env.json", "logs", "plan.json", "recipe.yaml"]
    subprocess.run(["rm", "-r", str(tiny_fs / "runs")], check=True)
    assert needed >= len(written) - 1  # a page for each file at least: every write is reached below
    for free_pages in range(needed):
        fill(tiny_fs, free_pages)
        with pytest.raises(UsageError) as info:
            rundir.create(plan, ["dlaunch", "run"])
        assert str(info.value).endswith("': No space left on device")
        assert sorted(p.name for p in tiny_fs.iterdir()) == ["filler"], f"left behind with {free_pages} pages free"


def test_a_read_only_file_system_is_refused_before_training_and_keeps_nothing(tmp_path, tiny_fs):
    (tiny_fs / "runs").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    refused(run_on(tmp_path, tiny_fs / "runs"), "Read-only file system", tiny_fs / "runs")
    assert list((tiny_fs / "runs").iterdir()) == []


def test_a_sweep_whose_largest_model_has_no_room_for_a_checkpoint_is_refused_before_any_trial(tmp_path, tiny_fs):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=tiny_fs / "runs") + """engine: {name: accelerate}
sweep:
  metric: val_loss
  space:
    model.kwargs.hidden: {choice: [[8], [512, 512]]}
""")
    result = dlaunch("sweep", str(recipe), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.fullmatch(rf"error: logging\.run_root \(line 7\): the file system of {tiny_fs}/runs/tiny-sweep-"
                        r"[0-9-]+/trials has 64\.0 KiB free, and one checkpoint of this run takes about 3\.1 MiB: "
                        r"free space, or put the run elsewhere\n", result.stderr), result.stderr
    assert list(tiny_fs.iterdir()) == []


def test_a_grid_whose_largest_point_has_no_room_for_a_checkpoint_is_refused_before_submitting(tmp_path, tiny_fs):
    """The first grid point's model fits; the second's does not. Refused before sbatch."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=tiny_fs / "runs"))
    result = dlaunch("run", str(recipe), "--cluster", "slurm", "--array", "model.kwargs.hidden=[[8], [512, 512]]",
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == (f"error: logging.run_root (line 7): the file system of {tiny_fs / 'runs'} has 64.0 KiB "
                             "free, and one checkpoint of this run takes about 4.1 MiB: free space, or put the "
                             "run elsewhere\n")
    assert list(tiny_fs.iterdir()) == []


def test_a_disk_that_fills_mid_run_is_named_and_the_run_resumes_once_there_is_room(tmp_path, tiny_fs):
    """Room for the run dir and one checkpoint (about 1 MB each), not two: the second
    fails on ENOSPC, and so do the status and log lines that would say so. The report
    names the full file system, not an unexplained death; with room again, the resume
    continues from the checkpoint that was written."""
    subprocess.run(["mount", "-o", "remount,size=2m", str(tiny_fs)], check=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""name: full
data: {{source: synthetic, samples: 256, num_features: 16, num_classes: 4}}
model: {{name: mlp, kwargs: {{hidden: [256, 256]}}}}
train: {{micro_batch_size: 8, max_steps: 20, checkpoint_every: 5, eval_every: 5}}
logging: {{run_root: {tiny_fs / 'runs'}, progress: false, report: false}}
""")
    result = dlaunch("run", str(recipe), "--procs-per-node", "2", cwd=tmp_path)
    assert result.returncode == 1
    [run_dir] = (tiny_fs / "runs").iterdir()
    assert result.stderr.startswith(f"dlaunch: the file system of {tiny_fs / 'runs'} has 2.0 MiB free, and the "
                                    "files this command keeps take up to 4.1 MiB (checkpoints of 973.1 KiB, "
                                    "train.keep_last 3 and the one being written; the final weights, 278.0 KiB): "
                                    "writing them may fail unless room is freed\n"), result.stderr[:3000]
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert error.endswith(f"and the file system of {run_dir} is full (0 bytes free): most likely it failed "
                          f"writing there; free space, and `dlaunch run --resume {run_dir}` continues from "
                          "checkpoint step-00000005"), error

    still_full = dlaunch("run", "--resume", str(run_dir), cwd=tmp_path)
    assert still_full.returncode == 2, still_full.stderr[-3000:]
    assert still_full.stderr.splitlines()[-1] == (f"error: --resume: the file system of {run_dir} has 0 B free, and "
                                                  "one checkpoint of this run takes about 973.1 KiB: free space, or "
                                                  "put the run elsewhere")

    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_fs)], check=True)
    resumed = dlaunch("run", "--resume", str(run_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in metrics(run_dir, "resume")] == [5]
    assert metrics(run_dir, "summary")[0]["steps"] == 20


def test_a_run_whose_snapshots_do_not_fit_beside_its_checkpoints_is_warned_of(tmp_path, tiny_fs):
    """Room for the checkpoints the run keeps (two of 834 KiB), not for them and the
    snapshots and final weights (278 KiB each) it writes as well: the warning counts
    those, and the run fails as it says, at the second checkpoint, after a snapshot."""
    subprocess.run(["mount", "-o", "remount,size=2m", str(tiny_fs)], check=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""name: snapshots
data: {{source: synthetic, samples: 256, num_features: 16, num_classes: 4}}
model: {{name: mlp, kwargs: {{hidden: [256, 256]}}}}
engine: {{name: accelerate}}
precision: {{dtype: fp32}}
schedule: {{name: cosine_restarts, warmup_steps: 0, restart_period: 6, min_lr_ratio: 0.0, snapshots: true}}
train: {{micro_batch_size: 8, max_steps: 24, checkpoint_every: 4, eval_every: 6, keep_last: 1,
        early_stopping: {{patience: null}}}}
logging: {{run_root: {tiny_fs / 'runs'}, progress: false, report: false, tensorboard: false}}
""")
    result = dlaunch("run", str(recipe), cwd=tmp_path)
    assert result.returncode == 1
    [run_dir] = (tiny_fs / "runs").iterdir()
    assert result.stderr.startswith(f"dlaunch: the file system of {tiny_fs / 'runs'} has 2.0 MiB free, and the "
                                    "files this command keeps take up to 3.0 MiB (checkpoints of 834.0 KiB, "
                                    "train.keep_last 1 and the one being written; the final weights, 278.0 KiB; "
                                    "4 snapshots of the weights' size): writing them may fail unless room is "
                                    "freed\n"), result.stderr[:3000]
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert "the file system of" in error and error.endswith("continues from checkpoint step-00000004"), error

    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_fs)], check=True)
    resumed = dlaunch("run", "--resume", str(run_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "snapshots").glob("*.pt")) == [
        f"cycle-0{cycle}-step-000000{6 * cycle:02d}.pt" for cycle in range(1, 5)]
    assert (run_dir / "model.pt").is_file()


def test_a_fold_that_filled_the_disk_is_resumed_through_its_folds_directory(tiny_fs):
    """Resuming the fold alone would leave the folds after it, and their summary, unrun."""
    fold = tiny_fs / "runs" / "cv-20260101-000000-folds" / "fold-1"
    (fold / "checkpoints").mkdir(parents=True)
    (fold / "checkpoints" / "latest").write_text("step-00000005\n")
    fill(tiny_fs, 0)
    topology = Topology(backend="local", nodes=1, procs_per_node=1, world_size=1, device="cpu",
                        dist_backend="gloo", rdzv_timeout=60)
    report = rank_failure_report(str(fold), topology, 0, KILLED)
    assert report.endswith(f"free space, and `dlaunch run --resume {fold.parent}` continues from "
                           "checkpoint step-00000005"), report
