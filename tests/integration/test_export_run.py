"""A real run's weights exported: `dlaunch run` trains, `dlaunch export` writes the ONNX
variants and scores them on the run's own validation rows; `dlaunch report` plots it."""

from __future__ import annotations

import json

import pytest

from launcher.export import ATOL
from tests.conftest import dlaunch, metrics, only_run_dir

pytestmark = pytest.mark.integration

RECIPE = """
name: export
model: {{name: mlp, kwargs: {{hidden: [256, 256]}}}}
data: {{source: synthetic, samples: 640, num_features: 4, num_classes: 6}}  # clusters that overlap
optim: {{lr: 3.0e-3}}
engine: {{name: accelerate}}
precision: {{dtype: fp32}}  # the float32 weights the export starts from, as trained
train: {{micro_batch_size: 16, max_steps: 30, early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, progress: false}}
"""


def test_a_finished_run_exports_to_onnx_fp32_int8_and_pruned(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=tmp_path / "runs"))
    result = dlaunch("run", str(recipe), "--procs-per-node", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "runs")

    exported = dlaunch("export", str(run_dir))
    assert exported.returncode == 0, exported.stderr[-3000:]
    print(exported.stdout)  # the figures, with pytest -s
    assert "onnx int8" in exported.stdout and "pruned: 50.0% of the Linear/Conv weights are zero" in exported.stdout
    export = run_dir / "export"
    assert sorted(p.name for p in export.iterdir()) == [
        "model.int8.onnx", "model.onnx", "model.pruned.onnx", "report.json"]
    report = json.loads((export / "report.json").read_text())
    assert report["max_abs_diff"] < ATOL
    torch_fp32, onnx_fp32, onnx_int8, onnx_pruned = report["variants"]
    assert [v["name"] for v in report["variants"]] == ["pytorch fp32", "onnx fp32", "onnx int8", "onnx pruned"]
    # The same predictions as the run's own final evaluation, and as PyTorch's here.
    assert torch_fp32["val_acc"] == pytest.approx(metrics(run_dir, "eval")[-1]["val_acc"], abs=1e-9)
    assert onnx_fp32["val_acc"] == torch_fp32["val_acc"] > 0.4  # 6 classes: chance is 1/6
    assert onnx_fp32["val_loss"] == pytest.approx(torch_fp32["val_loss"], rel=1e-4)
    assert onnx_int8["size_bytes"] < 0.4 * onnx_fp32["size_bytes"]
    assert onnx_pruned["size_bytes"] == pytest.approx(onnx_fp32["size_bytes"], rel=0.01)  # dense zeros
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for variant in (onnx_int8, onnx_pruned):  # may be lower, must be scored
        assert 0 < variant["val_acc"] <= 1 and variant["val_loss"] > 0
    assert all(v["ms_batch_1"] > 0 and v["ms_batch_n"] > 0 for v in report["variants"])
    assert report["val_rows"] == 128 and report["latency_batch"] == 64

    # Every run ends with its report; `dlaunch report` redraws it and prints the table.
    assert {p.name for p in (run_dir / "report").iterdir()} >= {"loss.png", "eval.png", "lr.png", "summary.md"}
    redrawn = dlaunch("report", str(run_dir), "--out", str(tmp_path / "again"))
    assert redrawn.returncode == 0, redrawn.stderr
    assert run_dir.name in redrawn.stdout and (tmp_path / "again" / "loss.png").is_file()
