"""When a trial reports an evaluation to Tune (cluster/tune.py): at once, except under
PBT, where one at a checkpoint's step waits for that checkpoint, the thing PBT copies."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.tune import _NewEvals
from launcher.plan import StepPlan
from launcher.rundir import CHECKPOINTS, METRICS

STEPS = StepPlan(total=100, per_epoch=100, warmup=0, eval_every=25, checkpoint_every=50, log_every=5)


def evaluated(run_dir: Path, step: int) -> None:
    with open(run_dir / METRICS, "a") as out:
        out.write(json.dumps({"kind": "eval", "step": step, "val_loss": 1.0, "val_acc": 0.5}) + "\n")


def checkpointed(run_dir: Path, step: int) -> None:
    (run_dir / CHECKPOINTS / f"step-{step:08d}").mkdir(parents=True)


def steps_of(records: list[dict]) -> list[int]:
    return [r["step"] for r in records]


def test_without_pbt_every_evaluation_is_reported_at_once(tmp_path):
    new_evals = _NewEvals(tmp_path, skip_existing=False)
    evaluated(tmp_path, 25)
    evaluated(tmp_path, 50)
    assert steps_of(new_evals()) == [25, 50]
    assert new_evals() == []


def test_under_pbt_an_evaluation_waits_for_the_checkpoint_of_its_step(tmp_path):
    new_evals = _NewEvals(tmp_path, skip_existing=False, steps=STEPS)
    evaluated(tmp_path, 25)  # no checkpoint at 25: reported at once
    assert steps_of(new_evals()) == [25]
    evaluated(tmp_path, 50)
    assert new_evals() == []
    checkpointed(tmp_path, 50)
    assert steps_of(new_evals()) == [50]


def test_under_pbt_a_later_evaluation_or_the_jobs_end_releases_one_still_waiting(tmp_path):
    new_evals = _NewEvals(tmp_path, skip_existing=False, steps=STEPS)
    evaluated(tmp_path, 50)  # its checkpoint pruned, or never written
    evaluated(tmp_path, 75)
    assert steps_of(new_evals()) == [50, 75]
    evaluated(tmp_path, 100)  # the last step is always checkpointed
    assert new_evals() == []
    assert steps_of(new_evals(ended=True)) == [100]


def test_a_resumed_trial_reports_only_the_evaluations_after_its_resume(tmp_path):
    evaluated(tmp_path, 25)
    new_evals = _NewEvals(tmp_path, skip_existing=True, steps=STEPS)
    evaluated(tmp_path, 50)
    checkpointed(tmp_path, 50)
    assert steps_of(new_evals()) == [50]
