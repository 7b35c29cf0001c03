"""Bad input: exit code 2, one line naming the key and the YAML line, no traceback,
and no run directory left behind."""

from __future__ import annotations

import pytest

from tests.conftest import dlaunch

pytestmark = pytest.mark.integration


def run_bad(tmp_path, body: str, *extra: str):
    recipe = tmp_path / "bad.yaml"
    runs = tmp_path / "runs"
    recipe.write_text(body)
    result = dlaunch("run", str(recipe), "--set", f"logging.run_root={runs}", *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not runs.exists() or not any(runs.iterdir()), "a run dir was left behind"
    return lines[0]


def test_yaml_syntax_error(tmp_path):
    line = run_bad(tmp_path, "name: x\noptim:\n  lr: [0.1\n")
    assert line.startswith("error: bad.yaml (line ") and "YAML syntax error" in line


def test_unknown_key_with_did_you_mean(tmp_path):
    line = run_bad(tmp_path, "train:\n  micro_batch_size: 8\n  epocs: 2\n")
    assert line == "error: train.epocs (line 3): unknown key; did you mean 'epochs'?"


def test_wrong_type(tmp_path):
    line = run_bad(tmp_path, "optim:\n  lr: fast\n")
    assert line == "error: optim.lr (line 2): input should be a valid number, got 'fast'"


def test_impossible_combination_fp16_deepspeed_on_cpu(tmp_path):
    line = run_bad(tmp_path, "engine:\n  name: deepspeed\nprecision:\n  dtype: fp16\n")
    assert line.startswith("error: precision.dtype (line 4): DeepSpeed does not train fp16 on CPU")


def test_impossible_combination_zero3_with_ddp(tmp_path):
    line = run_bad(tmp_path, "engine:\n  name: accelerate\n  zero_stage: 3\n")
    assert line.startswith("error: engine.zero_stage (line 3): ZeRO stage 3 shards model state")


def test_global_batch_not_divisible_by_world(tmp_path):
    line = run_bad(tmp_path, "train:\n  micro_batch_size: 8\n  global_batch_size: 20\n",
                   "--procs-per-node", "2")
    assert line.startswith("error: train.global_batch_size (line 3): 20 is not divisible")


def test_missing_data_file(tmp_path):
    line = run_bad(tmp_path, "data:\n  source: parquet\n  path: nowhere/train.parquet\n")
    assert line == "error: data.path (line 3): 'nowhere/train.parquet' does not exist"


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the run root should be a folder\n")
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(f"logging:\n  run_root: {blocker}/runs\ndata:\n  source: synthetic\n")
    result = dlaunch("run", str(recipe), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: logging.run_root (line 2): cannot create run directory '{blocker}/runs/run-")
    assert line.endswith("': Not a directory")
    assert blocker.read_text().startswith("a file")


def test_unknown_override_key(tmp_path):
    line = run_bad(tmp_path, "{}\n", "--set", "optim.learning_rate=1")
    assert line.startswith("error: optim.learning_rate (--set): unknown key")
