"""The README's first command: the quickstart recipe reaches 95% held-out accuracy."""

from __future__ import annotations

import json

import pytest

from tests.conftest import dlaunch, metrics, only_run_dir

pytestmark = pytest.mark.integration


def test_quickstart_recipe_reaches_95_percent_on_held_out_digits(tmp_path):
    result = dlaunch("run", "recipes/quickstart.yaml", "--set", f"logging.run_root={tmp_path}")
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = only_run_dir(tmp_path)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["topology"]["world_size"] == 2
    assert plan["training"]["engine"] == {**plan["training"]["engine"], "name": "deepspeed",
                                          "zero_stage": 2, "precision": "bf16"}
    assert plan["recipe"]["data"]["source"] == "digits"
    [summary] = metrics(run_dir, "summary")
    assert summary["val_acc"] >= 0.95
    # The progress bar and the summary line reach the terminal.
    assert "step/s" in result.stderr and "dlaunch: done: " in result.stderr
