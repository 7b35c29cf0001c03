"""`dlaunch lr-find RECIPE`: the LR range test on the recipe's own model, data, precision
and engine, in this one process.

    plan the recipe as `dlaunch run` would (its global batch, its LR scaling)
    re-plan it for one process: world size 1, the same global batch (gradient
        accumulation makes up the missing ranks), a constant schedule without warmup
    join a world-size-1 process group on 127.0.0.1; build model and engine as the
        trainer does (launcher/trainer.py)
    for each LR of the sweep: set it as the schedule's peak, one engine.train_step
    stop at a non-finite loss or a diverged smoothed loss; suggest an LR
    write RUN_ROOT/<name>-lr-find-<stamp>/ (lr_find.json, lr_find.png, recipe.yaml) at once

The engines step the LR schedule after every optimizer step. A constant schedule with
no warmup has a factor of 1 at every step, so setting its peak to the swept LR before a
step (``LRSchedule.set_peak_lr``) makes that step run at exactly that LR, and the
engine's own step() of the schedule keeps it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import UsageError
from launcher.lr_sweep import DIVERGENCE, RULE, Suggestion, diverged, smooth, suggest, sweep_lrs
from launcher.plan import HostFacts, LaunchPlan, build_plan
from launcher.recipe import recipe_from_data
from launcher.rundir import RECIPE, write_durably
from launcher.yamlio import SourceMap, dump_yaml

if TYPE_CHECKING:
    from launcher.data.datasets import Split

CURVE = "lr_find.json"
PLOT = "lr_find.png"
MIN_STEPS = 10


@dataclass(frozen=True)
class SweepSettings:
    min_lr: float
    max_lr: float
    steps: int

    def check(self) -> None:
        if not self.min_lr > 0:
            raise UsageError(f"{self.min_lr:g} is not a learning rate; give one above 0", key="--min-lr")
        if self.min_lr >= self.max_lr:
            raise UsageError(f"{self.max_lr:g} is not above --min-lr {self.min_lr:g}; the sweep goes "
                             "from --min-lr up to --max-lr", key="--max-lr")
        if self.steps < MIN_STEPS:
            raise UsageError(f"{self.steps} steps are too few for a curve; give at least {MIN_STEPS}",
                             key="--steps")


@dataclass(frozen=True)
class Curve:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped: str | None
    """Why the sweep ended before --max-lr, or None."""


def one_process_plan(plan: LaunchPlan, source: SourceMap, settings: SweepSettings, host: HostFacts,
                     user_env: Mapping[str, str]) -> LaunchPlan:
    """``plan`` (the recipe planned as `dlaunch run` would launch it) re-planned for the
    range test: one process on this host, the same global batch, ``settings.steps``
    optimizer steps at a constant LR of ``min_lr``, unscaled (the sweep moves it)."""
    data = plan.recipe.model_dump(mode="json")
    data["train"].update(global_batch_size=plan.training.batch.global_, grad_accum=None,
                         max_steps=settings.steps)
    data["schedule"].update(name="constant", warmup_steps=0)
    data["optim"].update(lr=settings.min_lr, reference_batch=None)
    # The same model and data: the transfer-learning facts (frozen parameters) carry over.
    return build_plan(recipe_from_data(data, source), host=host, data=plan.training.data,
                      run_dir=plan.run_dir, backend="local", nodes=1, procs_per_node=1,
                      model=plan.training.model, user_env=user_env)


def run_sweep(plan: LaunchPlan, settings: SweepSettings) -> Curve:
    """The range test in this process; ``plan`` is a one-process plan."""
    # The settings a worker gets from its launcher: before torch and DeepSpeed are imported.
    os.environ.update(plan.env)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", GROUP_RANK="0",
                      NODE_RANK="0", MASTER_ADDR="127.0.0.1")
    import torch.distributed as dist

    from launcher.monitor import Progress
    from launcher.trainer import load_data_and_model, start_engine

    # A store on port 0 takes a free port atomically; the engines find the group joined.
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    os.environ["MASTER_PORT"] = str(store.port)
    dist.init_process_group(plan.topology.dist_backend, store=store, rank=0, world_size=1)
    try:
        split, model, transfer = load_data_and_model(plan)
        engine, split = start_engine(plan, model, transfer, split)
        lrs, losses, stopped = [], [], None
        progress = Progress(settings.steps, 0, plan.recipe.logging.progress)
        for lr, micro_batches in zip(sweep_lrs(settings.min_lr, settings.max_lr, settings.steps),
                                     _step_batches(plan, split)):
            engine.schedule.set_peak_lr(lr)
            # No alerts and no skipping: the sweep is meant to reach the LRs that blow the
            # loss up, and ends itself there.
            loss = float(engine.train_step(micro_batches).loss)
            progress.update({"lr": f"{lr:.2e}", "loss": f"{loss:.4f}"})
            if not math.isfinite(loss):
                stopped = f"the loss was {loss} at LR {lr:.3g}"
                break
            lrs.append(lr)
            losses.append(loss)
            if diverged(smooth(losses)):
                stopped = f"the smoothed loss passed {DIVERGENCE:g}x its minimum at LR {lr:.3g}"
                break
        progress.close()
    finally:
        dist.destroy_process_group()
    return Curve(lrs, losses, smooth(losses), stopped)


def _step_batches(plan: LaunchPlan, split: Split) -> Iterator[list]:
    """The micro-batches of each optimizer step, epoch after epoch, in the order (and
    with the mixing) the trainer's rank 0 of a one-process run would see them."""
    from launcher.data.loaders import train_batches
    from launcher.trainer import mix_micro_batch

    batch, per_epoch = plan.training.batch, plan.training.steps.per_epoch
    batches = train_batches(split.train, plan.recipe.data, rank=0, world_size=1, micro_batch=batch.micro,
                            batches_per_step=batch.grad_accum, steps_per_epoch=per_epoch,
                            on_gpu=plan.topology.device == "cuda", seed=plan.recipe.train.seed)
    step = 0
    for epoch in itertools.count():
        batches.set_epoch(epoch)
        stream = iter(batches)
        for _ in range(per_epoch):
            yield [mix_micro_batch(next(stream), plan, rank=0, step=step, micro=k) for k in range(batch.grad_accum)]
            step += 1


