"""`dlaunch sweep` on the real two-node Ray cluster (conftest.py): trials that are 2-worker
distributed jobs, ASHA stopping the bad ones, best.yaml that reproduces the best trial,
a killed sweep resumed without running a finished trial again, and bad specs refused
before any trial starts."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, dlaunch, metrics, only_run_dir

pytestmark = pytest.mark.integration

RECIPE = """
name: sweepme
model: {{name: mlp, kwargs: {{hidden: [32]}}}}
data: {{source: synthetic, samples: 960, num_features: 8, num_classes: 3, val_fraction: 0.2}}
optim: {{lr: 1.0e-2}}
engine: {{name: accelerate}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 8, max_steps: {steps}, eval_every: {eval_every}, early_stopping: {{patience: null}},
        monitor: val_acc}}
logging: {{run_root: {root}, progress: false, report: false, tensorboard: false}}
sweep:
  metric: val_acc
  num_samples: 1
  max_concurrent: 2
  scheduler: {{name: {scheduler}, grace_period: 1, reduction_factor: 2}}
  space:
    optim.lr: {{grid: {lrs}}}
"""
# Good learning rates first: ASHA has their results at each rung when the bad ones
# (which barely move from chance) get there, and stops those.
LRS = [3.0e-2, 1.0e-2, 1.0e-6, 2.0e-6, 3.0e-6, 5.0e-6]


def write(tmp_path: Path, name: str, *, steps: int, eval_every: int, scheduler: str,
          lrs: list[float]) -> tuple[Path, Path]:
    root = tmp_path / name
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(steps=steps, eval_every=eval_every, root=root, scheduler=scheduler,
                                    lrs=json.dumps(lrs)))
    return recipe, root


def sweep_dir_under(root: Path) -> Path:
    [sweep] = [p for p in root.iterdir() if p.name.startswith("sweepme-sweep")]
    return sweep


def test_an_asha_sweep_stops_bad_trials_early_and_its_best_yaml_reproduces_the_best_trial(
        tmp_path, ray_cluster):
    # Long enough (6 evaluations, a few seconds) for a stop to land before a trial ends.
    recipe, root = write(tmp_path, "asha", steps=240, eval_every=40, scheduler="asha", lrs=LRS)
    result = ray_cluster.dlaunch("sweep", str(recipe), "--address", ray_cluster.address, "--nodes", "2",
                                 timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    sweep = sweep_dir_under(root)
    rows = json.loads((sweep / "trials.json").read_text())
    assert len(rows) == len(LRS)
    evals_in_full = 240 // 40
    stopped = [row for row in rows if row["end"] == "stopped early"]
    assert stopped and all(row["evaluations"] < evals_in_full for row in stopped), rows
    finished = [row for row in rows if row["end"] == "finished"]
    assert finished and all(row["evaluations"] == evals_in_full for row in finished), rows
    for row in rows:  # every trial was a 2-worker job on the two Ray nodes
        job = json.loads((sweep / "trials" / row["trial_id"] / "ray" / "job.json").read_text())
        assert job["world_size"] == 2 and len(set(job["ray_nodes"])) == 2
    assert (sweep / "metric.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "trials, val_acc (max)" in result.stderr  # the table

    best = max(finished, key=lambda row: row["last"])
    best_recipe = yaml.safe_load((sweep / "best.yaml").read_text())
    assert "sweep" not in best_recipe
    assert best_recipe["optim"]["lr"] == json.loads(best["overrides"][0].split("=", 1)[1])
    rerun_root = tmp_path / "rerun"
    rerun = dlaunch("run", str(sweep / "best.yaml"), "--set", f"logging.run_root={rerun_root}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert metrics(only_run_dir(rerun_root), "eval")[-1]["val_acc"] == pytest.approx(best["last"], abs=1e-9)


def _ends(sweep: Path) -> dict[str, str | None]:
    ends = {}
    for trial in (sweep / "trials").iterdir():
        record = trial / "trial.json"
        if record.exists():
            ends[trial.name] = json.loads(record.read_text())["end"]
    return ends


def test_a_sweep_killed_midway_resumes_and_runs_each_trial_once(tmp_path, ray_cluster):
    lrs = [3.0e-2, 1.0e-2, 2.0e-2]
    recipe, root = write(tmp_path, "killed", steps=60, eval_every=5, scheduler="fifo", lrs=lrs)
    driver = subprocess.Popen(ray_cluster.loopback.command(
        sys.executable, "-m", "launcher", "sweep", str(recipe), "--address", ray_cluster.address, "--nodes", "2"),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert driver.poll() is None and time.monotonic() < deadline, "the sweep ended before the kill"
            # The sweep directory appears by a rename of its staging folder; until then, none.
            sweep = next(root.glob("sweepme-sweep*"), None)
            ends = _ends(sweep) if sweep else {}
            if "finished" in ends.values() and None in ends.values():
                break
            time.sleep(0.5)
        driver.send_signal(signal.SIGKILL)  # the driver only: Ray ends its trials with it
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    finished_before = {trial for trial, end in _ends(sweep).items() if end == "finished"}
    records_before = {trial: (sweep / "trials" / trial / "metrics.jsonl").read_text() for trial in finished_before}

    resumed = ray_cluster.dlaunch("sweep", "--resume", str(sweep), "--address", ray_cluster.address, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = json.loads((sweep / "trials.json").read_text())
    assert len(rows) == len(lrs) == len(list((sweep / "trials").iterdir()))
    assert all(row["end"] == "finished" and row["evaluations"] == 60 // 5 for row in rows), rows
    for trial in finished_before:  # not run again
        assert (sweep / "trials" / trial / "metrics.jsonl").read_text() == records_before[trial]
    for row in rows:  # each ran to its end once: one summary, and an interrupted one resumed
        run_dir = sweep / "trials" / row["trial_id"]
        assert len(metrics(run_dir, "summary")) == 1
        steps = [record["step"] for record in metrics(run_dir, "train")]
        assert steps[-1] == 60


BAD_SPECS = [
    ("optim.lrr: {choice: [0.1]}", "sweep.space.optim.lrr (line", "did you mean 'optim.lr'"),
    ("optim.lr: {choice: []}", "sweep.space.optim.lr (line", "empty"),
    ("optim.lr: {uniform: [0.1, 0.01]}", "sweep.space.optim.lr (line", "low"),
]


@pytest.mark.parametrize("space,where,what", BAD_SPECS, ids=["unknown-key", "empty-choice", "low-above-high"])
def test_a_bad_search_space_fails_before_any_trial_starts(tmp_path, space, where, what):
    root = tmp_path / "runs"
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"logging: {{run_root: {root}}}\nsweep:\n  space:\n    {space}\n")
    result = dlaunch("sweep", str(recipe))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {where}") and what in line, line
    assert not root.exists()


def test_a_metric_no_evaluation_reports_fails_before_any_trial_starts(tmp_path):
    root = tmp_path / "runs"
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"logging: {{run_root: {root}}}\n"
                      "sweep:\n  metric: val_f1\n  space:\n    optim.lr: {choice: [0.1, 0.01]}\n")
    result = dlaunch("sweep", str(recipe))
    assert result.returncode == 2
    assert result.stderr.startswith("error: sweep.metric (line 3):") and "never reported" in result.stderr
    assert not root.exists()


def test_a_value_no_trial_could_run_with_fails_before_any_trial_starts(tmp_path):
    root = tmp_path / "runs"
    recipe = tmp_path / "bad.yaml"
    # A micro batch of 4096 leaves less than one global batch of the digits' 1437 rows.
    recipe.write_text(f"logging: {{run_root: {root}}}\n"
                      "sweep:\n  space:\n    train.micro_batch_size: {choice: [32, 4096]}\n")
    result = dlaunch("sweep", str(recipe))
    assert result.returncode == 2
    assert result.stderr.startswith("error: sweep.space.train.micro_batch_size (line 4): value 4096")
    assert not root.exists()


def test_pbt_copies_a_better_trials_checkpoint_into_a_worse_one(tmp_path, ray_cluster):
    # Synchronous PBT ranks both trials together at their 2nd evaluation, so the one at
    # chance (lr 1e-6) is cloned from the one that learned, whichever got there first.
    # Asynchronous PBT made the clone depend on arrival order: it skips a clone when the
    # better trial was not checkpointed at its own last decision. The 3rd evaluation
    # shows what the clone resumed with.
    recipe, root = write(tmp_path, "pbt", steps=150, eval_every=50, scheduler="pbt", lrs=[3.0e-2, 1.0e-6])
    text = recipe.read_text().replace(
        "reduction_factor: 2}", "reduction_factor: 2, perturbation_interval: 2, synch: true}")
    recipe.write_text(text)
    result = ray_cluster.dlaunch("sweep", str(recipe), "--address", ray_cluster.address, "--nodes", "2",
                                 timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    # Tune's own log line: "[Exploit] Cloning trial <donor> (score = ...) into trial <target> ..."
    clones = re.findall(r"Cloning trial (\S+) \(score = [^)]*\) into trial (\S+)", result.stderr)
    sweep = sweep_dir_under(root)
    rows = json.loads((sweep / "trials.json").read_text())
    assert [row for row in rows if row["end"] != "finished"] == []
    # The grid's order: trial 0 has lr 3e-2, trial 1 lr 1e-6.
    learned, at_chance = (row["trial_id"] for row in rows)
    assert clones == [(learned, at_chance)], result.stderr[-4000:]
    adopted = json.loads((sweep / "trials" / at_chance / "trial.json").read_text())["adopted"]
    assert [a["step"] for a in adopted if learned in a["checkpoint"]] == [100], adopted
    # The donor's weights came along: the clone's evaluation at step 150 is about the
    # donor's at 100 (one interval more, at whatever learning rate the perturbation gave),
    # not where its own learning rate had left it.
    [donor_at_100] = [e["val_acc"] for e in metrics(sweep / "trials" / learned, "eval") if e["step"] == 100]
    [own_at_100] = [e["val_acc"] for e in metrics(sweep / "trials" / at_chance, "eval") if e["step"] == 100]
    [clone_at_150] = [e["val_acc"] for e in metrics(sweep / "trials" / at_chance, "eval") if e["step"] == 150]
    assert own_at_100 < donor_at_100 - 0.3 and clone_at_150 >= donor_at_100 - 0.15, \
        (own_at_100, donor_at_100, clone_at_150)


def test_tune_keeps_only_the_latest_pbt_checkpoints_of_each_trial(tmp_path, ray_cluster):
    """Each of 8 evaluations hands Tune a checkpoint, which Tune copies into the sweep's
    tune/ directory; with perturbation_interval 2 it keeps each trial's last 5
    (cluster/tune_space.py), not all 8, and the sweep's clones and restarts still find
    theirs. (Across a clone Tune's count can run one over: 12 evaluations kept 5 a trial,
    6 kept 5 and 6.)"""
    recipe, root = write(tmp_path, "pbtkeep", steps=80, eval_every=10, scheduler="pbt", lrs=[3.0e-2, 1.0e-6])
    recipe.write_text(recipe.read_text().replace(
        "reduction_factor: 2}", "reduction_factor: 2, perturbation_interval: 2, synch: true}"))
    result = ray_cluster.dlaunch("sweep", str(recipe), "--address", ray_cluster.address, "--nodes", "2",
                                 timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    sweep = sweep_dir_under(root)
    rows = json.loads((sweep / "trials.json").read_text())
    assert [row["end"] for row in rows] == ["finished", "finished"] and all(row["evaluations"] == 8 for row in rows)
    assert re.search(r"Cloning trial \S+ \(score = [^)]*\) into trial", result.stderr), result.stderr[-4000:]
    kept = {trial.name: sorted(int(p.name.removeprefix("checkpoint_")) for p in trial.glob("checkpoint_*"))
            for trial in (sweep / "tune").glob("run_trial_*")}
    assert len(kept) == 2 and all(len(numbers) <= 6 for numbers in kept.values()), kept
    assert all(numbers[0] > 0 for numbers in kept.values()), f"a trial's first checkpoint was kept: {kept}"
