"""Cross-validation and the test split, end to end: `dlaunch run --folds K` trains every
fold and reports mean ± std, and a stopped or failed one resumes from its folds directory;
`dlaunch eval` scores a finished run's weights, and only `--split test` reads the test
rows."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from launcher.data.splits import split_indices
from launcher.recipe import DataConfig
from tests.conftest import dlaunch, kill_after, metrics, only_run_dir, stopped_run

pytestmark = pytest.mark.integration

RECIPE = """
name: cv
model: {{name: mlp, kwargs: {{hidden: [32]}}}}
data: {{source: synthetic, samples: 400, num_features: 8, num_classes: 3, {data}}}
optim: {{lr: 1.0e-2}}
engine: {{name: accelerate}}
precision: {{dtype: fp32}}  # as `dlaunch eval` scores: its losses equal the run's own
train: {{micro_batch_size: 16, max_steps: 15, early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, progress: false, report: false}}
"""


def write(tmp_path, data: str = "val_fraction: 0.2"):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(data=data, root=tmp_path / "runs"))
    return recipe


def test_folds_train_every_fold_and_report_mean_and_std(tmp_path):
    result = dlaunch("run", str(write(tmp_path, "test_fraction: 0.1")), "--folds", "3", "--procs-per-node", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    group = only_run_dir(tmp_path / "runs")
    assert group.name.endswith("-folds")
    run_dirs = [group / f"fold-{f}" for f in range(3)]
    val_rows = []
    for fold, run_dir in enumerate(run_dirs):
        data = json.loads((run_dir / "plan.json").read_text())["recipe"]["data"]
        # A holdout recipe cross-validates with k-fold; the test rows stay out of every fold.
        assert (data["validation"], data["folds"], data["fold"]) == ("kfold", 3, fold)
        rows = split_indices(DataConfig(**data), 400)
        val_rows.append(set(rows.val.tolist()))
        assert metrics(run_dir, "summary"), f"fold {fold} did not finish"
    assert not (val_rows[0] & val_rows[1]) and not (val_rows[1] & val_rows[2])
    assert len(set.union(*val_rows)) == 400 - 40

    accs = [metrics(run_dir, "summary")[0]["val_acc"] for run_dir in run_dirs]
    summary = json.loads((group / "folds.json").read_text())
    assert summary["val_acc"]["mean"] == pytest.approx(statistics.fmean(accs))
    assert summary["val_acc"]["std"] == pytest.approx(float(np.std(accs)))
    assert f"val_acc {statistics.fmean(accs):.4f} ± {np.std(accs):.4f} over 3 folds" in result.stdout


def test_a_folds_run_stopped_midway_resumes_from_its_folds_directory(tmp_path):
    """Ctrl-C in fold 1 of 3: the stop line names the folds directory, and `--resume` of
    it leaves the finished fold 0 alone, continues fold 1 from its checkpoint, trains
    fold 2 and summarizes all three; resumed once more, it has nothing left to run."""
    code, err = stopped_run("run", str(write(tmp_path)), "--folds", "3", "--procs-per-node", "1",
                            "--set", "train.max_steps=600", "--set", "train.checkpoint_every=10",
                            once=lambda: bool(list(tmp_path.glob("runs/*-folds/fold-1/checkpoints/latest"))))
    assert code == 130, err[-3000:]
    group = only_run_dir(tmp_path / "runs")
    checkpoint = (group / "fold-1" / "checkpoints" / "latest").read_text().strip()
    assert err.splitlines()[-1] == (f"dlaunch: interrupted; `dlaunch run --resume {group}` continues it "
                                    f"with fold 1 from checkpoint {checkpoint}, then fold 2")
    assert metrics(group / "fold-0", "summary") and not metrics(group / "fold-1", "summary")
    fold_0 = (group / "fold-0" / "metrics.jsonl").read_bytes()

    resumed = dlaunch("run", "--resume", str(group))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.splitlines()[0] == (f"dlaunch: resuming {group}: fold 1 from checkpoint "
                                              f"{checkpoint}, then fold 2")
    assert (group / "fold-0" / "metrics.jsonl").read_bytes() == fold_0, "the finished fold trained again"
    assert metrics(group / "fold-1", "resume")[0]["step"] == int(checkpoint.removeprefix("step-"))
    accs = []
    for fold in range(3):
        [summary] = metrics(group / f"fold-{fold}", "summary")
        assert summary["step"] == 600, f"fold {fold} stopped at step {summary['step']}"
        accs.append(summary["val_acc"])
    assert json.loads((group / "folds.json").read_text())["val_acc"]["mean"] == pytest.approx(statistics.fmean(accs))
    assert f"val_acc {statistics.fmean(accs):.4f} ± {np.std(accs):.4f} over 3 folds" in resumed.stdout

    again = dlaunch("run", "--resume", str(group))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr == f"dlaunch: {group}: all 3 folds finished; nothing to resume\n"
    assert again.stdout == resumed.stdout


def test_a_failed_fold_ends_the_folds_run_with_the_command_that_continues_them(tmp_path):
    """Fold 0's rank killed after step 5 (no restarts): folds 1 and 2 do not run, and the
    last line says how `--resume` of the folds directory continues all three."""
    result = dlaunch("run", str(write(tmp_path)), "--folds", "3", "--procs-per-node", "1",
                     "--set", "train.checkpoint_every=5", env=kill_after(5))
    assert result.returncode == 1, result.stderr[-3000:]
    group = only_run_dir(tmp_path / "runs")
    assert result.stderr.splitlines()[-1] == (f"dlaunch: fold 0 failed; `dlaunch run --resume {group}` "
                                              "continues the folds with fold 0 from checkpoint "
                                              "step-00000005, then folds 1, 2")
    assert not (group / "fold-1" / "metrics.jsonl").exists() and not (group / "folds.json").exists()


def test_eval_scores_the_final_weights_and_only_test_reads_the_test_split(tmp_path):
    result = dlaunch("run", str(write(tmp_path, "val_fraction: 0.2, test_fraction: 0.25")),
                     "--procs-per-node", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "runs")
    last_eval = metrics(run_dir, "eval")[-1]

    val = dlaunch("eval", str(run_dir))
    assert val.returncode == 0, val.stderr
    scores = json.loads((run_dir / "eval-val.json").read_text())
    # The same rows and weights as the run's own final evaluation (2 ranks there, 1 here).
    assert scores["val_acc"] == pytest.approx(last_eval["val_acc"], abs=1e-9)
    assert scores["val_loss"] == pytest.approx(last_eval["val_loss"], rel=1e-5)
    assert scores["rows"] == 80

    test = dlaunch("eval", str(run_dir), "--split", "test")
    assert test.returncode == 0, test.stderr
    scores = json.loads((run_dir / "eval-test.json").read_text())
    assert scores["rows"] == 100 and 0 <= scores["test_acc"] <= 1
    assert test.stdout.startswith(f"test_loss {scores['test_loss']:.4f}, test_acc {scores['test_acc']:.4f} on 100")


def test_eval_without_a_test_split_or_final_weights_is_one_clear_line(tmp_path):
    result = dlaunch("run", str(write(tmp_path)), "--procs-per-node", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "runs")
    no_test = dlaunch("eval", str(run_dir), "--split", "test")
    assert no_test.returncode == 2
    assert no_test.stderr == "error: --split: the run has no test split: its recipe keeps data.test_fraction at 0\n"
    (run_dir / "model.pt").unlink()
    unfinished = dlaunch("eval", str(run_dir))
    assert unfinished.returncode == 2 and "has no final weights (model.pt)" in unfinished.stderr
    assert len(unfinished.stderr.splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["--folds", "1"], "error: --folds: --folds 1: cross-validation needs 2 or more folds"),
    (["--folds", "3", "--script", "train.py"], "error: --folds: --folds trains the recipe once per fold"),
    (["--folds", "3", "--set", "data.samples=2"], "error: data.folds (--folds): 2 rows cannot fill 3 folds"),
])
def test_bad_fold_requests_fail_before_anything_runs(tmp_path, args, message):
    result = dlaunch("run", str(write(tmp_path)), *args)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()


def test_folds_on_slurm_are_one_array_job(tmp_path):
    result = dlaunch("run", str(write(tmp_path)), "--folds", "4", "--cluster", "slurm", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --array=0-3" in result.stdout
    assert all(f"-folds/fold-{fold}" in result.stdout for fold in range(4))
