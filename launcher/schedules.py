"""Learning-rate schedules: linear warmup, then cosine, cosine with warm restarts (SGDR),
linear, constant, or reduce-on-plateau.

The shape of each schedule is a pure function of the step (``lr_factor``), so it is
tested without an optimizer. ``LRSchedule`` applies it to an optimizer's param groups
and has the scheduler interface both engines drive (``step``, ``get_last_lr``,
``state_dict``): DeepSpeed steps it after every optimizer step it takes, the
Accelerate engine does the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

ScheduleName = Literal["cosine", "cosine_restarts", "linear", "constant", "plateau"]


@dataclass(frozen=True)
class ScheduleShape:
    name: ScheduleName
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float = 0.1
    restart_period: int | None = None
    restart_mult: int = 1


def _cosine(progress: float, floor: float) -> float:
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _first_period(shape: ScheduleShape) -> int:
    """Steps in the first SGDR cycle: ``restart_period``, or a quarter of the decay."""
    return shape.restart_period or max(1, (shape.total_steps - shape.warmup_steps) // 4)


def _restart_progress(step: int, first_period: int, mult: int) -> float:
    """Progress within the current SGDR cycle, in [0, 1)."""
    period = first_period
    while step >= period:
        step -= period
        period *= mult
    return step / period


def lr_factor(shape: ScheduleShape, step: int) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based)."""
    if step < shape.warmup_steps:
        # (step + 1) / (warmup + 1): the first update is small but never zero.
        return (step + 1) / (shape.warmup_steps + 1)
    after = step - shape.warmup_steps
    decay_steps = max(1, shape.total_steps - shape.warmup_steps)
    progress = min(1.0, after / decay_steps)
    floor = shape.min_lr_ratio
    if shape.name == "cosine":
        return _cosine(progress, floor)
    if shape.name == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    if shape.name == "cosine_restarts":
        return _cosine(_restart_progress(after, _first_period(shape), shape.restart_mult), floor)
    return 1.0  # constant, and plateau (whose reductions LRSchedule applies)


def cycle_ends(shape: ScheduleShape) -> list[int]:
    """The step counts (optimizer steps done, 1..total_steps) after which a cosine_restarts
    cycle ends: step ``end - 1`` (0-based, as ``lr_factor`` counts) trained at the cycle's
    lowest LR and step ``end`` restarts at the peak. The run's last step ends the last
    cycle, a partial one when the cycles do not fit the run exactly."""
    if shape.name != "cosine_restarts":
        raise ValueError(f"a {shape.name} schedule has no cycles")
    ends, end, period = [], shape.warmup_steps, _first_period(shape)
    while end + period < shape.total_steps:
        end += period
        ends.append(end)
        period *= shape.restart_mult
    return [*ends, shape.total_steps]


def cycle_count(shape: ScheduleShape) -> int:
    """``len(cycle_ends(shape))`` without listing them: cycles of constant length
    (restart_mult 1) are as many as the run's steps allow, 10**12 of them for all the
    planner knows; growing ones are a few dozen at most."""
    if shape.restart_mult == 1:
        first = _first_period(shape)
        return len(range(shape.warmup_steps + first, shape.total_steps, first)) + 1
    return len(cycle_ends(shape))


def group_scale(group: dict[str, Any], step: int) -> float:
    """A param group's share of the scheduled LR at ``step``: its ``lr_multiplier``
    (discriminative fine-tuning), and 0 before its ``start_step`` (gradual unfreezing)."""
    return 0.0 if step < group.get("start_step", 0) else group.get("lr_multiplier", 1.0)


class LRSchedule:
    """Sets each param group's LR to its peak LR x ``lr_factor`` x the plateau scale x
    the group's own scale (``group_scale``)."""

    def __init__(self, optimizer: Any, shape: ScheduleShape, *, plateau_factor: float = 0.5,
                 plateau_patience: int = 2, mode: Literal["min", "max"] = "min") -> None:
        self.optimizer = optimizer
        self.shape = shape
        self.peak_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_step = 0
        self.plateau_factor = plateau_factor
        self.plateau_patience = plateau_patience
        self.mode = mode
        self.plateau_scale = 1.0
        self.best: float | None = None
        self.bad_evals = 0
        self._apply()
        if any("start_step" in group for group in optimizer.param_groups):
            optimizer.register_step_pre_hook(self._restart_starting_groups)

    def _apply(self) -> None:
        self.factor = lr_factor(self.shape, self.last_step) * self.plateau_scale
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * self.factor * group_scale(group, self.last_step)

    def step(self, *_: Any, **__: Any) -> None:
        """One optimizer step done (DeepSpeed passes keyword arguments; none matter)."""
        self.last_step += 1
        self._apply()

    def set_peak_lr(self, lr: float) -> None:
        """Make ``lr`` every param group's peak LR, at once. The LR range test (`dlaunch
        lr-find`) sweeps the peak step by step over a constant schedule, so the engine's
        own step() of the schedule keeps the swept LR rather than fighting it."""
        self.peak_lrs = [lr] * len(self.peak_lrs)
        self._apply()

    def _restart_starting_groups(self, optimizer: Any, *_: Any) -> None:
        """Before the first update of a group that starts training (a step pre-hook):
        fresh optimizer state, as if the group had been added now. Adam's moments stayed
        0 while it was held but its step count ran on, which would skew the bias
        correction; SGD's momentum took in weight decay. Zeroed in place, since DeepSpeed's
        checkpoints expect every group to keep its state keys; in the hook, since ZeRO-3
        lists a group's flat parameters in it only while it steps."""
        for group in optimizer.param_groups:
            if group.get("start_step") != self.last_step:
                continue
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                for key, value in state.items():
                    if hasattr(value, "zero_"):
                        value.zero_()
                    elif isinstance(value, (int, float)):  # DeepSpeedCPUAdam's step count
                        state[key] = type(value)(0)

    @property
    def lr(self) -> float:
        """The scheduled LR: a group's without a multiplier (the `lr` metric)."""
        return self.peak_lrs[0] * self.factor

    def group_lrs(self) -> dict[str, float]:
        """The LR of each kind of group when there are several, by multiplier and start
        step (`x0.1`, `x1@200`): groups that differ only in weight decay share one."""
        kinds = {(group.get("lr_multiplier", 1.0), group.get("start_step", 0)): group["lr"]
                 for group in self.optimizer.param_groups}
        if len(kinds) < 2:
            return {}
        return {f"x{multiplier:g}" + (f"@{start}" if start else ""): lr
                for (multiplier, start), lr in sorted(kinds.items(), key=lambda kind: kind[0][::-1])}

    def on_eval(self, value: float) -> None:
        """Reduce-on-plateau: cut the LR when ``value`` stopped improving."""
        if self.shape.name != "plateau":
            return
        improved = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if improved:
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals > self.plateau_patience:
            self.plateau_scale *= self.plateau_factor
            self.bad_evals = 0
            self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    get_lr = get_last_lr  # DeepSpeed's engine.get_lr() asks for this name

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "plateau_scale": self.plateau_scale,
                "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = state["last_step"]
        self.plateau_scale = state["plateau_scale"]
        self.best = state["best"]
        self.bad_evals = state["bad_evals"]
        self._apply()
