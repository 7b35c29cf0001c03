"""A streamed Parquet run end to end (data.streaming): each rank reads its own row
groups, the run learns, `dlaunch eval` scores the same validation rows, and a killed run
resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import dlaunch, kill_after, metrics, only_run_dir, resume_to_identical_weights

pytestmark = pytest.mark.integration

RECIPE = """
name: streamed
model: {{name: mlp, kwargs: {{hidden: [32], dropout: 0.1}}}}
data: {{source: parquet, path: {data}, streaming: true, val_fraction: 0.2}}
optim: {{lr: 5.0e-3}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 16, max_steps: 24, eval_every: 6, checkpoint_every: 6, early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, progress: false, report: false}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """640 rows of 3 separable classes: 2 files, row groups of 40 rows (16 groups)."""
    root = tmp_path_factory.mktemp("parquet")
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=640)
    x = rng.normal(size=(3, 6))[labels] * 3 + rng.normal(size=(640, 6))
    table = pa.table({**{f"f{i}": x[:, i] for i in range(6)}, "label": labels})
    pq.write_table(table.slice(0, 320), root / "a.parquet", row_group_size=40)
    pq.write_table(table.slice(320), root / "b.parquet", row_group_size=40)
    return root


def run(tmp_path, data, name: str, env: dict | None = None):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(data=data, root=tmp_path / name))
    result = dlaunch("run", str(recipe), "--procs-per-node", "2", env=env)
    return result, only_run_dir(tmp_path / name)


def test_each_rank_streams_its_own_row_groups_and_the_run_learns(tmp_path, data):
    result, run_dir = run(tmp_path, data, "streamed")
    assert result.returncode == 0, result.stderr[-3000:]
    owned = []
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank-{rank}.log").read_text()
        [groups] = re.findall(r"streaming row groups \[([\d, ]*)\] of 16", log)
        owned.append({int(g) for g in groups.split(",")})
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(16))
    assert metrics(run_dir, "summary")[0]["val_acc"] > 0.9

    scored = dlaunch("eval", str(run_dir))  # one process, every row read: the same split
    assert scored.returncode == 0, scored.stderr
    last = metrics(run_dir, "eval")[-1]
    scores = json.loads((run_dir / "eval-val.json").read_text())
    assert scores["rows"] == 128
    assert scores["val_acc"] == pytest.approx(last["val_acc"], abs=1e-9)
    assert scores["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)


def test_a_killed_streamed_run_resumes_to_identical_weights(tmp_path, data):
    # 512 training rows, about 256 a rank: 15 steps of 32 an epoch; killed after step 18, in epoch 1.
    straight, straight_dir = run(tmp_path, data, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed, run_dir = run(tmp_path, data, "resumed", env=kill_after(18))
    assert killed.returncode != 0
    resume_to_identical_weights(run_dir, straight_dir, killed_after=18)
