"""Features a recipe switches on: CPU offload, Parquet data, early stopping, --script."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import dlaunch, metrics, only_run_dir

pytestmark = pytest.mark.integration


def run_recipe(tmp_path, body: str, *args: str):
    root = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(body + f"logging: {{run_root: {root}, progress: false, report: false}}\n")
    result = dlaunch("run", str(recipe), "--procs-per-node", "2", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return only_run_dir(root)


@pytest.mark.cpu_adam
def test_zero3_with_optimizer_and_parameter_offload(tmp_path):
    run_dir = run_recipe(tmp_path, """
model: {name: mlp, kwargs: {hidden: [64]}}
data: {source: synthetic, samples: 640, num_features: 16, num_classes: 4}
optim: {lr: 5.0e-3}
engine: {name: deepspeed, zero_stage: 3, offload_optimizer: true, offload_params: true}
train: {micro_batch_size: 16, max_steps: 30}
""")
    # DeepSpeed runs its CPU Adam when optimizer states live in host memory.
    assert "optimizer DeepSpeedCPUAdam" in (run_dir / "logs" / "rank-0.log").read_text()
    zero = json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    assert metrics(run_dir, "summary")[0]["val_acc"] > 0.6


def test_parquet_dataset_trains(tmp_path):
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=generator) * 3
    labels = torch.randint(0, 3, (600,), generator=generator)
    features = centers[labels] + torch.randn(600, 6, generator=generator)
    columns = {f"f{i}": features[:, i].numpy() for i in range(6)}
    half = 300  # two files: the dataset is the folder
    (tmp_path / "data").mkdir()
    for part, rows in enumerate((slice(0, half), slice(half, 600))):
        table = pa.table({**{k: v[rows] for k, v in columns.items()}, "label": labels[rows].numpy()})
        pq.write_table(table, tmp_path / "data" / f"part-{part}.parquet")
    run_dir = run_recipe(tmp_path, """
model: {name: mlp, kwargs: {hidden: [32]}}
data: {source: parquet, path: data, label_column: label}
optim: {lr: 5.0e-3}
train: {micro_batch_size: 16, max_steps: 40}
""")
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["training"]["data"]["num_rows"] == 600
    assert plan["training"]["data"]["input_shape"] == [6] and plan["training"]["data"]["num_classes"] == 3
    assert metrics(run_dir, "summary")[0]["val_acc"] > 0.8


def test_early_stopping_ends_the_run_and_keeps_the_best(tmp_path):
    # min_delta so large that nothing counts as an improvement after the first eval.
    run_dir = run_recipe(tmp_path, """
model: {name: mlp}
data: {source: synthetic, samples: 640, num_features: 16, num_classes: 4}
precision: {dtype: fp32}
train: {micro_batch_size: 16, max_steps: 100, eval_every: 5,
        early_stopping: {patience: 2, min_delta: 100.0}}
""")
    [summary] = metrics(run_dir, "summary")
    assert summary["stopped_early"] is True
    assert summary["steps"] == 15  # evals at 5 (best), 10 and 15 (no improvement twice)
    assert summary["best_step"] == 5
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000015"


def test_script_gets_torchrun_environment_and_its_arguments(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import json, os, sys\n"
        "import torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "keys = ['RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'OMP_NUM_THREADS']\n"
        "seen = {k: os.environ[k] for k in keys}\n"
        "seen['argv'] = sys.argv[1:]\n"
        "out = os.path.join(os.path.dirname(__file__), f\"rank-{os.environ['RANK']}.json\")\n"
        "json.dump(seen, open(out, 'w'))\n"
        "dist.barrier()\n"
        "dist.destroy_process_group()\n")
    root = tmp_path / "runs"
    result = dlaunch("run", "--script", str(script), "--nodes", "2", "--procs-per-node", "2",
                     "--set", f"logging.run_root={root}", "--", "--epochs", "3", "a b",
                     env={"OMP_NUM_THREADS": "3"})
    assert result.returncode == 0, result.stderr[-4000:]
    seen = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(4)]
    for rank, env in enumerate(seen):
        assert env["OMP_NUM_THREADS"] == "3"  # the user's, as torchrun leaves it (not 2 cores / 4 ranks)
        assert int(env["RANK"]) == rank
        assert int(env["WORLD_SIZE"]) == 4
        assert int(env["RANK"]) == int(env["NODE_RANK"]) * 2 + int(env["LOCAL_RANK"])
        assert env["argv"] == ["--epochs", "3", "a b"]
    assert {env["NODE_RANK"] for env in seen} == {"0", "1"}
    assert len({(env["MASTER_ADDR"], env["MASTER_PORT"]) for env in seen}) == 1
    assert (only_run_dir(root) / "plan.json").exists()


def test_nan_loss_stops_the_run_naming_step_rank_and_last_good_checkpoint(tmp_path):
    # A user model whose output turns to NaN on rank 1 from its 6th training forward on.
    (tmp_path / "poisoned.py").write_text(
        "import os, torch\n"
        "class Poisoned(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.linear = torch.nn.Linear(16, 4)\n"
        "        self.calls = 0\n"
        "    def forward(self, x):\n"
        "        self.calls += self.training\n"
        "        out = self.linear(x)\n"
        "        bad = self.calls >= 6 and os.environ['RANK'] == '1'\n"
        "        return out * float('nan') if bad else out\n"
        "def build():\n"
        "    return Poisoned()\n")
    root = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{target: "poisoned:build"}}
data: {{source: synthetic, samples: 640, num_features: 16, num_classes: 4}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 16, max_steps: 20, checkpoint_every: 4, eval_every: 4}}
logging: {{run_root: {root}, progress: false, report: false}}
""")
    result = dlaunch("run", str(recipe), "--procs-per-node", "2", cwd=tmp_path)
    assert result.returncode == 1
    assert "step 6: loss is nan on rank(s) [1]; the last good checkpoint is step-00000004" in result.stderr
    run_dir = only_run_dir(root)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert not (run_dir / "model.pt").exists()
