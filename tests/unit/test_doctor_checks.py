"""`dlaunch doctor`'s checks on small hand-made tensors and models: each catches its own
failure and passes the healthy case; and the runner, in this process, on small recipes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from launcher.data.facts import describe
from launcher.doctor import (
    GRADIENTS,
    CheckResult,
    InputStats,
    _isolated,
    check_gradients,
    check_initial_loss,
    check_labels,
    check_loader_speed,
    check_normalisation,
    check_overfit,
    format_results,
    results_json,
    run_doctor,
)
from launcher.plan import HostFacts, LaunchPlan, build_plan
from launcher.recipe import Recipe


def _mlp(features: int = 6, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, classes))


def _batch(rows: int = 8, features: int = 6, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(rows, features, generator=gen), torch.arange(rows) % classes


# -- inputs normalised ---------------------------------------------------------------------

def test_standardised_images_pass_per_channel():
    images = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = check_normalisation(InputStats.of(images))
    assert result.verdict == "PASS", result.detail
    assert result.figures["unit"] == "channel" and result.figures["units"] == 3


def test_statistics_summed_over_batches_equal_those_of_the_whole():
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0)) * 3 + 2
    stats = InputStats()
    for part in x.split(7):
        stats.add(part)
    mean, std = stats.mean_std()
    assert torch.allclose(mean, x.double().mean(0))
    assert torch.allclose(std, x.double().std(0, correction=0))


def test_features_in_raw_units_fail_naming_the_worst():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    x[:, 2] = x[:, 2] * 1000 + 500  # e.g. an income in dollars beside standardised features
    result = check_normalisation(InputStats.of(x))
    assert result.verdict == "FAIL"
    assert result.detail.startswith("feature 2 of 4 outside")


def test_pixels_scaled_to_unit_range_only_warn():
    # digits with data.normalize: false: intensities in [0, 1], mean ~0.3, std ~0.37
    pixels = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.75
    result = check_normalisation(InputStats.of(pixels))
    assert result.verdict == "WARN", result.detail
    assert "channel 0 of 1" in result.detail


def test_constant_features_are_judged_on_their_mean_alone():
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
    x[:, 1] = 0.0  # a border pixel that never lights up, left unscaled by normalisation
    assert check_normalisation(InputStats.of(x)).verdict == "PASS"
    x[:, 1] = 7.0
    assert check_normalisation(InputStats.of(x)).verdict == "FAIL"


def test_a_nan_input_fails():
    x = torch.randn(10, 3)
    x[4, 1] = float("nan")
    result = check_normalisation(InputStats.of(x))
    assert result.verdict == "FAIL" and "1 inputs are NaN or Inf" in result.detail


# -- labels ------------------------------------------------------------------------------

def test_balanced_labels_in_range_pass():
    result = check_labels(torch.arange(100) % 4, 4)
    assert result.verdict == "PASS", result.detail
    assert result.figures["counts"] == [25, 25, 25, 25]


@pytest.mark.parametrize("bad", [4, 9, -1])
def test_a_label_outside_the_classes_fails(bad):
    labels = torch.arange(100) % 4
    labels[17] = bad
    result = check_labels(labels, 4)
    assert result.verdict == "FAIL"
    assert "1 of 100 labels outside 0..3" in result.detail


def test_a_class_without_rows_warns():
    result = check_labels(torch.tensor([0, 1, 3, 0, 1, 3]), 4)
    assert result.verdict == "WARN" and "no training rows: 2" in result.detail


def test_one_class_ten_times_another_warns():
    labels = torch.cat([torch.zeros(110), torch.ones(10), torch.full((50,), 2)]).long()
    result = check_labels(labels, 3)
    assert result.verdict == "WARN" and "class 0 has 11.0x the rows of class 1" in result.detail
    assert check_labels(torch.cat([torch.zeros(90), torch.ones(10)]).long(), 2).verdict == "PASS"  # 9x


def test_token_targets_are_range_checked_but_not_balanced():
    skewed = torch.zeros(4, 10, dtype=torch.long)
    skewed[0, 0] = 63
    result = check_labels(skewed, 64, tokens=True)
    assert result.verdict == "PASS" and "balance not judged" in result.detail
    skewed[1, 1] = 64
    assert check_labels(skewed, 64, tokens=True).verdict == "FAIL"


# -- gradients -----------------------------------------------------------------------------

class Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).detach())


class DeadBranch(nn.Module):
    """A branch added times zero: in the graph, but its gradient is always zero."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.dead = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + 0.0 * self.dead(x)


class ZeroInitResidual(nn.Module):
    """x + scale * f(x) with scale starting at 0 (as the CNN's zero-initialised last norm):
    f gets no gradient at init, and does after one step."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.zeros(6))
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.scale * torch.relu(self.inner(x)))


def test_every_parameter_of_a_healthy_model_gets_a_gradient():
    result = check_gradients(_mlp(), *_batch())
    assert result.verdict == "PASS", result.detail
    assert result.figures["parameters"] == 4


def test_a_detached_layer_fails_naming_the_parameters_before_it():
    model = Detached()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = check_gradients(model, *_batch())
    assert result.verdict == "FAIL"
    assert result.figures["no_gradient"] == ["body.0.weight", "body.0.bias"]
    assert "no gradient (detached or unused): body.0.weight, body.0.bias" in result.detail
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the check changed the model"


def test_a_gradient_that_stays_zero_fails():
    result = check_gradients(DeadBranch(), *_batch())
    assert result.verdict == "FAIL"
    assert result.figures["zero_after_a_step"] == ["dead.weight", "dead.bias"]


def test_a_path_behind_a_zero_initialised_scale_passes_after_one_step():
    result = check_gradients(ZeroInitResidual(), *_batch())
    assert result.verdict == "PASS", result.detail
    assert result.figures["zero_at_init"] == ["inner.weight", "inner.bias"]


def test_a_non_finite_gradient_fails():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    result = check_gradients(model, *_batch())
    assert result.verdict == "FAIL" and "non-finite gradient" in result.detail


def test_soft_targets_from_mixing_are_accepted():
    x, y = _batch()
    soft = torch.nn.functional.one_hot(y, 4).float() * 0.9 + 0.025
    assert check_gradients(_mlp(), x, soft).verdict == "PASS"


# -- overfit one batch ---------------------------------------------------------------------

def test_a_model_with_capacity_overfits_eight_samples():
    result = check_overfit(_mlp(), *_batch(), steps=300)
    assert result.verdict == "PASS", result.detail
    assert result.figures["final"] < 0.05 and result.figures["steps"] < 300


class BiasOnly(nn.Module):
    """Ignores its inputs: it can learn the class prior, never the samples."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), 4)


