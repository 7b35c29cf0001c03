"""LR schedule shapes, and the LRSchedule state that checkpoints carry."""

from __future__ import annotations

import pytest
import torch

from launcher.schedules import LRSchedule, ScheduleShape, lr_factor


def shape(name: str, **kw) -> ScheduleShape:
    return ScheduleShape(name=name, total_steps=kw.pop("total", 110), warmup_steps=kw.pop("warmup", 10), **kw)


def test_warmup_rises_linearly_and_never_starts_at_zero():
    s = shape("cosine")
    factors = [lr_factor(s, i) for i in range(10)]
    assert factors[0] > 0
    assert all(b > a for a, b in zip(factors, factors[1:]))
    assert lr_factor(s, 10) == pytest.approx(1.0)


def test_cosine_decays_to_the_floor():
    s = shape("cosine", min_lr_ratio=0.1)
    assert lr_factor(s, 60) == pytest.approx(0.55)
    assert lr_factor(s, 110) == pytest.approx(0.1)


def test_linear_decay_midpoint():
    assert lr_factor(shape("linear", min_lr_ratio=0.0), 60) == pytest.approx(0.5)


def test_warm_restarts_jump_back_to_the_peak():
    s = shape("cosine_restarts", restart_period=25, min_lr_ratio=0.0)
    assert lr_factor(s, 10) == pytest.approx(1.0)
    assert lr_factor(s, 34) < 0.05
    assert lr_factor(s, 35) == pytest.approx(1.0)  # second cycle starts


def test_warm_restart_cycles_grow_with_mult():
    s = shape("cosine_restarts", restart_period=10, restart_mult=2, min_lr_ratio=0.0)
    # cycles: [10, 20), [20, 40), [40, 80)
    assert lr_factor(s, 20) == pytest.approx(1.0)
    assert lr_factor(s, 30) == pytest.approx(0.5)  # halfway through the 20-step cycle
    assert lr_factor(s, 40) == pytest.approx(1.0)


def optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_schedule_sets_the_optimizer_lr_each_step():
    opt = optimizer()
    schedule = LRSchedule(opt, shape("constant", warmup=1, total=5))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    schedule.step()
    assert schedule.get_last_lr() == [pytest.approx(0.1)]


def test_plateau_halves_the_lr_after_patience_evals_without_improvement():
    opt = optimizer()
    schedule = LRSchedule(opt, shape("plateau", warmup=0), plateau_factor=0.5, plateau_patience=1)
    for value in (1.0, 0.9, 0.95):
        schedule.on_eval(value)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    schedule.on_eval(0.95)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_state_round_trip_restores_lr_and_plateau():
    opt = optimizer()
    schedule = LRSchedule(opt, shape("plateau", warmup=0), plateau_patience=0)
    schedule.on_eval(1.0)
    schedule.on_eval(2.0)
    for _ in range(3):
        schedule.step()
    restored_opt = optimizer()
    restored = LRSchedule(restored_opt, shape("plateau", warmup=0), plateau_patience=0)
    restored.load_state_dict(schedule.state_dict())
    assert restored.get_last_lr() == schedule.get_last_lr()
    assert restored.state_dict() == schedule.state_dict()


def test_a_new_peak_lr_applies_at_once_and_a_constant_schedule_keeps_it():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                           {"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 0.0}], lr=0.1)
    schedule = LRSchedule(opt, shape("constant", warmup=0, total=5))
    schedule.set_peak_lr(0.003)
    assert [g["lr"] for g in opt.param_groups] == [0.003, 0.003]
    schedule.step()  # what the engine does after the optimizer step
    assert schedule.get_last_lr() == [0.003, 0.003]
