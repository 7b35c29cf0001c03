"""Weight norms and activation statistics in real 2-process runs: sharded (ZeRO-3) and
replicated (ZeRO-2, DDP) weights give the norms of the full model in model.pt, and the
activation hooks exist during logged steps only."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import dlaunch, metrics, only_run_dir

pytestmark = pytest.mark.integration

# Odd sizes (a bias of 33) leave ZeRO-3 padding in the last rank's partition, which the
# norms must not count; `scale` belongs to no top-level module, only to the total. Each
# training forward pass writes down how many forward hooks `head` has (DeepSpeed's
# ZeRO-3 has its own on every module): the buffer ends up in model.pt.
MODEL = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.ReLU())
        self.head = torch.nn.Linear(33, 4)
        self.scale = torch.nn.Parameter(torch.ones(4))
        self.register_buffer("hooks_seen", torch.zeros(32))
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.hooks_seen[self.calls] = len(self.head._forward_hooks)
            self.calls += 1
        return self.head(self.hidden(x)) * self.scale

def build():
    return Net()
"""

STEPS, LOG_EVERY = 10, 5


def train(tmp_path, engine: str, stage: int, activation_stats: bool | None):
    (tmp_path / "net.py").write_text(MODEL)
    root = tmp_path / "runs"
    option = "" if activation_stats is None else f", activation_stats: {str(activation_stats).lower()}"
    (tmp_path / "recipe.yaml").write_text(f"""
model: {{target: "net:build"}}
data: {{source: synthetic, samples: 512, num_features: 16, num_classes: 4}}
engine: {{name: {engine}, zero_stage: {stage}}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 16, max_steps: {STEPS}, early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, log_every: {LOG_EVERY}, progress: false, report: false, tensorboard: false{option}}}
""")
    result = dlaunch("run", "recipe.yaml", "--procs-per-node", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(root)
    return metrics(run_dir, "train"), torch.load(run_dir / "model.pt")


def norm(weights: dict[str, torch.Tensor], prefix: str = "") -> float:
    return math.sqrt(sum(w.double().square().sum().item() for name, w in weights.items()
                         if name.startswith(prefix) and name != "hooks_seen"))


@pytest.mark.parametrize("engine, stage, activation_stats", [
    ("deepspeed", 3, True), ("accelerate", 0, True), ("deepspeed", 2, None)])
def test_weight_norms_are_the_full_models_and_activation_stats_come_when_asked(tmp_path, engine, stage,
                                                                             activation_stats):
    records, weights = train(tmp_path, engine, stage, activation_stats)
    assert [r["step"] for r in records] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for record in records:
        assert {"weight_norm", "weight_norm/hidden", "weight_norm/head"} <= record.keys()
        assert not any(key.startswith("weight_norm/") and key not in ("weight_norm/hidden", "weight_norm/head")
                       for key in record), "a top-level module without weights has no weight norm"
    final = records[-1]
    assert final["weight_norm/hidden"] == pytest.approx(norm(weights, "hidden."), rel=1e-5)
    assert final["weight_norm/head"] == pytest.approx(norm(weights, "head."), rel=1e-5)
    assert final["weight_norm"] == pytest.approx(norm(weights), rel=1e-5)
    assert final["weight_norm"] > math.hypot(final["weight_norm/hidden"], final["weight_norm/head"])  # + scale

    hooks_seen = weights["hooks_seen"][:STEPS].tolist()
    logged_calls = [step - 1 for step in range(LOG_EVERY, STEPS + 1, LOG_EVERY)]
    if not activation_stats:
        assert not any(key.startswith("act_") for r in records for key in r)
        assert len(set(hooks_seen)) == 1, f"hooks were attached: {hooks_seen}"
        return
    # One more hook on `head` during each logged step's forward pass, and only then.
    base = hooks_seen[0]
    assert hooks_seen == [base + 1 if call in logged_calls else base for call in range(STEPS)]
    for record in records:
        for module in ("hidden", "head"):
            assert record[f"act_std/{module}"] > 0
            assert 0 <= record[f"act_zero/{module}"] <= 1
        # ReLU outputs: never negative, and some units dead on a random batch.
        assert record["act_mean/hidden"] > 0
        assert 0 < record["act_zero/hidden"] < 1
