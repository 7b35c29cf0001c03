"""A PBT trial's job waits for Ray Tune at each evaluation (launcher/tune_gate.py): run
here on the local backend with the gate's environment, the trial's part played by the
test, which lets each evaluation through once every rank waits at it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import tune_gate
from launcher.progress import read_position
from tests.conftest import REPO, metrics, only_run_dir

pytestmark = pytest.mark.integration

RECIPE = """
model: {{name: mlp, kwargs: {{hidden: [16]}}}}
data: {{source: synthetic, samples: 320, num_features: 8, num_classes: 3}}
engine: {{name: accelerate}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 8, max_steps: 30, eval_every: 10, early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, progress: false, report: false}}
"""


def wait_until(condition, what: str, job: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None, f"the job ended while waiting for {what}"
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def waiting_at(run_dir: Path, rank: int) -> int | None:
    position = read_position(run_dir, rank)
    return position.step if position is not None and position.phase == "report" else None


def test_each_rank_waits_at_each_evaluation_until_the_trial_lets_it_through(tmp_path):
    root = tmp_path / "runs"
    recipe = tmp_path / "gated.yaml"
    recipe.write_text(RECIPE.format(root=root))
    job = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(recipe), "--procs-per-node", "2"],
                           cwd=REPO, env={**os.environ, tune_gate.ENV: "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Until the run dir is renamed into place, the root holds only its staging folder.
        wait_until(lambda: root.exists() and any(not p.name.startswith(".") for p in root.iterdir()),
                   "the run dir", job)
        run_dir = only_run_dir(root)
        for step in (10, 20):  # not at the last step, 30: nothing is left to decide there
            wait_until(lambda s=step: all(waiting_at(run_dir, rank) == s for rank in (0, 1)),
                       f"both ranks waiting at step {step}", job)
            # Waiting, and nothing past the evaluation: its checkpoint is in place for Tune.
            assert (run_dir / "checkpoints" / f"step-{step:08d}").is_dir()
            assert max(r["step"] for r in metrics(run_dir)) == step
            tune_gate.let_through(run_dir, step)
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert [r["step"] for r in metrics(run_dir, "eval")] == [10, 20, 30]
