"""Training on a CUDA GPU: what the CPU suite cannot run. fp16 with its loss scaler under
both engines, NCCL, ZeRO-3 and FSDP in bf16. One process on one GPU (NCCL refuses two
ranks on the same device). Skipped, and reported as skipped, on machines without a GPU;
run on a lent GPU machine with `python -m pytest tests/gpu`."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import dlaunch, metrics, only_run_dir

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RECIPE = """
name: gpu
model: {model}
data: {data}
optim: {{lr: 5.0e-3}}
engine: {engine}
precision: {precision}
train:
  micro_batch_size: 16
  max_steps: {steps}
  eval_every: {steps}
logging:
  run_root: {root}
  log_every: 5
  progress: false
  report: false
cluster: {{device: cuda, procs_per_node: 1}}
"""
MLP = "{name: mlp, kwargs: {hidden: [64]}}"
CLASSES = "{source: synthetic, samples: 1280, num_features: 16, num_classes: 4}"
GPT = "{name: gpt, kwargs: {n_layer: 2, n_head: 2, n_embd: 64}}"
TOKENS = "{source: synthetic, kind: tokens, samples: 1024, seq_len: 32, vocab_size: 64}"


def train(tmp_path, *, engine: str, precision: str, model: str = MLP, data: str = CLASSES, steps: int = 60):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, data=data, engine=engine, precision=precision,
                                    steps=steps, root=tmp_path / "runs"))
    result = dlaunch("run", str(recipe))
    assert result.returncode == 0, result.stderr[-4000:]
    return only_run_dir(tmp_path / "runs")


def assert_learned(run_dir, *, min_acc: float) -> None:
    records = metrics(run_dir, "train")
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    [summary] = metrics(run_dir, "summary")
    assert summary["val_acc"] > min_acc


def assert_loss_scale_logged(run_dir) -> None:
    """2**32 overflows fp16 at once: the scaler must have backed off, skipping the
    overflowing steps, and every train record says so."""
    records = metrics(run_dir, "train")
    assert all("loss_scale" in r and "overflows" in r for r in records)
    assert records[-1]["overflows"] >= 1
    assert records[-1]["loss_scale"] < 2.0**32
    assert [r["overflows"] for r in records] == sorted(r["overflows"] for r in records)


@pytest.mark.parametrize("engine", ["{name: deepspeed, zero_stage: 2}", "{name: deepspeed, zero_stage: 3}",
                                    "{name: accelerate}", "{name: accelerate, strategy: fsdp, zero_stage: 3}"])
def test_fp16_trains_with_a_dynamic_loss_scale_and_logs_its_overflows(tmp_path, engine):
    run_dir = train(tmp_path, engine=engine, precision="{dtype: fp16, initial_scale_power: 32}")
    assert_learned(run_dir, min_acc=0.6)
    assert_loss_scale_logged(run_dir)


def test_zero3_bf16_trains_the_gpt_over_nccl(tmp_path):
    run_dir = train(tmp_path, engine="{name: deepspeed, zero_stage: 3}", precision="{dtype: bf16}",
                    model=GPT, data=TOKENS, steps=80)
    topology = json.loads((run_dir / "plan.json").read_text())["topology"]
    assert (topology["device"], topology["dist_backend"]) == ("cuda", "nccl")
    assert_learned(run_dir, min_acc=0.5)
    last = metrics(run_dir, "train")[-1]
    assert 0 < last["mfu"] < 1  # a known GPU: the peak comes from launcher/flops.py's table


def test_fsdp_full_shard_bf16_trains(tmp_path):
    run_dir = train(tmp_path, engine="{name: accelerate, strategy: fsdp, zero_stage: 3}",
                    precision="{dtype: bf16}")
    assert_learned(run_dir, min_acc=0.6)