def recipe_lr(plan: LaunchPlan, lr: float) -> float:
    """The ``optim.lr`` that the recipe's LR scaling (``optim.reference_batch``) turns
    into ``lr`` at the recipe's global batch; ``lr`` itself without scaling."""
    scaling = plan.training.lr
    return lr * scaling.base / scaling.scaled


def suggestion_of(curve: Curve, settings: SweepSettings) -> Suggestion:
    """The suggestion; a UsageError where the curve cannot give one inside the sweep."""
    if not curve.lrs:
        raise UsageError(f"the sweep stopped at its first step: {curve.stopped}; lower --min-lr", key="--min-lr")
    suggestion = suggest(curve.lrs, curve.smoothed)
    if suggestion.lr < settings.min_lr:
        raise UsageError(f"the smoothed loss was lowest at LR {suggestion.minimum_at:.3g}, within a decade of "
                         f"the start, so a tenth of it is outside the sweep; begin lower than {settings.min_lr:g} "
                         "(or, if the loss never fell, raise --max-lr or --steps)", key="--min-lr")
    return suggestion


def write_result(run_dir: Path, plan: LaunchPlan, test_plan: LaunchPlan, settings: SweepSettings,
                 curve: Curve, suggestion: Suggestion) -> None:
    """RUN_DIR with the curve, its plot and the resolved recipe, all or nothing: built
    under a hidden name and renamed into place."""
    staging = run_dir.with_name(f".{run_dir.name}.tmp")
    training = test_plan.training
    record: dict[str, Any] = {
        "suggestion": suggestion.lr, "rule": RULE, "minimum_at": suggestion.minimum_at,
        "recipe_lr": recipe_lr(plan, suggestion.lr), "lr_scaling": plan.training.lr.rule,
        **asdict(settings), "steps_run": len(curve.lrs), "stopped": curve.stopped,
        "global_batch": training.batch.global_, "micro_batch": training.batch.micro,
        "grad_accum": training.batch.grad_accum, "engine": training.engine.name,
        "zero_stage": training.engine.zero_stage, "precision": training.engine.precision,
        "lrs": curve.lrs, "losses": curve.losses, "smoothed": curve.smoothed}
    try:
        staging.mkdir(parents=True)
        write_durably(staging / CURVE, json.dumps(record, indent=2) + "\n")
        write_durably(staging / RECIPE, dump_yaml(plan.recipe.model_dump(mode="json")))
        _plot(curve, suggestion, run_dir.name).savefig(staging / PLOT, dpi=110)
        os.rename(staging, run_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot create {str(run_dir)!r}: {exc.strerror or exc}",
                             key="logging.run_root") from None
        raise


def _plot(curve: Curve, suggestion: Suggestion, title: str):
    """Smoothed loss against the LR on a log axis, the raw loss faint, the suggestion
    marked. matplotlib's object API, as launcher/report.py: no pyplot state."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = figure.subplots()
    ax.plot(curve.lrs, curve.losses, color="C0", alpha=0.25, linewidth=0.9, label="loss of each step")
    ax.plot(curve.lrs, curve.smoothed, color="C0", linewidth=1.8, label="smoothed (EMA, bias-corrected)")
    lowest = min(curve.smoothed)
    ax.plot([suggestion.minimum_at], [lowest], marker="v", color="C7", markersize=8, linestyle="none",
            label=f"lowest smoothed loss, at LR {suggestion.minimum_at:.3g}")
    ax.axvline(suggestion.lr, color="C3", linestyle="--", linewidth=1.1)
    ax.plot([suggestion.lr], [_interpolate(curve.lrs, curve.smoothed, suggestion.lr)], marker="o", color="C3",
            markersize=8, linestyle="none", label=f"suggested LR {suggestion.lr:.3g} (a tenth of that)")
    ax.set_xscale("log")
    # The raw loss of the last steps can be orders of magnitude above the rest: the
    # smoothed curve sets the scale.
    low, high = min(curve.smoothed + curve.losses), max(curve.smoothed)
    ax.set_ylim(max(0.0, low - 0.05 * (high - low)), high + 0.1 * (high - low))
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    figure.suptitle(f"LR range test: {title}" + (f"\nstopped: {curve.stopped}" if curve.stopped else ""),
                    fontsize="medium")
    return figure


def _interpolate(lrs: list[float], values: list[float], lr: float) -> float:
    """``values`` at ``lr``, linearly in log(LR) between the two neighbouring points."""
    for (a, va), (b, vb) in itertools.pairwise(zip(lrs, values)):
        if a <= lr <= b:
            t = math.log(lr / a) / math.log(b / a)
            return va + t * (vb - va)
    return values[min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / lr)))]
