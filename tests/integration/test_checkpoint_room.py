"""The checkpoint and final-weights sizes that `dlaunch plan` prints, and `dlaunch run`
checks the run root's free space against (launcher/disk_room.py), set against real
files: each engine's checkpoint and model.pt as written on 2 ranks. (The refusals
themselves, on a real full file system: tests/integration/test_unwritable_run_root.py.)"""

from __future__ import annotations

import pytest

from launcher.plan import LaunchPlan, checkpoint_size, weights_size
from tests.conftest import dlaunch, only_run_dir

pytestmark = pytest.mark.integration

RECIPE = """name: sized
model: {{name: mlp, kwargs: {{hidden: [512, 512]}}}}  # 298K parameters: megabytes of states
data: {{source: synthetic, samples: 64, num_features: 64, num_classes: 4}}
engine: {{name: {engine}, zero_stage: {stage}}}
precision: {{dtype: {dtype}}}
train: {{micro_batch_size: 8, max_steps: 1}}
logging: {{run_root: {root}, progress: false, report: false, tensorboard: false}}
"""


@pytest.mark.parametrize("engine,stage,dtype", [
    ("deepspeed", 0, "bf16"),  # 16-bit weights, and the fp32 master copy with Adam's states
    ("deepspeed", 1, "fp32"),  # ZeRO 1-2 keep a master copy in fp32 training too
    ("deepspeed", 3, "bf16"),  # no 16-bit weights: the fp32 partitions are them
    ("accelerate", 0, "fp32"),  # fp32 weights and Adam's states
])
def test_the_checkpoint_size_the_plan_estimates_is_what_the_engine_writes(tmp_path, engine, stage, dtype):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(engine=engine, stage=stage, dtype=dtype, root=tmp_path / "runs"))
    result = dlaunch("run", str(recipe), "--procs-per-node", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "runs")
    plan = LaunchPlan.from_json((run_dir / "plan.json").read_text())
    estimate = checkpoint_size(plan)
    [step] = (run_dir / "checkpoints").glob("step-*")
    written = sum(path.stat().st_size for path in step.rglob("*") if path.is_file())
    # Above it: pickling's framing, the RNG states, the engine's own scripts and records.
    assert estimate <= written <= estimate * 1.05, (estimate, written)
    # The final weights: fp32 whatever the training precision.
    assert weights_size(plan) <= (run_dir / "model.pt").stat().st_size <= weights_size(plan) * 1.01
