"""The LR range test's pure parts: the sweep, the smoothing, the divergence stop, the
suggestion, and the one-process plan the test runs."""

from __future__ import annotations

import math

import pytest

from launcher.data.facts import DataFacts
from launcher.errors import UsageError
from launcher.lr_find import SweepSettings, one_process_plan, recipe_lr
from launcher.lr_sweep import BETA, diverged, smooth, suggest, sweep_lrs
from launcher.plan import HostFacts, build_plan
from launcher.recipe import Recipe
from launcher.yamlio import SourceMap

CPU = HostFacts(has_cuda=False, cpus=8, hostname="laptop")
DIGITS = DataFacts(num_rows=1797, num_train=1438, num_val=359, input_shape=(1, 8, 8), num_classes=10)


def test_the_sweep_runs_from_min_to_max_with_one_ratio_between_all_neighbours():
    lrs = sweep_lrs(1e-7, 10.0, 100)
    assert len(lrs) == 100
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(10.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([1e8 ** (1 / 99)] * 99)


def test_smoothing_is_an_ema_corrected_for_its_start_at_zero():
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)  # uncorrected, the first would be 0.04
    first, second = 1.0, 3.0
    average = (1 - BETA) * first
    average = BETA * average + (1 - BETA) * second
    assert smooth([first, second]) == pytest.approx([first, average / (1 - BETA**2)])


def test_smoothing_damps_noise():
    noisy = [2.0 + (0.5 if i % 2 else -0.5) for i in range(60)]
    assert max(abs(v - 2.0) for v in smooth(noisy)[20:]) < 0.05


def test_divergence_is_the_smoothed_loss_past_four_times_its_minimum():
    assert not diverged([1.0, 0.5, 2.0])
    assert diverged([1.0, 0.5, 2.01])
    assert not diverged([3.0, 2.5, 2.8])


def synthetic_curve(lrs: list[float]) -> list[float]:
    """A loss flat at 2.3 while the LR is too small, falling from 1e-4 to its lowest near
    1e-1, exploding beyond."""
    def loss(lr: float) -> float:
        x = math.log10(lr)
        if x < -4:
            return 2.3
        if x < -1:
            return 2.3 - 1.8 * (x + 4) / 3
        return 0.5 + 20 * (x + 1) ** 2
    return [loss(lr) for lr in lrs]


def test_the_suggestion_is_a_tenth_of_the_lr_at_the_lowest_smoothed_loss():
    lrs = sweep_lrs(1e-7, 10.0, 100)
    smoothed = smooth(synthetic_curve(lrs))
    lowest = min(range(100), key=smoothed.__getitem__)
    suggestion = suggest(lrs, smoothed)
    assert suggestion.minimum_at == lrs[lowest]
    assert suggestion.lr == pytest.approx(lrs[lowest] / 10)
    # Inside the falling part of the raw curve, where training makes progress.
    assert 1e-4 < suggestion.lr < 1e-1


def quickstart(**changes) -> Recipe:
    sections = {"model": {"name": "cnn"}, "data": {"source": "digits"}, "optim": {"lr": 3e-3},
                "train": {"micro_batch_size": 32, "epochs": 15}, "cluster": {"procs_per_node": 2}}
    for section, values in changes.items():
        sections[section] = {**sections.get(section, {}), **values}
    return Recipe.model_validate(sections)


def recipe_plan(recipe: Recipe):
    return build_plan(recipe, host=CPU, data=DIGITS, run_dir="runs/q-lr-find-x")


def test_the_range_test_runs_in_one_process_with_the_recipes_global_batch():
    plan = recipe_plan(quickstart(train={"grad_accum": 3}))
    assert (plan.topology.world_size, plan.training.batch.global_) == (2, 192)
    test = one_process_plan(plan, SourceMap(), SweepSettings(1e-6, 1.0, 40), CPU, {})
    assert test.topology.world_size == 1 and test.topology.backend == "local"
    # The host's 8 cores for its one process, unless the user's shell says otherwise.
    assert test.env["OMP_NUM_THREADS"] == "8"
    assert one_process_plan(plan, SourceMap(), SweepSettings(1e-6, 1.0, 40), CPU,
                            {"OMP_NUM_THREADS": "3"}).env["OMP_NUM_THREADS"] == "3"
    assert (test.training.batch.micro, test.training.batch.grad_accum, test.training.batch.global_) == (32, 6, 192)
    assert test.training.steps.total == 40
    # A constant LR at the sweep's start, unscaled: the sweep moves it step by step.
    assert (test.recipe.schedule.name, test.training.steps.warmup) == ("constant", 0)
    assert test.training.lr.scaled == 1e-6
    assert test.training.engine.deepspeed["optimizer"]["params"]["lr"] == 1e-6
    assert (test.training.engine.name, test.training.engine.zero_stage, test.training.engine.precision) == \
        (plan.training.engine.name, plan.training.engine.zero_stage, plan.training.engine.precision)


def test_the_recipe_lr_is_what_reference_batch_scaling_turns_into_the_suggestion():
    plan = recipe_plan(quickstart(optim={"reference_batch": 16}))
    assert plan.training.lr.rule == "sqrt"
    lr = recipe_lr(plan, 0.02)
    applied = recipe_plan(quickstart(optim={"reference_batch": 16, "lr": lr}))
    assert lr == pytest.approx(0.01)  # sqrt(64 / 16) = 2
    assert applied.training.lr.scaled == pytest.approx(0.02)
    assert recipe_lr(recipe_plan(quickstart()), 0.02) == 0.02


@pytest.mark.parametrize(("settings", "key"), [(SweepSettings(1e-3, 1e-3, 100), "--max-lr"),
                                                (SweepSettings(1e-2, 1e-3, 100), "--max-lr"),
                                                (SweepSettings(0.0, 1.0, 100), "--min-lr"),
                                                (SweepSettings(1e-7, 10.0, 9), "--steps")])
def test_settings_that_give_no_curve_are_refused(settings, key):
    with pytest.raises(UsageError) as info:
        settings.check()
    assert info.value.key == key
