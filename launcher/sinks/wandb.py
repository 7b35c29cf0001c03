"""Weights & Biases: one W&B run per run directory, written to RUN_DIR/wandb.

The hyperparameters are the run's config, recipe.yaml one of its files, every number of
every record a history value at its step (`train/loss`, `eval/val_acc`). Offline (the
default) nothing leaves the machine: `wandb sync RUN_DIR/wandb/offline-run-*` uploads
it later. The run's id comes from the run directory's path, so a resumed run continues
it. W&B reads WANDB_API_KEY itself; dlaunch never touches it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import wandb

from launcher.credentials import may_hold_credential
from launcher.plan import LaunchPlan
from launcher.rundir import RECIPE
from launcher.sinks import Status, scalars


@contextmanager
def _slurm_credentials_hidden() -> Iterator[None]:
    """W&B's core process, started by wandb.init, records every SLURM_* variable of its
    environment in the run's metadata, SLURM_JWT (a Slurm REST token) too. It starts
    without those that hold credentials; this process keeps them (scontrol may need the
    token to requeue the job)."""
    hidden = {name: os.environ.pop(name) for name in list(os.environ)
              if name.startswith("SLURM_") and may_hold_credential(name)}
    try:
        yield
    finally:
        os.environ.update(hidden)


def run_id(run_dir: Path) -> str:
    return hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]


class WandbSink:
    def __init__(self, plan: LaunchPlan) -> None:
        self._config = plan.recipe.logging.wandb
        self._project = self._config.project or plan.recipe.name
        self._run_dir = Path(plan.run_dir)
        self._run: wandb.Run | None = None

    def start(self, params: dict[str, Any], recipe_text: str) -> None:
        # console off: rank 0's terminal is the user's, and its log is logs/rank-0.log.
        with _slurm_credentials_hidden():
            self._run = wandb.init(project=self._project, name=self._run_dir.name, id=run_id(self._run_dir),
                                   resume="allow", mode=self._config.mode, dir=self._run_dir, config=params,
                                   settings=wandb.Settings(console="off", silent=True))
        # W&B keeps (and syncs) what is written to the run's own files folder.
        (Path(self._run.dir) / RECIPE).write_text(recipe_text)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        numbers = scalars(kind, values)
        if numbers:
            self._run.log(numbers, step=step)

    def close(self, status: Status) -> None:
        if status == "preempted":  # W&B shows it as preempted, not crashed, until resumed
            self._run.mark_preempting()
        self._run.finish(exit_code=0 if status == "finished" else 1)
