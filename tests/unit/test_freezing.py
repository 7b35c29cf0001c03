"""model.freeze, model.unfreeze and optim.lr_multipliers on real modules and a real
torch optimizer: which parameters they name, the param groups and LRs they make, and
what a training step does to frozen, held and trainable parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from launcher.data.facts import DataFacts
from launcher.errors import UsageError
from launcher.models.build import build_model
from launcher.models.transfer import NEVER, Transfer
from launcher.recipe import ModelConfig, Recipe
from launcher.schedules import LRSchedule, ScheduleShape

DIGITS = DataFacts(num_rows=1797, num_train=1438, num_val=359, input_shape=(1, 8, 8), num_classes=10)


def cnn() -> nn.Module:
    return build_model(ModelConfig(name="cnn", kwargs={"channels": [8, 16]}), DIGITS)


def recipe(model: dict | None = None, optim: dict | None = None) -> Recipe:
    return Recipe.model_validate({"model": model or {}, "optim": optim or {}})


def transfer_error(model: dict | None = None, optim: dict | None = None) -> UsageError:
    with pytest.raises(UsageError) as info:
        Transfer.of(cnn(), recipe(model, optim))
    return info.value


def test_each_parameter_gets_its_start_step_and_lr_multiplier():
    transfer = Transfer.of(cnn(), recipe(
        {"freeze": ["stem.*", "blocks.*"], "unfreeze": [{"at_step": 5, "patterns": ["blocks.1.*"]},
                                                        {"at_step": 9, "patterns": ["*"]}]},
        {"lr_multipliers": {"blocks.1.*": 0.5, "*": 2.0}}))
    assert transfer.starts["head.weight"] == 0
    assert transfer.starts["blocks.1.conv1.0.weight"] == 5  # the earliest step that names it
    assert transfer.starts["stem.0.0.weight"] == transfer.starts["blocks.0.conv1.0.weight"] == 9
    assert transfer.multipliers["blocks.1.conv1.0.weight"] == 0.5  # the first matching pattern wins
    assert transfer.multipliers["blocks.0.conv1.0.weight"] == transfer.multipliers["head.bias"] == 2.0


def test_a_pattern_that_matches_no_parameter_names_itself_and_some_parameters():
    error = transfer_error({"freeze": ["stem.*", "heads.*"]})
    assert error.key == "model.freeze"
    assert error.message == ("'heads.*' matches no parameter; the parameters are named like stem.0.0.weight, "
                             "blocks.0.conv1.0.weight, head.weight (20 in all)")


def test_unfreeze_names_frozen_parameters():
    error = transfer_error({"freeze": ["stem.*"], "unfreeze": [{"at_step": 2, "patterns": ["blocks.*"]}]})
    assert error.key == "model.unfreeze.0.patterns"
    assert error.message.startswith("'blocks.*' matches no frozen parameter; the frozen parameters are named "
                                    "like stem.0.0.weight")


def test_a_multiplier_pattern_shadowed_by_an_earlier_one_is_refused():
    error = transfer_error(optim={"lr_multipliers": {"blocks.*": 0.5, "blocks.1.*": 0.1}})
    assert error.key == "optim.lr_multipliers"
    assert error.message == ("'blocks.1.*' sets no parameter's LR: an earlier pattern, 'blocks.*', "
                             "matches all of its")


def test_frozen_parameters_leave_the_groups_and_the_rest_split_by_multiplier_start_and_decay():
    model = cnn()
    transfer = Transfer.of(model, recipe({"freeze": ["stem.*", "blocks.*"],
                                          "unfreeze": [{"at_step": 3, "patterns": ["blocks.1.*"]}]},
                                         {"lr_multipliers": {"blocks.*": 0.5}}))
    transfer.freeze(model)
    groups = transfer.param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    summary = [({k: v for k, v in g.items() if k != "params"}, sorted(names[id(p)] for p in g["params"]))
               for g in groups]
    blocks1 = sorted(n for n in names.values() if n.startswith("blocks.1."))
    assert summary == [
        ({"weight_decay": 0.1, "lr_multiplier": 0.5, "start_step": 3},
         [n for n in blocks1 if n.endswith("0.weight")]),
        ({"weight_decay": 0.1}, ["head.weight"]),
        ({"weight_decay": 0.0, "lr_multiplier": 0.5, "start_step": 3},
         [n for n in blocks1 if not n.endswith("0.weight")]),
        ({"weight_decay": 0.0}, ["head.bias"]),
    ]
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if n.startswith(("stem.", "blocks.0.")))


def test_the_schedule_scales_each_group_and_holds_a_later_one_at_zero():
    groups = [{"params": [nn.Parameter(torch.zeros(1))]},
              {"params": [nn.Parameter(torch.zeros(1))], "lr_multiplier": 0.25},
              {"params": [nn.Parameter(torch.zeros(1))], "lr_multiplier": 0.5, "start_step": 2}]
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    shape = ScheduleShape(name="linear", total_steps=4, warmup_steps=0, min_lr_ratio=0.0)
    schedule = LRSchedule(optimizer, shape)
    seen = []
    for _ in range(3):
        seen.append((schedule.lr, schedule.get_last_lr(), schedule.group_lrs()))
        schedule.step()
    assert seen == [
        (1.0, [1.0, 0.25, 0.0], {"x1": 1.0, "x0.25": 0.25, "x0.5@2": 0.0}),
        (0.75, [0.75, 0.1875, 0.0], {"x1": 0.75, "x0.25": 0.1875, "x0.5@2": 0.0}),
        (0.5, [0.5, 0.125, 0.25], {"x1": 0.5, "x0.25": 0.125, "x0.5@2": 0.25}),
    ]


def test_held_parameters_stay_bit_identical_until_their_step_then_train_with_fresh_adam_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    transfer = Transfer.of(model, recipe({"freeze": ["0.*", "2.*"],
                                          "unfreeze": [{"at_step": 3, "patterns": ["2.*"]}]}))
    transfer.freeze(model)
    optimizer = torch.optim.AdamW(transfer.param_groups(model, weight_decay=0.1), lr=1e-2)
    schedule = LRSchedule(optimizer, ScheduleShape(name="constant", total_steps=6, warmup_steps=0))
    transfer.hold(model, schedule)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs, targets = torch.randn(16, 4), torch.randint(3, (16,))
    changed, held_step_counts = [], []
    for _ in range(5):
        nn.functional.cross_entropy(model(inputs), targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        held_grad = model[2].weight.grad.clone()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        changed.append({name[0] for name, p in model.named_parameters() if not torch.equal(p, start[name])})
        held_step_counts.append(float(optimizer.state[model[2].weight]["step"]))
    assert changed == [{"4"}] * 3 + [{"2", "4"}] * 2
    assert torch.count_nonzero(held_grad) > 0  # its gradient flows once it trains
    # Its Adam state starts with its first update: step counts 1, 2 as a new group's would.
    assert held_step_counts == [1, 2, 3, 1, 2]
    assert model[0].weight.grad is None


def test_held_gradients_count_in_no_gradient_norm():
    torch.manual_seed(0)
    free, held = nn.Linear(4, 3), nn.Linear(4, 3)
    held.load_state_dict(free.state_dict())
    inputs = torch.randn(8, 4)
    model = nn.ModuleDict({"a": free, "b": held})
    transfer = Transfer.of(model, recipe({"freeze": ["b.*"],
                                          "unfreeze": [{"at_step": 1, "patterns": ["b.*"]}]}))
    schedule = LRSchedule(torch.optim.SGD(transfer.param_groups(model, 0.0), lr=1.0),
                          ScheduleShape(name="constant", total_steps=3, warmup_steps=0))
    transfer.hold(model, schedule)
    (free(inputs).sum() + held(inputs).sum()).backward()
    assert torch.count_nonzero(held.weight.grad) == 0
    assert transfer.held_modules(0) == {"b"} and transfer.held_modules(1) == set()


def test_a_frozen_batchnorm_layer_keeps_its_running_statistics_in_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2), nn.BatchNorm1d(2))
    transfer = Transfer.of(model, recipe({"freeze": ["0.*", "1.*"]}))
    transfer.freeze(model)
    transfer.hold(model, LRSchedule(torch.optim.SGD(transfer.param_groups(model, 0.0), lr=0.1),
                                    ScheduleShape(name="constant", total_steps=3, warmup_steps=0)))
    assert transfer.starts["1.weight"] == NEVER
    model.train()
    model(torch.randn(32, 4) + 3)
    frozen, trained = model[1], model[3]
    assert torch.equal(frozen.running_mean, torch.zeros(6)) and int(frozen.num_batches_tracked) == 0
    assert not frozen.training
    assert not torch.equal(trained.running_mean, torch.zeros(2)) and trained.training
