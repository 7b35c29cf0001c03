"""Where rank 0's metrics go: metrics.jsonl always; TensorBoard, MLflow and Weights & Biases
as the recipe's `logging` section says. Each is a `Sink`; every sink gets the
hyperparameters (the resolved recipe, flattened to dotted keys) and the recipe's text
when the run starts, each record as it is written, and how the run ended.

The optional sinks import their library only when the recipe enables them: the CLI,
which calls `check_installed`, never imports mlflow or wandb.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from launcher.errors import UsageError
from launcher.plan import LaunchPlan
from launcher.recipe import LoggingConfig
from launcher.rundir import RECIPE

Status = Literal["finished", "failed", "preempted"]
"""How a run ended: it ran to its end (or stopped early), training raised, or a
preemption signal stopped it at a checkpoint (the requeued job resumes it)."""


class Sink(Protocol):
    def start(self, params: dict[str, Any], recipe_text: str) -> None:
        """The run (re)starts: its hyperparameters and its recipe.yaml."""

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One record: kind train, eval, summary, resume, checkpoint_rejected, early_stop or
        preempted."""

    def close(self, status: Status) -> None:
        """The run ended (on this process: a resumed run starts again)."""


# recipe key -> (module, extra): what `pip install 'dlaunch[EXTRA]'` brings.
_OPTIONAL = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def check_installed(logging: LoggingConfig) -> None:
    """Refuse, before anything starts, an enabled sink whose library is not installed."""
    for key, (module, extra) in _OPTIONAL.items():
        if getattr(logging, key).enabled and importlib.util.find_spec(module) is None:
            raise UsageError(f"{module} is not installed; install dlaunch's {extra} extra: "
                             f"pip install 'dlaunch[{extra}]'", key=f"logging.{key}.enabled")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}. Lists
    and scalars stay values as they are; an empty mapping stays too, as {}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def as_text(value: Any) -> str:
    """A hyperparameter as text for a sink that takes only text: a string as it is,
    anything else as JSON (as recipe.yaml spells it: 0.001, true, null, [64, 64])."""
    return value if isinstance(value, str) else json.dumps(value)


def hyperparameters(plan: LaunchPlan) -> dict[str, Any]:
    """The resolved recipe, flattened, and what the planner derived from it and the
    topology (the scaled LR, the global batch) under `plan.`: what a run is compared by."""
    training = plan.training
    return {**flatten(plan.recipe.model_dump(mode="json")),
            "plan.world_size": plan.topology.world_size,
            "plan.global_batch": training.batch.global_,
            "plan.grad_accum": training.batch.grad_accum,
            "plan.lr": training.lr.scaled,
            "plan.total_steps": training.steps.total}


def scalars(kind: str, values: dict[str, Any]) -> dict[str, float]:
    """The record's numbers, named `kind/name` as TensorBoard shows them (train/loss,
    eval/val_acc); texts, flags and missing values (a skipped step's loss) are left out."""
    return {f"{kind}/{name}": value for name, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def open_sinks(plan: LaunchPlan) -> list[Sink]:
    """The sinks the recipe asks for, not yet started; metrics.jsonl first."""
    from launcher.sinks.jsonl import JsonlSink

    run_dir, logging = Path(plan.run_dir), plan.recipe.logging
    sinks: list[Sink] = [JsonlSink(run_dir)]
    if logging.tensorboard:
        from launcher.sinks.tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink(run_dir))
    if logging.mlflow.enabled:
        from launcher.sinks.mlflow import MlflowSink

        sinks.append(MlflowSink(plan))
    if logging.wandb.enabled:
        from launcher.sinks.wandb import WandbSink

        sinks.append(WandbSink(plan))
    return sinks


def recipe_text(plan: LaunchPlan) -> str:
    return (Path(plan.run_dir) / RECIPE).read_text()
