"""Alerts in real runs, with faults planted by a model (model.target) that misbehaves at
a chosen training step: a NaN skipped or stopping the run, exploding gradients warned,
skipped or stopping it, and a module whose gradients vanish."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import dlaunch, metrics, only_run_dir

pytestmark = pytest.mark.integration

# FAULT_AT: the training forward pass (per rank) that misbehaves; FAULT: nan or a factor
# the output is scaled by; FAULT_RANK: the rank it happens on.
FAULTY_MODEL = """
import os, torch

class Faulty(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        # With DEAD set: a module in the graph times zero, whose gradients vanish.
        self.dead = torch.nn.Linear(16, 4) if os.environ.get("DEAD") else None
        self.calls = 0

    def forward(self, x):
        self.calls += self.training
        out = self.body(x)
        if self.dead is not None:
            out = out + 0.0 * self.dead(x)
        if self.calls == int(os.environ.get("FAULT_AT", "-1")) and os.environ["RANK"] == os.environ.get("FAULT_RANK", "0"):
            fault = os.environ["FAULT"]
            out = out * (float("nan") if fault == "nan" else float(fault))
        return out

def build():
    return Faulty()
"""


def run(tmp_path, engine: str, alerts: str, env: dict[str, str], stage: int | None = None, max_restarts: int = 0):
    stage = (2 if engine == "deepspeed" else 0) if stage is None else stage
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "faulty.py").write_text(FAULTY_MODEL)
    root = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{target: "faulty:build"}}
data: {{source: synthetic, samples: 640, num_features: 16, num_classes: 4}}
optim: {{lr: 1.0e-2}}
engine: {{name: {engine}, zero_stage: {stage}}}
precision: {{dtype: fp32}}
alerts: {alerts}
train: {{micro_batch_size: 16, max_steps: 20, checkpoint_every: 4, eval_every: 4, early_stopping: {{patience: null}},
        max_restarts: {max_restarts}}}
logging: {{run_root: {root}, progress: false, report: false, log_every: 1}}
""")
    result = dlaunch("run", str(recipe), "--procs-per-node", "2", cwd=tmp_path, env=env)
    return result, only_run_dir(root)


def alerts_of(run_dir) -> list[tuple[str, int, str]]:
    path = run_dir / "alerts.jsonl"
    return [(a["kind"], a["step"], a["action"]) for a in map(json.loads, path.read_text().splitlines())] \
        if path.exists() else []


@pytest.mark.parametrize("engine", ["deepspeed", "accelerate"])
def test_a_planted_nan_is_skipped_when_the_recipe_says_so(tmp_path, engine):
    result, run_dir = run(tmp_path, engine, "{nonfinite: {policy: skip}}",
                          {"FAULT": "nan", "FAULT_AT": "6", "FAULT_RANK": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("nonfinite", 6, "skipped") in alerts_of(run_dir)
    [bad] = [r for r in metrics(run_dir, "train") if r["step"] == 6]
    assert bad["loss"] is None  # JSON has no NaN: the skipped step's loss is null
    weights = torch.load(run_dir / "model.pt")
    assert all(torch.isfinite(w).all() for w in weights.values()), "a NaN reached the weights"
    assert metrics(run_dir, "summary")[0]["val_acc"] > 0.5


def test_a_planted_nan_stops_the_run_under_zero3_where_deepspeed_cannot_skip_it(tmp_path):
    # The planner refuses skip there; the default policy, stop, ends the run cleanly.
    result, run_dir = run(tmp_path, "deepspeed", "{}", {"FAULT": "nan", "FAULT_AT": "6", "FAULT_RANK": "1"},
                          stage=3)
    assert result.returncode == 1
    assert "step 6: loss is nan on rank(s) [1]; the last good checkpoint is step-00000004" in result.stderr
    assert alerts_of(run_dir) == [("nonfinite", 6, "stopped")]
    refused = dlaunch("plan", str(tmp_path / "recipe.yaml"), "--set", "alerts.nonfinite.policy=skip",
                      cwd=tmp_path)
    assert refused.returncode == 2
    assert "error: alerts.nonfinite.policy (--set): DeepSpeed checks gradients for NaN/Inf in ZeRO stages 1-2" \
        in refused.stderr


def test_exploding_gradients_are_skipped_with_accelerate(tmp_path):
    clean, clean_dir = run(tmp_path / "clean", "accelerate", "{exploding_grad: {policy: skip}}", {})
    exploded, run_dir = run(tmp_path / "exploded", "accelerate", "{exploding_grad: {policy: skip}}",
                            {"FAULT": "1e5", "FAULT_AT": "6"})
    assert clean.returncode == 0 and exploded.returncode == 0, (clean.stderr + exploded.stderr)[-3000:]
    assert alerts_of(clean_dir) == []
    assert alerts_of(run_dir) == [("exploding_grad", 6, "skipped")]
    [record] = [r for r in metrics(run_dir, "train") if r["step"] == 6]
    assert record["grad_norm"] > 100
    # The skipped step changed no weight: until step 5 the runs are the same, and step 7
    # of the exploded run starts from step 5's weights, so its loss differs from the
    # clean run's, but the run goes on learning.
    assert [r["loss"] for r in metrics(run_dir, "train")][:5] == [r["loss"] for r in metrics(clean_dir, "train")][:5]
    assert metrics(run_dir, "summary")[0]["val_acc"] > 0.5


def test_exploding_gradients_stop_the_run_before_a_checkpoint_takes_them_and_no_restart_follows(tmp_path):
    result, run_dir = run(tmp_path, "deepspeed", "{exploding_grad: {threshold: 50.0, policy: stop}}",
                          {"FAULT": "1e5", "FAULT_AT": "8"}, max_restarts=1)
    assert result.returncode == 1
    assert "stopped at step 8 (update): AlertStop: step 8: gradient norm" in result.stderr
    assert "is above 50" in result.stderr
    assert "restarting" not in result.stderr  # a restart would stop at the same step again
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert alerts_of(run_dir) == [("exploding_grad", 8, "stopped")]


def test_a_module_whose_gradients_vanish_is_named_and_logged_per_module(tmp_path):
    result, run_dir = run(tmp_path, "deepspeed", "{vanishing_grad: {checks: 5}}", {"DEAD": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert alerts_of(run_dir) == [("vanishing_grad", 5, "warned")]
    assert "module 'dead' has had a gradient norm below 1e-07" in (run_dir / "logs" / "rank-0.log").read_text()
    record = metrics(run_dir, "train")[0]
    assert record["grad_norm/dead"] == 0.0 and record["grad_norm/body"] > 0
    # The per-module norms add up to the global one (before clipping).
    assert math.hypot(record["grad_norm/dead"], record["grad_norm/body"]) == pytest.approx(record["grad_norm"],
                                                                                          rel=1e-4)
