"""A DeepSpeed rank imports neither MLflow nor torch's inductor: seconds of CPU a rank
that serve nothing it trains (launcher/engines/imports.py)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import dlaunch

pytestmark = pytest.mark.integration

# Writes, at each training forward pass, which of the probed modules the rank has imported.
PROBE_MODEL = """
import json, os, sys
import torch

PROBED = ("mlflow", "torch._inductor.compile_fx", "torch._dynamo")

class Probe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def forward(self, x):
        if self.training:
            with open(os.environ["PROBE_OUT"], "a") as out:
                out.write(json.dumps([m for m in PROBED if m in sys.modules]) + "\\n")
        return self.net(x)
"""


def test_a_deepspeed_rank_trains_without_importing_mlflow_or_inductor(tmp_path, write_recipe):
    (tmp_path / "probe.py").write_text(PROBE_MODEL)
    out = tmp_path / "imported.jsonl"
    recipe = write_recipe(f"""
model: {{target: "probe:Probe"}}
data: {{source: synthetic, samples: 320, num_features: 16, num_classes: 4}}
engine: {{name: deepspeed, zero_stage: 2}}
train: {{micro_batch_size: 16, max_steps: 4}}
logging: {{run_root: {tmp_path / "runs"}, progress: false, report: false, tensorboard: false}}
""")
    result = dlaunch("run", str(recipe), "--procs-per-node", "1", cwd=tmp_path, env={"PROBE_OUT": str(out)})
    assert result.returncode == 0, result.stderr[-4000:]
    imported = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(imported) == 4
    # After optimizer steps (where ZeRO imports DeepSpeed's Muon module): torch._dynamo,
    # which torch.optim imports, shows the probe sees what the rank has imported.
    assert imported[-1] == ["torch._dynamo"]
