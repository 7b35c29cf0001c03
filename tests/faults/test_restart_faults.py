"""Elastic restarts (train.max_restarts) on the local backend: a rank SIGKILLed at a
random step restarts the job within the one `dlaunch run`, which resumes from the
checkpoint before the kill and ends with the weights of an uninterrupted run
(DeepSpeed ZeRO-2, fp32, CPU, two nodes of one rank); a run that fails again after its
last restart stops, naming the rank, node, step and cause, with the rank's last log lines."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from launcher.faults import spec
from tests.conftest import assert_same_weights, dlaunch, kill_after, metrics, only_run_dir

pytestmark = pytest.mark.integration

HOST = socket.gethostname()
STEPS, CHECKPOINT_EVERY = 12, 4
# 320 training rows / (8 x 2 ranks x 2 accumulation) = 10 steps an epoch: a resume from
# step 4 or 8 crosses into epoch 1, and dropout makes each rank's restored RNG state matter.
RECIPE = f"""
name: restarts
model: {{name: mlp, kwargs: {{hidden: [32], dropout: 0.1}}}}
data: {{source: synthetic, samples: 400, num_features: 8, num_classes: 3, val_fraction: 0.2}}
optim: {{lr: 1.0e-2}}
schedule: {{name: cosine, warmup_steps: 3}}
engine: {{name: deepspeed, zero_stage: 2}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 8, grad_accum: 2, max_steps: {STEPS}, eval_every: {CHECKPOINT_EVERY},
        checkpoint_every: {CHECKPOINT_EVERY}, keep_last: 2, early_stopping: {{patience: null}}}}
logging: {{progress: false, report: false}}
"""


def train(root: Path, *, restarts: int, env: dict[str, str] | None = None):
    """`dlaunch run` of RECIPE on two nodes of one rank each; (the process, its run dir)."""
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    result = dlaunch("run", str(recipe), "--nodes", "2", "--procs-per-node", "1",
                     "--set", f"logging.run_root={root / 'runs'}", "--set", f"train.max_restarts={restarts}",
                     env=env)
    return result, only_run_dir(root / "runs")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every restarted one must end identical to."""
    result, run_dir = train(tmp_path_factory.mktemp("straight"), restarts=0)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


# Seeds whose draws kill each rank, before the first checkpoint (a restart from the
# first step), between two and after the last one (a restart into the run's end).
@pytest.mark.parametrize("seed", [4, 5, 7])
def test_a_rank_killed_at_a_random_step_restarts_and_ends_with_the_uninterrupted_weights(
        straight, tmp_path, seed):
    draw = random.Random(seed)
    rank, step = draw.randrange(2), draw.randrange(1, STEPS + 1)
    result, run_dir = train(tmp_path, restarts=1, env=kill_after(step, rank))
    assert result.returncode == 0, result.stderr[-3000:]

    assert f"error: rank {rank} (node {rank} on {HOST}, local rank 0) failed at step {step} (" in result.stderr
    resumed_at = step // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    start = f"checkpoint step-{resumed_at:08d}" if resumed_at else "the first step (no checkpoint yet)"
    assert result.stderr.count("dlaunch: restarting") == 1
    assert f"dlaunch: restarting (1 of 1) from {start}" in result.stderr
    assert [r["step"] for r in metrics(run_dir, "resume")] == ([resumed_at] if resumed_at else [])
    assert metrics(run_dir, "summary")[-1]["steps"] == STEPS
    assert_same_weights(run_dir, straight)


def test_a_run_killed_again_after_its_last_restart_stops_naming_rank_node_step_and_cause(tmp_path):
    # Rank 1 dies after step 5 in the first attempt, after step 10 in the second.
    result, run_dir = train(tmp_path, restarts=1, env=spec({"kind": "kill", "rank": 1, "every": 5}))
    assert result.returncode == 1
    assert result.stderr.count("dlaunch: restarting") == 1
    assert "dlaunch: restarting (1 of 1) from checkpoint step-00000004" in result.stderr

    final = result.stderr[result.stderr.rindex("error: rank"):].splitlines()
    assert final[0] == (f"error: rank 1 (node 1 on {HOST}, local rank 0) failed at step 10 (update): "
                        "killed before it could say why (SIGKILL, the OOM killer or a native crash)")
    assert final[1] == f"last lines of {run_dir / 'logs' / 'rank-1.log'}:"
    assert any("resumed from step-00000004 at step 4" in line for line in final)  # the second attempt's log
    assert final[-1] == "dlaunch: no restarts left (train.max_restarts: 1); the run failed"
    assert not (run_dir / "model.pt").exists()
