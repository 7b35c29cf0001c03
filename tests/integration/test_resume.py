"""Resume is exact: N steps straight, and N/2 steps + SIGKILL + `--resume` N/2 steps, end
with identical weights (fp32, CPU). The resumed half crosses an epoch boundary, so a
resume that replays the wrong epoch's order (huggingface/accelerate#2823, #2016) fails
here; dropout makes the per-rank RNG state matter too, and gradient accumulation the
engines' micro-step counters. ZeRO-2, restarts within one `dlaunch run` and a kill
before the first checkpoint are the fault suite's (tests/faults/)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import dlaunch, kill_after, metrics, only_run_dir

pytestmark = pytest.mark.integration

# 400 rows, 80 held out: 320 train / (8 x 2 ranks x 2 accumulation) = 10 steps an epoch.
# N = 16: the run is killed after step 8 and resumes into epoch 1 at step 10.
RECIPE = """
name: resume
model: {{name: mlp, kwargs: {{hidden: [32], dropout: 0.1}}}}
data: {{source: synthetic, samples: 400, num_features: 8, num_classes: 3, val_fraction: 0.2}}
optim: {{lr: 1.0e-2}}
schedule: {{name: cosine, warmup_steps: 3}}
engine: {{name: {engine}, zero_stage: {stage}}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 8, grad_accum: 2, max_steps: 16, eval_every: 4, checkpoint_every: 4, keep_last: 2,
        early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, progress: false, report: false}}
"""
KILL_AFTER = 8


def run(tmp_path, name: str, engine: str, stage: int, env: dict | None = None):
    root = tmp_path / name
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(engine=engine, stage=stage, root=root))
    result = dlaunch("run", str(recipe), "--procs-per-node", "2", env=env)
    return result, only_run_dir(root)


@pytest.mark.parametrize("engine,stage", [("deepspeed", 3), ("accelerate", 0)])
def test_killed_and_resumed_run_ends_with_identical_weights(tmp_path, engine, stage):
    straight, straight_dir = run(tmp_path, "straight", engine, stage)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed, run_dir = run(tmp_path, "resumed", engine, stage,
                          env=kill_after(KILL_AFTER))
    assert killed.returncode != 0
    assert "rank 0" in killed.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{KILL_AFTER:08d}"
    assert not (run_dir / "model.pt").exists()

    resumed = dlaunch("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [resume] = metrics(run_dir, "resume")
    assert resume["step"] == KILL_AFTER

    expected = torch.load(straight_dir / "model.pt")
    actual = torch.load(run_dir / "model.pt")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs after resume"
    # The same evaluation at the end, to the last bit.
    assert metrics(run_dir, "summary")[-1]["val_loss"] == metrics(straight_dir, "summary")[-1]["val_loss"]

    # A finished run has nothing to resume: it is said, and nothing starts or is recorded.
    record = (run_dir / "metrics.jsonl").read_bytes()
    again = dlaunch("run", "--resume", str(run_dir))
    assert again.returncode == 0
    assert again.stderr == f"dlaunch: {run_dir} finished at step 16 (done); nothing to resume\n"
    assert (run_dir / "metrics.jsonl").read_bytes() == record



def replan(run_dir: Path, override: str) -> None:
    """What PBT does to a trial it clones into (cluster/tune.py): the run's plan made
    again from its recipe with another value, before the job resumes."""
    from launcher.data.facts import describe
    from launcher.host import detect_host
    from launcher.models.facts import model_facts
    from launcher.plan import build_plan
    from launcher.recipe import load_recipe

    recipe, _ = load_recipe(run_dir / "recipe.yaml", [override])
    data = describe(recipe.data)
    plan = build_plan(recipe, host=detect_host(), data=data, run_dir=str(run_dir), backend="local",
                      nodes=1, procs_per_node=2, model=model_facts(recipe, data))
    (run_dir / "plan.json").write_text(plan.to_json())


@pytest.mark.parametrize("engine,stage", [("deepspeed", 2), ("accelerate", 0)])
def test_a_checkpoint_resumed_under_a_larger_weight_decay_decays_the_weights_more(tmp_path, engine, stage):
    # Loading the optimizer state also loads the weight decay it was saved with; the
    # resumed run must step with its own recipe's (0.01 before the kill, 2.0 after).
    killed, run_dir = run(tmp_path, "same", engine, stage, env=kill_after(KILL_AFTER))
    assert killed.returncode != 0
    decayed_dir = tmp_path / "decayed"
    shutil.copytree(run_dir, decayed_dir)
    replan(decayed_dir, "optim.weight_decay=2.0")
    for resumed_dir in (run_dir, decayed_dir):
        resumed = dlaunch("run", "--resume", str(resumed_dir))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert [r["step"] for r in metrics(resumed_dir, "resume")] == [KILL_AFTER]

    same, decayed = torch.load(run_dir / "model.pt"), torch.load(decayed_dir / "model.pt")
    matrices = [name for name, weights in same.items() if weights.dim() >= 2]  # the decayed group
    assert matrices
    for name in matrices:
        assert decayed[name].norm() < 0.97 * same[name].norm(), name
