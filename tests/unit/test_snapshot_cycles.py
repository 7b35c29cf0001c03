"""Snapshot steps: the ends of the warm-restart cycles, a pure function of the schedule's
shape that agrees with ``lr_factor``; the plan carries them, and a recipe that asks for
snapshots without warm restarts is refused."""

from __future__ import annotations

import pytest

from launcher.data.facts import DataFacts
from launcher.errors import UsageError
from launcher.plan import HostFacts, build_plan
from launcher.recipe import Recipe
from launcher.schedules import ScheduleShape, cycle_ends, lr_factor


def restarts(total: int, warmup: int, period: int | None, mult: int) -> ScheduleShape:
    return ScheduleShape(name="cosine_restarts", total_steps=total, warmup_steps=warmup, min_lr_ratio=0.0,
                         restart_period=period, restart_mult=mult)


@pytest.mark.parametrize("total,warmup,period,mult,expected", [
    (30, 0, 10, 1, [10, 20, 30]),          # cycles that fit the run exactly
    (44, 2, 6, 2, [8, 20, 44]),            # after warmup, each cycle twice the one before
    (36, 2, 6, 2, [8, 20, 36]),            # the last cycle cut short by the run's end
    (25, 5, 7, 1, [12, 19, 25]),
    (100, 10, 5, 3, [15, 30, 75, 100]),
    (50, 10, None, 1, [20, 30, 40, 50]),   # default period: a quarter of the 40 steps after warmup
    (20, 0, 40, 1, [20]),                  # a first cycle longer than the run: the last step alone
])
def test_cycle_ends(total, warmup, period, mult, expected):
    assert cycle_ends(restarts(total, warmup, period, mult)) == expected


@pytest.mark.parametrize("total,warmup,period,mult", [
    (30, 0, 10, 1), (44, 2, 6, 2), (36, 2, 6, 2), (25, 5, 7, 1), (100, 10, 5, 3), (50, 10, None, 1),
    (200, 17, 9, 2),
])
def test_each_cycle_ends_at_its_lowest_lr_and_the_next_step_restarts(total, warmup, period, mult):
    """``lr_factor(s)`` is the LR of 0-based step s: a cycle ending after ``end`` steps
    trained step end-1 at its minimum, and step ``end`` jumps back to the peak. No other
    step after warmup is a restart."""
    shape = restarts(total, warmup, period, mult)
    ends = cycle_ends(shape)
    starts = [warmup, *ends[:-1]]
    for start, end in zip(starts, ends):
        cycle = [lr_factor(shape, s) for s in range(start, end)]
        assert cycle[0] == pytest.approx(1.0)
        assert min(cycle) == cycle[-1]
    assert ends[-1] == total
    jumps = [s for s in range(warmup + 1, total) if lr_factor(shape, s) > lr_factor(shape, s - 1)]
    assert jumps == ends[:-1]
    assert all(lr_factor(shape, end) == pytest.approx(1.0) for end in ends[:-1])


def test_only_cosine_restarts_has_cycles():
    with pytest.raises(ValueError):
        cycle_ends(ScheduleShape(name="cosine", total_steps=10, warmup_steps=0))


DIGITS = DataFacts(num_rows=1797, num_train=1438, num_val=359, input_shape=(1, 8, 8), num_classes=10)
CPU = HostFacts(has_cuda=False, cpus=8, hostname="laptop")


def test_the_plan_holds_the_snapshot_steps_of_its_schedule():
    schedule = {"name": "cosine_restarts", "warmup_steps": 2, "restart_period": 6, "restart_mult": 2}
    with_snapshots = Recipe.model_validate({"schedule": {**schedule, "snapshots": True},
                                            "train": {"max_steps": 44}})
    plan = build_plan(with_snapshots, host=CPU, data=DIGITS, run_dir="runs/x")
    assert plan.training.steps.snapshots == (8, 20, 44)
    without = Recipe.model_validate({"schedule": schedule, "train": {"max_steps": 44}})
    assert build_plan(without, host=CPU, data=DIGITS, run_dir="runs/x").training.steps.snapshots == ()


def test_snapshots_without_warm_restarts_are_refused_naming_the_key():
    recipe = Recipe.model_validate({"schedule": {"name": "cosine", "snapshots": True}})
    with pytest.raises(UsageError) as info:
        build_plan(recipe, host=CPU, data=DIGITS, run_dir="runs/x")
    assert info.value.key == "schedule.snapshots"
    assert info.value.message.startswith("snapshots are taken at the ends of warm-restart cycles; cosine has none")