def test_a_model_that_ignores_its_inputs_cannot_overfit():
    result = check_overfit(BiasOnly(), *_batch(), steps=100)  # 2 rows of each class: log 4 at best
    assert result.verdict == "FAIL", result.detail
    assert result.figures["final"] == pytest.approx(math.log(4), abs=1e-3)


def test_too_few_steps_to_get_there_warn():
    result = check_overfit(_mlp(), *_batch(), steps=40, lr=3e-3)
    assert result.verdict == "WARN", result.detail
    assert result.figures["steps"] == 40


# -- initial loss --------------------------------------------------------------------------

def test_a_default_initialised_model_starts_near_log_classes():
    result = check_initial_loss(_mlp(), [_batch(), _batch()], 4)
    assert result.verdict == "PASS", result.detail
    assert result.figures["expected"] == pytest.approx(math.log(4))


@pytest.mark.parametrize(("scale", "verdict"), [(8.0, "WARN"), (40.0, "FAIL")])
def test_an_oversized_final_layer_starts_too_confident(scale, verdict):
    model = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(scale)
        model[2].bias.mul_(scale)
    result = check_initial_loss(model, [_batch()], 4)
    assert result.verdict == verdict, result.detail


# -- loader speed, isolation, output -----------------------------------------------------

def test_a_loader_slower_than_the_step_warns():
    assert check_loader_speed(0.001, 0.02).verdict == "PASS"
    slow = check_loader_speed(0.03, 0.02)
    assert slow.verdict == "WARN" and "data.num_workers" in slow.detail


def test_a_crashing_check_is_its_own_fail():
    def crash() -> CheckResult:
        raise IndexError("Target 7 is out of bounds.")

    result = _isolated(GRADIENTS, crash)
    assert (result.name, result.verdict) == (GRADIENTS, "FAIL")
    assert result.detail == "crashed: IndexError: Target 7 is out of bounds."


def test_table_verdict_line_and_json():
    results = [CheckResult("a", "PASS", "fine"), CheckResult("bb", "SKIP", "n/a"),
               CheckResult("c", "FAIL", "bad", {"loss": float("nan")})]
    table = format_results(results, 1.25).splitlines()
    assert table[0].split() == ["check", "verdict", "detail"]
    assert table[3].split() == ["c", "FAIL", "bad"]
    assert table[-1] == "doctor: FAIL: 1 PASS, 1 FAIL, 1 SKIP in 1.2s; fix c before a long run"
    data = json.loads(results_json(results, 1.25, "r.yaml"))  # NaN is no JSON: it becomes null
    assert data["verdict"] == "FAIL" and data["checks"][2]["figures"] == {"loss": None}


# -- the runner --------------------------------------------------------------------------

def _plan(**sections) -> LaunchPlan:
    recipe = Recipe.model_validate({"train": {"micro_batch_size": 16}, "cluster": {"procs_per_node": 1},
                                    **sections})
    return build_plan(recipe, host=HostFacts(has_cuda=False, cpus=1, hostname="test"),
                      data=describe(recipe.data), run_dir="runs/doctor")


def test_a_model_with_fewer_outputs_than_classes_fails_labels_and_each_check_reports_its_own_crash():
    plan = _plan(model={"target": "torch.nn:Linear", "kwargs": {"in_features": 16, "out_features": 3}},
                 data={"source": "synthetic", "samples": 320, "num_features": 16, "num_classes": 4})
    results = {r.name: r for r in run_doctor(plan, overfit_steps=1)}
    assert results["labels"].verdict == "FAIL"
    assert "outside 0..2 (the model's 3 outputs): they span 0..3" in results["labels"].detail
    for name in ("gradients", "overfit one batch", "initial loss"):  # the loss cannot score label 3
        assert results[name].verdict == "FAIL" and results[name].detail.startswith("crashed: IndexError")
    assert results["inputs normalised"].verdict == "PASS"


def test_the_normalisation_check_sees_the_inputs_after_the_loader_normalised_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"income": rng.normal(5e4, 2e4, 320), "age": rng.normal(40, 12, 320),
                             "label": rng.integers(0, 2, 320)}), tmp_path / "rows.parquet")
    data = {"source": "parquet", "path": str(tmp_path / "rows.parquet")}
    [normalised] = [r for r in run_doctor(_plan(data=data), overfit_steps=1) if r.name == "inputs normalised"]
    assert normalised.verdict == "PASS", normalised.detail
    [raw] = [r for r in run_doctor(_plan(data={**data, "normalize": False}), overfit_steps=1)
             if r.name == "inputs normalised"]
    assert raw.verdict == "FAIL" and raw.detail.startswith("feature 0 and 1 more of 2"), raw.detail
