"""A hung rank ends the run within train.hang_timeout, not NCCL's or gloo's tens of
minutes, with an error that names the rank that did not arrive, its node, the step and
where it is stuck (launcher/watchdog.py). Real runs of two ranks, the rank made to sleep
forever by DLAUNCH_FAULTS (launcher/faults.py). hang_timeout is 5 s and the process
group's timeout 120 s (60 s above start_timeout, which leaves a loaded machine time to
start the engines): a run ended by any timeout but the watchdog's would outlast the
subprocess timeout and fail the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.faults import spec
from launcher.rundir import rank_status
from tests.conftest import dlaunch, only_run_dir

pytestmark = pytest.mark.integration

RECIPE = """
name: hang
model: {{name: mlp, kwargs: {{hidden: [16]}}}}
data: {{source: synthetic, samples: 200, num_features: 8, num_classes: 3, val_fraction: 0.2}}
engine: {{name: {engine}}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 8, max_steps: 8, eval_every: 8, hang_timeout: 5, start_timeout: 60,
        early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, progress: false, report: false}}
"""
HANG_S = 90
"""Far beyond start-up plus 5 s: a run still going then was not ended by the watchdog."""


def run_with_hang(tmp_path: Path, engine: str, where: str, *topology: str):
    root = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(engine=engine, root=root))
    result = dlaunch("run", str(recipe), *topology, timeout=HANG_S,
                     env=spec({"kind": "hang", "rank": 1, "step": 5, "where": where}))
    return result, only_run_dir(root)


def hang_statuses(run_dir: Path) -> set[str]:
    statuses = (rank_status(run_dir, rank).read_text().strip() for rank in range(2))
    return {status for status in statuses if "HangTimeout" in status}


def test_a_rank_asleep_before_a_collective_is_named_with_its_node_and_step(tmp_path):
    """Rank 1, alone on node 1, never joins step 5's loss all_gather (DeepSpeed, two
    node agents): rank 0 waits in it."""
    result, run_dir = run_with_hang(tmp_path, "deepspeed", "collective", "--nodes", "2")
    assert result.returncode != 0
    verdict = ("HangTimeout: rank 1 (node 1, computing step 5) did not arrive at step 5's loss collective "
               "within 5 s (train.hang_timeout)")
    assert verdict in result.stderr, result.stderr[-3000:]
    # Every rank that timed out says the same, whichever one the report picked.
    assert hang_statuses(run_dir) == {f"failed: {verdict}"}
    assert not (run_dir / "model.pt").exists()


def test_a_rank_stuck_loading_its_batch_is_named_with_the_data_loading(tmp_path):
    """Rank 1 never gets step 5's batch (Accelerate DDP, one node of two ranks): rank 0
    waits in the step's gradient all-reduce."""
    result, run_dir = run_with_hang(tmp_path, "accelerate", "data", "--procs-per-node", "2")
    assert result.returncode != 0
    verdict = ("HangTimeout: rank 1 (node 0, loading step 5's batch) did not arrive at step 5's forward/backward "
               "within 5 s (train.hang_timeout)")
    assert verdict in result.stderr, result.stderr[-3000:]
    assert hang_statuses(run_dir) == {f"failed: {verdict}"}
