"""The trainer's per-step loss collective runs between a step's backward pass and its
optimizer update (launcher/engines/base.py's BeforeUpdate): once a step, with the mean
loss of all its micro-batches, while every gradient is there and no weight has moved.
Each engine trains a real step on one CPU rank, in a process of its own (DeepSpeed and
Accelerate keep process-wide state)."""

from __future__ import annotations

import pytest

from tests.conftest import one_rank

PROBE = r"""
import json, sys
import torch
from launcher.data.facts import DataFacts
from launcher.models.build import build_model, param_groups
from launcher.plan import HostFacts, build_plan
from launcher.recipe import Recipe
from launcher.trainer import create_engine

engine_name, stage = sys.argv[1], int(sys.argv[2])
engine_cfg = {"name": engine_name, "zero_stage": stage} if engine_name == "deepspeed" else {"name": engine_name}
recipe = Recipe.model_validate({"model": {"name": "mlp"}, "engine": engine_cfg, "optim": {"lr": 0.1},
                                "train": {"micro_batch_size": 4, "grad_accum": 2}})
facts = DataFacts(num_rows=64, num_train=48, num_val=16, input_shape=(6,), num_classes=3)
plan = build_plan(recipe, host=HostFacts(has_cuda=False, cpus=1, hostname="probe"), data=facts, run_dir="unused")
torch.manual_seed(0)
model = build_model(recipe.model, facts)
engine = create_engine(plan, model, param_groups(model, recipe.optim.weight_decay))
if engine_name == "deepspeed":  # whole gradients (and ZeRO-3's weights), whatever ZeRO partitions
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad as grad_of

    def weight_of(param):
        return safe_get_full_fp32_param(param) if stage == 3 else param
else:
    def weight_of(param):
        return param

    def grad_of(param):
        return param.grad

def weights():
    return [weight_of(p).detach().clone() for p in engine.module.parameters()]

before = weights()
micro_batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(2)]

calls = []

def before_update(loss):
    calls.append({
        "loss": loss.item(),
        "weights_unchanged": all(torch.equal(w, b) for w, b in zip(weights(), before)),
        "gradients": all(grad_of(p) is not None and bool(grad_of(p).abs().sum() > 0)
                         for p in engine.module.parameters()),
    })

result = engine.train_step(micro_batches, before_update=before_update)
changed = all(not torch.equal(w, b) for w, b in zip(weights(), before))
print(json.dumps({"calls": calls, "loss": result.loss.item(), "changed_after": changed}))
"""


@pytest.mark.parametrize(("engine", "stage"), [("deepspeed", 0), ("deepspeed", 2), ("deepspeed", 3),
                                               ("accelerate", 0)])
def test_the_loss_collective_sees_the_gradients_before_the_update(engine, stage):
    seen = one_rank(PROBE, engine, str(stage))
    assert len(seen["calls"]) == 1, seen  # once a step, not once a micro-batch
    call = seen["calls"][0]
    assert call["loss"] == pytest.approx(seen["loss"])  # the mean over both micro-batches
    assert call["gradients"] and call["weights_unchanged"], call
    assert seen["changed_after"], seen
