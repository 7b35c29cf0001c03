"""`dlaunch doctor RECIPE` through the CLI: the quickstart passes every check; a detached
layer and features in raw units each fail their own check, exit 1, and leave the other
checks to run."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, dlaunch

pytestmark = pytest.mark.integration

CHECKS = ["inputs normalised", "labels", "gradients", "overfit one batch", "initial loss", "loader speed"]

DETACHED_MODEL = """
import torch

class Detached(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.body(x).detach())  # the bug: body never learns

def build():
    return Detached()
"""


def _verdicts(stdout: str) -> dict[str, dict]:
    report = json.loads(stdout)
    assert [c["name"] for c in report["checks"]] == CHECKS
    return {c["name"]: c for c in report["checks"]}


def test_the_quickstart_passes_every_check(tmp_path):
    root = tmp_path / "runs"
    result = dlaunch("doctor", str(REPO / "recipes" / "quickstart.yaml"), "--json",
                     "--set", f"logging.run_root={root}")
    assert result.returncode == 0, result.stderr[-3000:]
    checks = _verdicts(result.stdout)
    judged = [name for name in CHECKS if name != "loader speed"]  # timings are printed, not asserted
    assert {name: checks[name]["verdict"] for name in judged} == dict.fromkeys(judged, "PASS"), result.stdout
    assert checks["loader speed"]["verdict"] in ("PASS", "WARN")
    assert checks["overfit one batch"]["figures"]["final"] < 0.05
    assert not root.exists(), "doctor wrote a run directory"


def test_a_detached_layer_fails_the_gradient_check_and_the_others_still_run(tmp_path, write_recipe):
    (tmp_path / "detached.py").write_text(DETACHED_MODEL)
    recipe = write_recipe("""
model: {target: "detached:build"}
data: {source: synthetic, samples: 320, num_features: 16, num_classes: 4}
train: {micro_batch_size: 16}
cluster: {procs_per_node: 1}
""")
    result = dlaunch("doctor", str(recipe), "--overfit-steps", "30", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rows = {line[:19].strip(): line[19:].split(maxsplit=1) for line in lines[1:-1]}
    assert list(rows) == CHECKS, result.stdout
    verdict, detail = rows["gradients"]
    assert verdict == "FAIL"
    assert detail == "2 of 4 parameters: no gradient (detached or unused): body.0.weight, body.0.bias"
    for name in ("inputs normalised", "labels", "initial loss"):
        assert rows[name][0] == "PASS", result.stdout
    assert rows["overfit one batch"][1].startswith("loss ")  # it ran (the head alone may or may not fit)
    assert rows["loader speed"][1].startswith("a batch loads in ")
    assert lines[-1].startswith("doctor: FAIL: ") and "; fix gradients" in lines[-1]


def test_features_in_raw_units_fail_the_normalisation_check(tmp_path, write_recipe):
    # Four features in very different units, as a CSV export would hold them, read as is.
    rng = np.random.default_rng(0)
    z = rng.standard_normal((400, 4))
    scale, offset = np.array([1.0, 1e3, 5e4, 0.01]), np.array([0.0, 2e3, 1e5, 0.5])
    label = (z[:, 0] + z[:, 1] > 0).astype(np.int64) * 2 + (z[:, 2] - z[:, 3] > 0)
    pq.write_table(pa.table({**{f"f{i}": z[:, i] * scale[i] + offset[i] for i in range(4)}, "label": label}),
                   tmp_path / "rows.parquet")
    recipe = write_recipe(f"""
data: {{source: parquet, path: {tmp_path / 'rows.parquet'}, normalize: false}}
train: {{micro_batch_size: 16}}
cluster: {{procs_per_node: 1}}
""")
    result = dlaunch("doctor", str(recipe), "--json", "--overfit-steps", "20")
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    checks = _verdicts(result.stdout)
    normalised = checks["inputs normalised"]
    assert normalised["verdict"] == "FAIL"
    # f2 (mean 1e5) the worst; f1 (1e3) and f3 (std 0.01) out of bounds too; f0 is fine.
    assert normalised["detail"].startswith("feature 2 and 2 more of 4 outside |mean|<3"), normalised["detail"]
    assert checks["labels"]["verdict"] == checks["gradients"]["verdict"] == "PASS"  # the others ran


def test_bad_doctor_flags_are_one_line_exit_2():
    result = dlaunch("doctor", str(REPO / "recipes" / "quickstart.yaml"), "--overfit-steps", "0")
    assert result.returncode == 2
    assert result.stderr == "error: --overfit-steps: 0 steps; give at least 1\n"
