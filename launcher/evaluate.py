"""`dlaunch eval RUN_DIR --split val|test`: a finished run's final weights scored on one
of its splits, in this process.

The test split is read here and nowhere else: training and its evaluations never load
those rows, so a test score is one the run could not have been tuned on. The rows and
their normalisation are the run's own (its plan's recipe and data facts), so the score
is for exactly the data the run was made with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from launcher.data.datasets import load_split
from launcher.data.loaders import eval_batches
from launcher.engines.base import sample_scores
from launcher.errors import UsageError
from launcher.models.build import build_model
from launcher.plan import LaunchPlan
from launcher.recipe import DataConfig
from launcher.rundir import PLAN, write_atomic

WEIGHTS = "model.pt"

Split = Literal["val", "test"]


def evaluate_run(run_dir: Path, split: Split, batch_size: int = 256) -> dict[str, float | int]:
    """Loss and accuracy of ``run_dir``'s final weights on ``split``, also written to
    RUN_DIR/eval-<split>.json."""
    plan = finished_plan(run_dir)
    dataset = split_rows(plan, split)
    model = load_model(plan, run_dir / WEIGHTS)
    with torch.no_grad():
        loss, accuracy = score(model, dataset, plan.recipe.data, batch_size)
    scores = {f"{split}_loss": loss, f"{split}_acc": accuracy, "rows": len(dataset)}
    write_atomic(run_dir / f"eval-{split}.json", json.dumps(scores, indent=2) + "\n")
    return scores


def split_rows(plan: LaunchPlan, split: Split) -> Dataset:
    """The rows of the run's ``split``, normalised as the run's training rows were."""
    facts = plan.training.data
    if split == "test" and facts.num_test == 0:
        raise UsageError("the run has no test split: its recipe keeps data.test_fraction at 0",
                         key="--split")
    if split == "val" and facts.num_val == 0:
        raise UsageError("the run has no validation split", key="--split")
    parts = load_split(plan.recipe.data, facts, test=split == "test")
    return parts.test if split == "test" else parts.val


def load_model(plan: LaunchPlan, weights: Path) -> torch.nn.Module:
    """The run's model with the float32 state dict in ``weights``, in eval mode."""
    model = build_model(plan.recipe.model, plan.training.data)
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    return model.eval()


def score(predict: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, cfg: DataConfig,
          batch_size: int) -> tuple[float, float]:
    """(mean loss, mean accuracy) of ``predict`` (a model, an ONNX session's wrapper) over
    every row of ``dataset``."""
    loss_sum = acc_sum = 0.0
    for inputs, targets, _ in eval_batches(dataset, cfg, rank=0, world_size=1, batch=batch_size):
        losses, hits = sample_scores(predict(inputs), targets)
        loss_sum += float(losses.double().sum())
        acc_sum += float(hits.double().sum())
    return loss_sum / len(dataset), acc_sum / len(dataset)


def finished_plan(run_dir: Path) -> LaunchPlan:
    """The plan of a run of the built-in trainer that has written its final weights."""
    try:
        plan = LaunchPlan.from_json((run_dir / PLAN).read_text())
    except FileNotFoundError:
        raise UsageError(f"{str(run_dir)!r} is not a dlaunch run directory (no {PLAN})",
                         key="RUN_DIR") from None
    if plan.training is None:
        raise UsageError(f"{str(run_dir)!r} ran a --script; only the built-in trainer's runs "
                         "have final weights dlaunch knows", key="RUN_DIR")
    if not (run_dir / WEIGHTS).is_file():
        raise UsageError(f"{str(run_dir)!r} has no final weights ({WEIGHTS}): the run has not "
                         "finished; resume it first", key="RUN_DIR")
    return plan
