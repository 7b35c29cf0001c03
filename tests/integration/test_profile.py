"""`logging.profile`: a real 2-rank DeepSpeed run profiles the steps it is asked for, on
every rank, and writes a Chrome trace and an operator table for each."""

from __future__ import annotations

import json

import pytest

from tests.conftest import dlaunch, only_run_dir

pytestmark = pytest.mark.integration


def test_each_rank_writes_a_trace_of_the_profiled_steps_only(tmp_path):
    root = tmp_path / "runs"
    (tmp_path / "recipe.yaml").write_text(f"""
model: {{name: mlp, kwargs: {{hidden: [32]}}}}
data: {{source: synthetic, samples: 512, num_features: 16, num_classes: 4}}
engine: {{name: deepspeed, zero_stage: 2}}
precision: {{dtype: bf16}}
train: {{micro_batch_size: 16, max_steps: 6, early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, progress: false, report: false, tensorboard: false,
          profile: {{start_step: 3, steps: 2}}}}
""")
    result = dlaunch("run", "recipe.yaml", "--procs-per-node", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    profile = only_run_dir(root) / "profile"
    assert sorted(p.name for p in profile.iterdir()) == [
        "rank-0.trace.json", "rank-0.txt", "rank-1.trace.json", "rank-1.txt"]
    for rank in (0, 1):
        events = json.loads((profile / f"rank-{rank}.trace.json").read_text())["traceEvents"]
        names = {event.get("name", "") for event in events}
        assert {name for name in names if name.startswith("ProfilerStep#")} == {"ProfilerStep#3", "ProfilerStep#4"}
        # The steps' own work is in the trace: the model's matrix products and the
        # gradients' reduction across the ranks.
        assert "aten::addmm" in names
        assert any("all_reduce" in name or "reduce_scatter" in name for name in names), sorted(names)[:80]
        table = (profile / f"rank-{rank}.txt").read_text()
        assert table.startswith(f"rank {rank}: 2 steps from step 3, by self_cpu_time_total\n")
        assert "aten::addmm" in table
