"""Each module's gradient norm under ZeRO 1-3 on two ranks, summed from each rank's own
share of the gradients: together they make DeepSpeed's global gradient norm, which
DeepSpeed computes by itself."""

from __future__ import annotations

import math

import pytest

from tests.conftest import dlaunch, metrics, only_run_dir

RECIPE = """
name: norms
model: {{name: cnn, kwargs: {{channels: [8, 16]}}}}
data: {{source: digits}}
engine: {{name: deepspeed, zero_stage: {stage}}}
train: {{micro_batch_size: 16, max_steps: 4, early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, log_every: 1, progress: false, report: false, tensorboard: false}}
cluster: {{procs_per_node: 2}}
"""


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_module_norms_from_each_ranks_share_make_deepspeeds_global_norm(tmp_path, stage):
    recipe = tmp_path / "norms.yaml"
    recipe.write_text(RECIPE.format(stage=stage, root=tmp_path / "runs"))
    result = dlaunch("run", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics(only_run_dir(tmp_path / "runs"), "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        modules = {k: v for k, v in record.items() if k.startswith("grad_norm/")}
        # The CNN's stem, blocks and head (its dropout has no weights).
        assert sorted(modules) == ["grad_norm/blocks", "grad_norm/head", "grad_norm/stem"]
        assert all(v > 0 for v in modules.values()), modules
        assert math.hypot(*modules.values()) == pytest.approx(record["grad_norm"], rel=1e-3)
