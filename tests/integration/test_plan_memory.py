"""`dlaunch plan` prints each rank's model-state memory, and `--json` carries it; and
the size of a checkpoint (which tests/integration/test_checkpoint_room.py measures)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import dlaunch

pytestmark = pytest.mark.integration

RECIPE = """
name: memory
model: {name: mlp, kwargs: {hidden: [64]}}
data: {source: digits}
engine: {name: deepspeed, zero_stage: 2}
precision: {dtype: bf16}
train: {max_steps: 4}
"""


def memory_lines(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    [start] = [i for i, line in enumerate(lines) if line.startswith("memory ")]
    following = [line for line in lines[start + 1:] if line.startswith(" ")]
    return [line.strip() for line in [lines[start].removeprefix("memory"), *following]]


def test_plan_prints_the_model_states_per_rank(write_recipe):
    recipe = write_recipe(RECIPE)
    psi = 64 * 64 + 64 + 64 * 10 + 10  # digits: 64 features in, 10 classes out
    # ZeRO-2 over 4 ranks: 16-bit weights whole, gradients and 12 bytes of Adam states split.
    weights, grads, optimizer = 2 * psi, -(-2 * psi // 4), -(-12 * psi // 4)
    result = dlaunch("plan", str(recipe), "--nodes", "2", "--procs-per-node", "2")
    assert result.returncode == 0, result.stderr
    assert memory_lines(result.stdout) == [
        f"model states ≈ {(weights + grads + optimizer) / 1024:.1f} KiB per rank on cpu: parameters "
        f"{weights / 1024:.1f}, gradients {grads / 1024:.1f}, optimizer {optimizer / 1024:.1f} KiB = "
        "(2 + 2/4 + 12/4) bytes x Ψ (Ψ = 4.81K parameters, ZeRO-2 over 4 ranks)"]
    # The weights and the optimizer's states, whole; 3 kept, and the next one written.
    checkpoint = 2 * psi + 12 * psi
    [row] = [line for line in result.stdout.splitlines() if line.startswith("checkpoints ")]
    assert row.removeprefix("checkpoints").strip() == (
        f"≈ {checkpoint / 1024:.1f} KiB each; up to 4 on disk, {4 * checkpoint / 1024:.1f} KiB "
        "(train.keep_last 3, and the one being written)")
    [row] = [line for line in result.stdout.splitlines() if line.startswith("weights ")]
    assert row.removeprefix("weights").strip() == f"≈ {4 * psi / 1024:.1f} KiB (model.pt)"  # fp32, whole

    offloaded = dlaunch("plan", str(recipe), "--nodes", "2", "--procs-per-node", "2", "--json",
                        "--set", "engine.offload_optimizer=true")
    memory = json.loads(offloaded.stdout)["training"]["memory"]
    assert memory["params"] == psi
    assert {(s["state"], s["place"]): s["bytes"] for s in memory["states"]} == {
        ("parameters", "device"): weights, ("gradients", "host"): -(-4 * psi // 4),
        ("optimizer", "host"): optimizer}


def test_a_target_model_is_counted_on_the_meta_device(tmp_path, write_recipe):
    (tmp_path / "big_models.py").write_text(
        "import torch\n"
        "def make(width):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.Linear(width, 10))\n")
    width = 50_000_000  # 15 GB of fp32 weights, were it built for real
    recipe = write_recipe(RECIPE.replace("{name: mlp, kwargs: {hidden: [64]}}",
                                         f"{{target: 'big_models:make', kwargs: {{width: {width}}}}}"))
    result = dlaunch("plan", str(recipe), "--set", "engine.zero_stage=3", "--nodes", "1", "--procs-per-node", "2",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    psi = 64 * width + width + width * 10 + 10
    [line] = memory_lines(result.stdout)
    assert line.startswith(f"model states ≈ {16 * psi / 2 / 2**30:.1f} GiB per rank on cpu: ")
    assert line.endswith(f"(2/2 + 2/2 + 12/2) bytes x Ψ (Ψ = {psi / 1e9:.3g}B parameters, "
                         "ZeRO-3 over 2 ranks)")


def test_a_target_model_that_cannot_be_built_on_meta_is_left_unestimated(tmp_path, write_recipe):
    (tmp_path / "picky_models.py").write_text(
        "import torch\n"
        "def make():\n"
        "    model = torch.nn.Linear(64, 10)\n"
        "    model.weight.data.numpy()  # needs real storage\n"
        "    return model\n")
    recipe = write_recipe(RECIPE.replace("{name: mlp, kwargs: {hidden: [64]}}",
                                         "{target: 'picky_models:make'}"))
    result = dlaunch("plan", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert memory_lines(result.stdout) == ["not estimated: the model's parameters could not be counted"]
    assert result.stderr.startswith("dlaunch: no memory estimate: picky_models:make could not be built "
                                    "on the meta device to count its parameters (")
