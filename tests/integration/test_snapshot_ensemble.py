"""Snapshot ensembles on a real run (digits, 2 processes, DeepSpeed ZeRO-3, fp32): a
snapshot at the end of each warm-restart cycle, `dlaunch eval --ensemble` scoring them
and their averaged probabilities, and a killed and resumed run ending with the same
snapshots as an uninterrupted one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import dlaunch, kill_after, metrics, only_run_dir, resume_to_identical_weights

pytestmark = pytest.mark.integration

# 1437 training rows / (16 x 2 ranks) = 44 steps, one epoch. After 2 warmup steps the
# cycles last 6, 12 and 24 steps: they end after steps 8, 20 and 44 (the run's last).
RECIPE = """
name: snapshots
model: {{name: mlp, kwargs: {{hidden: [64], dropout: 0.1}}}}
data: {{source: digits, val_fraction: 0.2}}
optim: {{lr: 1.0e-2}}
schedule: {{name: cosine_restarts, warmup_steps: 2, restart_period: 6, restart_mult: 2, min_lr_ratio: 0.0,
           snapshots: true}}
engine: {{name: deepspeed, zero_stage: 3}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 16, max_steps: 44, eval_every: 44, checkpoint_every: 6, keep_last: 2,
        early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, log_every: 1, progress: false, report: false, tensorboard: false}}
