"""model.init_from: what a path names, reading state dicts and safetensors files, the
check that they fit the model, and what the planner makes of a transfer recipe."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from launcher.data.facts import DataFacts
from launcher.errors import UsageError
from launcher.models.build import build_model
from launcher.models.facts import WeightsSource
from launcher.models.transfer import check_fit, describe_model, load_initial_weights, shapes_of
from launcher.models.weights import read_shapes, read_weights, resolve
from launcher.plan import HostFacts, build_plan, format_plan
from launcher.recipe import ModelConfig, Recipe

DIGITS = DataFacts(num_rows=1797, num_train=1438, num_val=359, input_shape=(1, 8, 8), num_classes=10)
CNN = {"name": "cnn", "kwargs": {"channels": [8, 16]}}


def cnn(num_classes: int = 10) -> nn.Module:
    facts = DataFacts(num_rows=100, num_train=80, num_val=20, input_shape=(1, 8, 8), num_classes=num_classes)
    return build_model(ModelConfig(**CNN), facts)


def usage_error(call, *args) -> UsageError:
    with pytest.raises(UsageError) as info:
        call(*args)
    return info.value


def test_a_path_names_a_runs_final_weights_a_checkpoints_engine_files_or_a_file(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000004" / "engine" / "deepspeed").mkdir(parents=True)
    (run / "checkpoints" / "step-00000008" / "engine").mkdir(parents=True)
    (run / "checkpoints" / "step-00000008" / "engine" / "model.safetensors").touch()
    (run / "plan.json").touch()
    assert "has not finished" in usage_error(resolve, str(run)).message
    (run / "model.pt").touch()
    assert resolve(str(run)) == WeightsSource(str(run / "model.pt"), "torch")
    assert resolve(str(run / "checkpoints" / "step-00000004")) == WeightsSource(
        str(run / "checkpoints" / "step-00000004" / "engine" / "deepspeed"), "deepspeed")
    assert resolve(str(run / "checkpoints" / "step-00000008")).format == "safetensors"
    (tmp_path / "weights.pth").touch()
    assert resolve(str(tmp_path / "weights.pth")).format == "torch"
    (tmp_path / "weights.npz").touch()
    assert "is not a weights file" in usage_error(resolve, str(tmp_path / "weights.npz")).message
    assert "does not exist" in usage_error(resolve, str(tmp_path / "nothing.pt")).message
    assert "neither a dlaunch run directory" in usage_error(resolve, str(tmp_path)).message


def test_a_state_dict_is_read_bare_or_inside_a_training_checkpoint(tmp_path):
    weights = {"w": torch.ones(2, 3, dtype=torch.bfloat16), "steps": torch.tensor(7)}
    torch.save({"epoch": 3, "state_dict": weights}, tmp_path / "lightning.ckpt.pt")
    source = resolve(str(tmp_path / "lightning.ckpt.pt"))
    assert read_shapes(source) == {"w": (2, 3), "steps": ()}
    read = read_weights(source)
    assert read["w"].dtype == torch.float32 and read["steps"].dtype == torch.int64
    torch.save([1, 2], tmp_path / "list.pt")
    assert "holds no state dict" in usage_error(read_shapes, resolve(str(tmp_path / "list.pt"))).message
    (tmp_path / "text.bin").write_text("not a tensor file")
    assert "cannot read" in usage_error(read_shapes, resolve(str(tmp_path / "text.bin"))).message


def test_safetensors_shapes_are_read_from_the_header(tmp_path):
    save_file({"a": torch.zeros(4, 5), "b": torch.zeros(3)}, tmp_path / "w.safetensors")
    assert read_shapes(resolve(str(tmp_path / "w.safetensors"))) == {"a": (4, 5), "b": (3,)}


def test_weights_that_do_not_fit_are_listed_in_one_error():
    model = {"stem.w": (4, 1), "head.weight": (10, 16), "head.bias": (10,)}
    source = {"stem.w": (4, 1), "head.weight": (5, 16), "head.bias": (5,), "aux.w": (2,)}
    error = usage_error(check_fit, model, source, [], "pre.pt")
    assert error.key == "model.init_from"
    assert error.message == (
        "pre.pt does not fit the model: 1 the model does not have (aux.w); 2 of another shape (head.weight: "
        "[5, 16] there, [10, 16] here, head.bias: [5] there, [10] here); list what should keep its new "
        "initialisation in model.init_exclude")
    assert check_fit(model, source, ["head.*", "aux.*"], "pre.pt") == {"head.weight", "head.bias", "aux.w"}
    missing = usage_error(check_fit, model, {"stem.w": (4, 1)}, [], "pre.pt")
    assert "2 of the model's weights missing (head.weight, head.bias)" in missing.message
    typo = usage_error(check_fit, model, source, ["heads.*"], "pre.pt")
    assert (typo.key, typo.message[:32]) == ("model.init_exclude", "'heads.*' matches no weight; the")


def test_initial_weights_replace_all_but_the_excluded_ones(tmp_path):
    torch.manual_seed(1)
    pretrained = cnn(num_classes=5)
    torch.save(pretrained.state_dict(), tmp_path / "pre.pt")
    torch.manual_seed(2)
    model = cnn()
    fresh_head = model.head.weight.detach().clone()
    load_initial_weights(model, resolve(str(tmp_path / "pre.pt")), ["head.*"])
    assert torch.equal(model.head.weight, fresh_head)
    for name, value in pretrained.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(model.state_dict()[name], value), name
    assert shapes_of(model)["head.weight"] == (10, 16)


def test_the_plan_shows_the_trainable_and_frozen_parameters_and_the_initial_weights(tmp_path):
    torch.save(cnn(num_classes=5).state_dict(), tmp_path / "pre.pt")
    recipe = Recipe.model_validate({"model": {**CNN, "init_from": str(tmp_path / "pre.pt"),
                                              "init_exclude": ["head.*"], "freeze": ["stem.*", "blocks.*"],
                                              "unfreeze": [{"at_step": 5, "patterns": ["blocks.1.*"]}]},
                                    "train": {"max_steps": 10}})
    facts = describe_model(recipe, DIGITS)
    model = cnn()
    count = {prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
             for prefix in ("", "head.", "blocks.1.")}
    assert (facts.params, facts.frozen, facts.unfrozen_later) == (
        count[""], count[""] - count["head."], count["blocks.1."])
    plan = build_plan(recipe, host=HostFacts(has_cuda=False, cpus=2, hostname="h"), data=DIGITS, run_dir="r",
                      model=facts)
    assert plan.training.model == facts
    text = format_plan(plan)
    frozen = count[""] - count["head."]
    assert (f"cnn, {count['']:,} parameters: {count['head.']:,} trainable, {frozen:,} frozen "
            f"({count['blocks.1.']:,} of them unfrozen later)") in text
    assert f"initial weights  {tmp_path / 'pre.pt'} (torch), except head.*" in text


def test_a_step_to_unfreeze_at_must_come_before_the_run_ends():
    recipe = Recipe.model_validate({"model": {**CNN, "freeze": ["stem.*"],
                                              "unfreeze": [{"at_step": 10, "patterns": ["stem.*"]}]},
                                    "train": {"max_steps": 10}})
    error = usage_error(lambda: build_plan(recipe, host=HostFacts(has_cuda=False, cpus=2, hostname="h"),
                                           data=DIGITS, run_dir="r", model=describe_model(recipe, DIGITS)))
    assert error.key == "model.unfreeze.0.at_step"
    assert error.message == ("step 10 is not before the run's end (10 steps): those parameters would "
                             "never train")


def test_fsdp_is_refused_gradual_unfreezing_whose_hooks_it_would_bypass():
    recipe = Recipe.model_validate({"model": {**CNN, "freeze": ["stem.*"],
                                              "unfreeze": [{"at_step": 2, "patterns": ["stem.*"]}]},
                                    "engine": {"name": "accelerate", "strategy": "fsdp"}, "train": {"max_steps": 10}})
    error = usage_error(lambda: build_plan(recipe, host=HostFacts(has_cuda=True, cpus=2, hostname="h"),
                                           data=DIGITS, run_dir="r", model=describe_model(recipe, DIGITS)))
    assert error.key == "model.unfreeze" and "use engine.strategy ddp or engine.name deepspeed" in error.message
