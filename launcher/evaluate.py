"""`dlaunch eval RUN_DIR --split val|test`: a finished run's final weights scored on one
of its splits, in this process.

The test split is read here and nowhere else: training and its evaluations never load
those rows, so a test score is one the run could not have been tuned on. The rows and
their normalisation are the run's own (its plan's recipe and data facts), so the score
is for exactly the data the run was made with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from launcher.data.datasets import load_split
from launcher.data.loaders import eval_batches
from launcher.engines.base import sample_scores
from launcher.errors import UsageError
from launcher.models.build import build_model
from launcher.plan import LaunchPlan
from launcher.rundir import PLAN, write_atomic

WEIGHTS = "model.pt"

Split = Literal["val", "test"]


def evaluate_run(run_dir: Path, split: Split, batch_size: int = 256) -> dict[str, float | int]:
    """Loss and accuracy of ``run_dir``'s final weights on ``split``, also written to
    RUN_DIR/eval-<split>.json."""
    plan = _finished_plan(run_dir)
    facts = plan.training.data
    if split == "test" and facts.num_test == 0:
        raise UsageError("the run has no test split: its recipe keeps data.test_fraction at 0",
                         key="--split")
    if split == "val" and facts.num_val == 0:
        raise UsageError("the run has no validation split", key="--split")
    model = build_model(plan.recipe.model, facts)
    model.load_state_dict(torch.load(run_dir / WEIGHTS, map_location="cpu"))
    model.eval()
    parts = load_split(plan.recipe.data, facts, test=split == "test")
    dataset = parts.test if split == "test" else parts.val
    loss_sum = acc_sum = 0.0
    with torch.no_grad():
        for inputs, targets, _ in eval_batches(dataset, plan.recipe.data, rank=0, world_size=1,
                                               batch=batch_size):
            losses, hits = sample_scores(model(inputs), targets)
            loss_sum += float(losses.double().sum())
            acc_sum += float(hits.double().sum())
    scores = {f"{split}_loss": loss_sum / len(dataset), f"{split}_acc": acc_sum / len(dataset),
              "rows": len(dataset)}
    write_atomic(run_dir / f"eval-{split}.json", json.dumps(scores, indent=2) + "\n")
    return scores


def _finished_plan(run_dir: Path) -> LaunchPlan:
    try:
        plan = LaunchPlan.from_json((run_dir / PLAN).read_text())
    except FileNotFoundError:
        raise UsageError(f"{str(run_dir)!r} is not a dlaunch run directory (no {PLAN})",
                         key="RUN_DIR") from None
    if plan.training is None:
        raise UsageError(f"{str(run_dir)!r} ran a --script; only the built-in trainer's runs "
                         "can be evaluated", key="RUN_DIR")
    if not (run_dir / WEIGHTS).is_file():
        raise UsageError(f"{str(run_dir)!r} has no final weights ({WEIGHTS}): the run has not "
                         "finished; resume it first", key="RUN_DIR")
    return plan
