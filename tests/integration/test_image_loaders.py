"""An image-folder recipe end to end, with the torch DataLoader and with DALI (its CPU
operators here): the same accuracy within noise; augmentation that depends on (seed,
epoch, row) only, so loader workers and mid-epoch resumes change nothing; mixup and
cutmix training through both engines."""

from __future__ import annotations

import pytest

from launcher.data.pattern_images import write_pattern_images
from tests.conftest import dlaunch, kill_after, metrics, only_run_dir, resume_to_identical_weights

pytestmark = pytest.mark.integration

RECIPE = """
name: images
model: {{name: cnn, kwargs: {{channels: [16, 32]}}}}
data: {{source: {source}, path: {images}, image_size: 24, val_fraction: 0.25, loader: {loader},
        augment: {{crop_scale: [0.35, 1.0], color_jitter: 0.2{augment}}}{data}}}
optim: {{lr: 1.0e-2}}
engine: {{name: {engine}, zero_stage: {stage}}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 12, max_steps: {steps}, eval_every: 15, checkpoint_every: {checkpoint_every},
        early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, progress: false, report: false}}
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    # 3 classes x 64 images: 144 train / 48 val, 6 steps an epoch at 2 ranks x 12.
    return write_pattern_images(tmp_path_factory.mktemp("patterns"), 64)


def run(tmp_path, images, name: str, *, source: str = "images", loader: str = "torch", engine: str = "deepspeed", stage: int = 2,
        steps: int = 30, augment: str = "", data: str = "", checkpoint_every: int = 15,
        env: dict | None = None):
    root = tmp_path / name
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(source=source, images=images, loader=loader, engine=engine, stage=stage, steps=steps,
                                    augment=augment, data=data, checkpoint_every=checkpoint_every,
                                    root=root))
    result = dlaunch("run", str(recipe), "--procs-per-node", "2", env=env)
    return result, only_run_dir(root)


def test_torch_and_dali_loaders_train_an_image_folder_to_the_same_accuracy(tmp_path, images):
    accuracy = {}
    for loader in ("torch", "dali"):
        result, run_dir = run(tmp_path, images, loader, loader=loader, steps=60)
        assert result.returncode == 0, result.stderr[-3000:]
        accuracy[loader] = metrics(run_dir, "summary")[0]["val_acc"]
    assert min(accuracy.values()) > 0.85, accuracy
    assert abs(accuracy["torch"] - accuracy["dali"]) < 0.1, accuracy


def test_loader_workers_change_no_batch(tmp_path, images):
    """Augmentation draws from (seed, epoch, row), not from a worker's RNG: 2 persistent
    workers with deeper prefetch train exactly as the main process alone."""
    alone, alone_dir = run(tmp_path, images, "alone", steps=12)
    workers, workers_dir = run(tmp_path, images, "workers", steps=12,
                               data=", num_workers: 2, prefetch_factor: 4, persistent_workers: true")
    assert alone.returncode == 0 and workers.returncode == 0, (alone.stderr + workers.stderr)[-3000:]
    assert [r["loss"] for r in metrics(workers_dir, "train")] == [r["loss"] for r in metrics(alone_dir, "train")]


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_a_killed_image_run_resumes_mid_epoch_to_identical_weights(tmp_path, images, loader):
    # 6 steps an epoch: killed after step 9's checkpoint, resumed in the middle of epoch 1.
    data = ", num_workers: 1" if loader == "torch" else ""
    straight, straight_dir = run(tmp_path, images, "straight", loader=loader, steps=14, data=data)
    assert straight.returncode == 0, straight.stderr[-3000:]
    env = kill_after(9)
    killed, run_dir = run(tmp_path, images, "resumed", loader=loader, steps=14, data=data, checkpoint_every=3,
                          env=env)
    assert killed.returncode != 0
    resume_to_identical_weights(run_dir, straight_dir, killed_after=9)


@pytest.mark.parametrize("engine,stage,augment", [
    ("deepspeed", 2, ", mixup_alpha: 0.4, cutmix_alpha: 1.0, label_smoothing: 0.1"),
    ("accelerate", 0, ", cutmix_alpha: 1.0"),
])
def test_mixup_and_cutmix_train_through_both_engines(tmp_path, images, engine, stage, augment):
    plain, plain_dir = run(tmp_path, images, "plain", engine=engine, stage=stage, steps=45)
    mixed, mixed_dir = run(tmp_path, images, "mixed", engine=engine, stage=stage, steps=45, augment=augment)
    assert plain.returncode == 0 and mixed.returncode == 0, (plain.stderr + mixed.stderr)[-3000:]
    plain_losses = [r["loss"] for r in metrics(plain_dir, "train")]
    mixed_losses = [r["loss"] for r in metrics(mixed_dir, "train")]
    # Mixed targets are soft: the training loss cannot reach a hard target's, and the
    # runs differ from the first step; evaluation (unmixed) still learns.
    assert mixed_losses[0] != plain_losses[0]
    assert min(mixed_losses[-10:]) > min(plain_losses[-10:])
    assert metrics(mixed_dir, "summary")[0]["val_acc"] > 0.6


def test_a_prepared_parquet_of_the_folder_trains_through_dali_and_torch(tmp_path, images):
    shards = tmp_path / "shards"
    prepared = dlaunch("data", "prepare", str(images), str(shards), "--row-group-rows", "32", "--seed", "0")
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout == f"{shards}: 192 rows in 1 shards\n"
    assert dlaunch("data", "verify", str(shards)).stdout == f"{shards}: ok\n"
    accuracy = {}
    for loader in ("dali", "torch"):
        result, run_dir = run(tmp_path, shards, f"parquet-{loader}", source="parquet", loader=loader, steps=45)
        assert result.returncode == 0, result.stderr[-3000:]
        accuracy[loader] = metrics(run_dir, "summary")[0]["val_acc"]
    assert min(accuracy.values()) > 0.8, accuracy


def test_data_prepare_refuses_to_overwrite_and_verify_names_damage(tmp_path, images):
    shards = tmp_path / "shards"
    assert dlaunch("data", "prepare", str(images), str(shards)).returncode == 0
    again = dlaunch("data", "prepare", str(images), str(shards))
    assert again.returncode == 2
    assert again.stderr == f"error: OUT: '{shards}' exists; choose a new directory or pass --overwrite\n"
    part = shards / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-100] + bytes(100))
    damaged = dlaunch("data", "verify", str(shards))
    assert damaged.returncode == 1 and "part-00000.parquet" in damaged.stderr
