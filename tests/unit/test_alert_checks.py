"""The alert checks and their policies, on hand-made step results."""

from __future__ import annotations

import json
import math

import pytest
import torch

from launcher.alerts import ALERTS, Alerts, AlertStop, NonFiniteLoss
from launcher.engines.base import StepResult
from launcher.recipe import AlertsConfig


def alerts(tmp_path, **cfg) -> Alerts:
    return Alerts(AlertsConfig.model_validate(cfg), tmp_path, write=True)


def step(norm: float | None = 1.0, applied: bool = True, modules: dict | None = None) -> StepResult:
    return StepResult(loss=torch.tensor(1.0), grad_norm=norm, applied=applied, module_grad_norms=modules)


def written(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / ALERTS).read_text().splitlines()]


def test_skip_policies_set_what_the_engine_must_not_apply(tmp_path):
    assert alerts(tmp_path).skip_above is None
    assert alerts(tmp_path, nonfinite={"policy": "skip"}).skip_above == math.inf
    assert alerts(tmp_path, exploding_grad={"threshold": 50.0, "policy": "skip"}).skip_above == 50.0


def test_exploding_gradients_warn_skip_or_stop(tmp_path):
    assert alerts(tmp_path).check(3, 0.5, [], step(150.0))[0].action == "warned"
    skipping = alerts(tmp_path, exploding_grad={"policy": "skip"})
    assert skipping.check(4, 0.5, [], step(150.0, applied=False))[0].action == "skipped"
    with pytest.raises(AlertStop, match=r"step 5: gradient norm 150 is above 100"):
        alerts(tmp_path, exploding_grad={"policy": "stop"}).check(5, 0.5, [], step(150.0))
    assert [(a["kind"], a["step"], a["action"]) for a in written(tmp_path)] == [
        ("exploding_grad", 3, "warned"), ("exploding_grad", 4, "skipped"), ("exploding_grad", 5, "stopped")]
    assert alerts(tmp_path).check(6, 0.5, [], step(99.0)) == []


def test_nonfinite_steps_stop_by_default_and_are_skipped_only_when_the_engine_skipped_them(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"step 7: loss is nan on rank\(s\) \[1\]; the last good "
                                             r"checkpoint is none"):
        alerts(tmp_path).check(7, math.nan, [1], step(math.inf))
    skipping = alerts(tmp_path, nonfinite={"policy": "skip"})
    assert skipping.check(8, math.nan, [0, 1], step(math.inf, applied=False))[0].action == "skipped"
    assert skipping.skipped == 1
    with pytest.raises(NonFiniteLoss, match="and the engine applied the step"):
        skipping.check(9, math.nan, [0], step(math.nan, applied=True))


def test_an_fp16_overflow_is_the_loss_scalers_business_but_a_nan_loss_still_stops(tmp_path):
    overflow = StepResult(loss=torch.tensor(1.0), grad_norm=math.inf, applied=False, overflow=True)
    assert alerts(tmp_path).check(3, 0.5, [], overflow) == []
    assert not (tmp_path / ALERTS).exists()
    with pytest.raises(NonFiniteLoss, match="step 4: loss is nan"):
        alerts(tmp_path).check(4, math.nan, [0], overflow)


def test_a_loss_spike_is_measured_against_the_median_of_the_window(tmp_path):
    checks = alerts(tmp_path, loss_spike={"factor": 3.0, "window": 4})
    for i, loss in enumerate([1.0, 1.2, 0.9, 5.0]):  # no alert before the window is full
        assert checks.check(i + 1, loss, [], step()) == []
    [spike] = checks.check(5, 10.0, [], step())
    assert spike.kind == "loss_spike" and "above 3 x the median 1.1" in spike.message
    assert checks.check(6, 2.0, [], step()) == []


def test_a_vanishing_module_alerts_once_per_episode(tmp_path):
    checks = alerts(tmp_path, vanishing_grad={"threshold": 1e-6, "checks": 3})
    found = [checks.check(i, 1.0, [], step(modules={"head": 0.5, "body": 0.0})) for i in range(1, 6)]
    assert [a.step for step_alerts in found for a in step_alerts] == [3]
    assert "module 'body'" in found[2][0].message
    checks.check(6, 1.0, [], step(modules={"body": 1.0}))  # recovers
    again = [checks.check(i, 1.0, [], step(modules={"body": 0.0})) for i in range(7, 10)]
    assert [a.step for step_alerts in again for a in step_alerts] == [9]


def test_a_restored_alerts_state_alerts_where_the_uninterrupted_run_would(tmp_path):
    """A resumed run goes on with the checkpointed loss window and vanishing counts: the
    module whose third low check comes at step 3 (two before the resume) and the spike at
    step 6 (half its window before the resume) are caught as without a resume."""
    cfg = {"loss_spike": {"window": 4}, "vanishing_grad": {"checks": 3}}
    quiet = step(modules={"head": 0.0})
    straight, before = alerts(tmp_path, **cfg), alerts(tmp_path, **cfg)
    for s in (1, 2):
        assert straight.check(s, 1.0, [], quiet) == [] and before.check(s, 1.0, [], quiet) == []
    resumed = alerts(tmp_path, **cfg)
    resumed.load_state_dict(json.loads(json.dumps(before.state_dict())))  # as trainer.json holds it
    for s, loss in ((3, 1.0), (4, 1.0), (5, 1.0), (6, 9.0)):
        expected = [(a.kind, a.step) for a in straight.check(s, loss, [], quiet)]
        assert [(a.kind, a.step) for a in resumed.check(s, loss, [], quiet)] == expected
        if s == 3:
            assert expected == [("vanishing_grad", 3)]
        if s == 6:
            assert expected == [("loss_spike", 6)]
