"""What the planner's environment for CPU ranks saves real DeepSpeed: with LOCAL_SIZE (the
ranks of a node, as DeepSpeed's own launcher sets it) its CPU accelerator counts its
devices without starting a process; without it, it runs `numactl --hardware` at every
count, and ZeRO-3 counts at every step."""

from __future__ import annotations

from tests.conftest import one_rank

# One rank trains three ZeRO-3 steps in the environment the plan gives its ranks,
# counting the processes started from the first step on.
PROBE = r"""
import json, os, subprocess, sys
import torch
from launcher.data.facts import DataFacts
from launcher.models.build import build_model, param_groups
from launcher.plan import HostFacts, build_plan
from launcher.recipe import Recipe

recipe = Recipe.model_validate({"model": {"name": "mlp"}, "engine": {"name": "deepspeed", "zero_stage": 3},
                                "train": {"micro_batch_size": 4}})
facts = DataFacts(num_rows=64, num_train=48, num_val=16, input_shape=(6,), num_classes=3)
plan = build_plan(recipe, host=HostFacts(has_cuda=False, cpus=1, hostname="probe"), data=facts, run_dir="unused")
os.environ.update(plan.env)

from launcher.trainer import create_engine

model = build_model(recipe.model, facts)
engine = create_engine(plan, model, param_groups(model, 0.0))
started = []
spawn = subprocess.Popen.__init__
def counted(self, args, *rest, **kwargs):
    started.append(args)
    spawn(self, args, *rest, **kwargs)
subprocess.Popen.__init__ = counted
for _ in range(3):
    engine.train_step([(torch.randn(4, 6), torch.randint(0, 3, (4,)))])
print(json.dumps({"env": plan.env, "started": [str(a) for a in started]}))
"""


def test_zero3_steps_on_the_cpu_start_no_process():
    seen = one_rank(PROBE)
    assert seen["started"] == []
    assert seen["env"]["LOCAL_SIZE"] == "1"