"""
PEAK_LR = 1.0e-2
EXPECTED = {8: "cycle-01-step-00000008.pt", 20: "cycle-02-step-00000020.pt", 44: "cycle-03-step-00000044.pt"}
# Killed after step 22: its last checkpoint is step 18, before the snapshot at 20.
KILL_AFTER, RESUMED_FROM = 22, 18


def train(tmp_path, name: str, env: dict | None = None):
    root = tmp_path / name
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(root=root))
    result = dlaunch("run", str(recipe), "--procs-per-node", "2", env=env)
    return result, only_run_dir(root)


@pytest.fixture(scope="module")
def straight_dir(tmp_path_factory):
    result, run_dir = train(tmp_path_factory.mktemp("straight"), "straight")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def index(run_dir) -> list[dict]:
    return json.loads((run_dir / "snapshots" / "snapshots.json").read_text())["snapshots"]


def test_a_snapshot_is_saved_at_each_cycle_end_with_its_lr_and_scores(straight_dir):
    folder = straight_dir / "snapshots"
    assert sorted(p.name for p in folder.iterdir()) == [*EXPECTED.values(), "snapshots.json"]
    entries = index(straight_dir)
    assert [(e["cycle"], e["step"], e["file"]) for e in entries] == \
        [(cycle, step, name) for cycle, (step, name) in enumerate(EXPECTED.items(), start=1)]
    # A train record's lr is the LR the next step trains with: record S-1 holds the LR of
    # the step that ends a cycle, record S the restart.
    lr_of_step = {r["step"]: r["lr"] for r in metrics(straight_dir, "train")}
    scores = {r["step"]: r for r in metrics(straight_dir, "eval")}
    for entry in entries:
        step = entry["step"]
        assert entry["lr"] == pytest.approx(lr_of_step[step - 1], rel=1e-6)
        assert entry["lr"] < lr_of_step[step - 2]
        if step < 44:
            assert lr_of_step[step] == pytest.approx(PEAK_LR)
        assert (entry["val_loss"], entry["val_acc"]) == (scores[step]["val_loss"], scores[step]["val_acc"])
    final = torch.load(straight_dir / "model.pt")
    last = torch.load(folder / EXPECTED[44])
    assert all(torch.equal(final[name], last[name]) for name in final)


def test_the_plan_names_the_snapshot_steps_and_what_each_takes_on_disk(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=tmp_path / "runs"))
    result = dlaunch("plan", str(recipe), "--procs-per-node", "2")
    assert result.returncode == 0, result.stderr
    rows = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in result.stdout.splitlines()}
    assert rows["schedule"] == "cosine_restarts, 2 warmup steps, snapshots after steps 8, 20, 44"
    params = 64 * 64 + 64 + 64 * 10 + 10  # digits: 64 features in, 10 classes out
    assert rows["weights"] == f"≈ {4 * params / 1024:.1f} KiB (model.pt), and 3 snapshots of that size"


def averaged_probabilities_accuracy(run_dir) -> tuple[list[float], float, float]:
    """Each snapshot's accuracy, and the accuracy and mean NLL of their averaged softmax,
    computed here from the snapshot files, on the rows `dlaunch eval` reads."""
    from launcher.data.datasets import load_split
    from launcher.models.build import build_model
    from launcher.plan import LaunchPlan

    plan = LaunchPlan.from_json((run_dir / "plan.json").read_text())
    inputs, labels = load_split(plan.recipe.data, plan.training.data).val.tensors
    singles, probabilities = [], []
    for name in EXPECTED.values():
        model = build_model(plan.recipe.model, plan.training.data)
        model.load_state_dict(torch.load(run_dir / "snapshots" / name))
        with torch.no_grad():
            p = model.eval()(inputs).softmax(-1).double()
        singles.append(float((p.argmax(-1) == labels).double().mean()))
        probabilities.append(p)
    mean = torch.stack(probabilities).mean(0)
    nll = float(-mean.gather(1, labels[:, None]).log().mean())
    return singles, float((mean.argmax(-1) == labels).double().mean()), nll


def test_eval_ensemble_scores_every_snapshot_and_their_averaged_probabilities(straight_dir):
    result = dlaunch("eval", "--ensemble", str(straight_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((straight_dir / "eval-val-ensemble.json").read_text())
    assert [s["snapshot"] for s in report["snapshots"]] == list(EXPECTED.values())
    assert report["ensemble"]["members"] == list(EXPECTED.values())
    singles, ensemble_acc, ensemble_nll = averaged_probabilities_accuracy(straight_dir)
    assert [s["val_acc"] for s in report["snapshots"]] == pytest.approx(singles, abs=1e-12)
    assert report["ensemble"]["val_acc"] == pytest.approx(ensemble_acc, abs=1e-12)
    assert report["ensemble"]["val_loss"] == pytest.approx(ensemble_nll, rel=1e-5)
    for name in (*EXPECTED.values(), "final (model.pt)", "ensemble of 3"):
        assert name in result.stdout
    print(f"\nval_acc: snapshots {singles}, ensemble {ensemble_acc}")


def test_eval_ensemble_of_a_run_without_snapshots_is_one_error_line(straight_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("plan.json", "model.pt"):
        shutil.copy(straight_dir / name, bare / name)
    result = dlaunch("eval", "--ensemble", str(bare))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: --ensemble: ") and "has no snapshots" in line
    assert not (bare / "eval-val-ensemble.json").exists()


def test_a_killed_and_resumed_run_ends_with_the_uninterrupted_runs_snapshots(straight_dir, tmp_path):
    killed, run_dir = train(tmp_path, "killed", env=kill_after(KILL_AFTER))
    assert killed.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{RESUMED_FROM:08d}"
    folder = run_dir / "snapshots"
    assert [e["step"] for e in index(run_dir)] == [8, 20]
    before_checkpoint = (folder / EXPECTED[8]).stat()

    resume_to_identical_weights(run_dir, straight_dir, killed_after=RESUMED_FROM)

    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (straight_dir / "snapshots").iterdir())
    assert index(run_dir) == index(straight_dir)  # steps, LRs and scores, each snapshot once
    kept = (folder / EXPECTED[8]).stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (before_checkpoint.st_ino, before_checkpoint.st_mtime_ns)
    for name in EXPECTED.values():
        expected, actual = torch.load(straight_dir / "snapshots" / name), torch.load(folder / name)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), f"{name} differs after resume"
