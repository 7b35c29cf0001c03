"""`dlaunch plan`, `validate` and `explain` on the command line."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, dlaunch

pytestmark = pytest.mark.integration


def test_plan_prints_the_topology_batch_and_engine():
    result = dlaunch("plan", "recipes/quickstart.yaml", "--nodes", "4")
    assert result.returncode == 0, result.stderr
    assert "4 node(s) x 2 proc(s) = world size 8, cpu, gloo, local" in result.stdout
    assert "micro 32 x 8 ranks x accum 1 = global 256" in result.stdout
    assert "deepspeed, ZeRO stage 2, bf16" in result.stdout


def test_plan_json_is_the_plan_a_run_would_use():
    result = dlaunch("plan", "recipes/quickstart.yaml", "--json", "--set", "optim.reference_batch=64",
                     "--nodes", "2")
    plan = json.loads(result.stdout)
    assert plan["training"]["batch"]["global_"] == 128
    assert plan["training"]["lr"]["rule"] == "sqrt"
    assert plan["training"]["lr"]["scaled"] == pytest.approx(3e-3 * 2 ** 0.5)
    assert plan["training"]["engine"]["deepspeed"]["train_batch_size"] == 128


def test_plan_writes_nothing(tmp_path):
    result = dlaunch("plan", "recipes/quickstart.yaml", "--set", f"logging.run_root={tmp_path}/runs")
    assert result.returncode == 0
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_validate_accepts_every_shipped_recipe(recipe):
    result = dlaunch("validate", f"recipes/{recipe}")
    assert (result.returncode, result.stdout.strip()) == (0, f"recipes/{recipe}: ok")


def test_validate_rejects_a_bad_override():
    result = dlaunch("validate", "recipes/quickstart.yaml", "--set", "engine.zero_stage=5")
    assert result.returncode == 2
    assert result.stderr.startswith("error: engine.zero_stage (--set): input should be less than or equal to 3")


def test_explain_prints_a_keys_documentation():
    result = dlaunch("explain", "optim.reference_batch")
    assert result.returncode == 0
    assert "global batch" in result.stdout


def test_slurm_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    result = dlaunch("run", "recipes/quickstart.yaml", "--cluster", "slurm", "--nodes", "4", "--dry-run",
                     "--set", f"logging.run_root={tmp_path}/runs")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("#!/bin/bash\n")
    assert "#SBATCH --nodes=4" in result.stdout
    assert not (tmp_path / "runs").exists()
