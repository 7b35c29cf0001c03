"""DALI's GPU path: the ``mixed`` decoder and the operators after it on the GPU, which the
CPU suite cannot run. The same rows and augmentations as DALI's CPU operators give, as
CUDA tensors; and an image recipe trained on a GPU through it. Skipped, and reported as
skipped, without a CUDA GPU or without DALI; run on a lent GPU machine with
`python -m pytest tests/gpu`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launcher.data.augment import ImageAugment
from launcher.data.dali_loader import DaliTrainLoader
from launcher.data.images import ImageFolder
from launcher.data.pattern_images import write_pattern_images
from launcher.data.sampler import ResumableDistributedSampler
from tests.conftest import dlaunch, metrics, only_run_dir
from tests.unit.test_dali_loader import MEAN, STD, _pixels, _write_folder

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("nvidia.dali", reason="needs DALI")

AUGMENT = ImageAugment(size=8, random_crop=True, flip=True, color_jitter=0.4)
CLOSE = 2.0
"""Mean pixel levels (of 255) within which nvJPEG's decode and the GPU operators agree
with libjpeg-turbo's and the CPU operators'."""


def _epoch(folder: ImageFolder, device_id: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    paths = folder.paths()
    sampler = ResumableDistributedSampler(len(paths), rank=0, world_size=1, micro_batch=4,
                                          batches_per_step=1, seed=3)
    loader = DaliTrainLoader(lambda row: np.fromfile(paths[row], dtype=np.uint8), folder.labels, sampler,
                             AUGMENT, seed=5, mean=MEAN, std=STD, num_threads=2, device_id=device_id)
    loader.set_epoch(1)
    return list(loader)


def test_the_gpu_pipeline_yields_the_cpu_pipelines_batches_as_cuda_tensors(tmp_path):
    folder = _write_folder(tmp_path, [6, 6], sizes=((20, 16), (16, 28)))  # JPEGs and PNGs
    on_cpu = _epoch(folder, device_id=None)
    on_gpu = _epoch(folder, device_id=torch.cuda.current_device())
    assert len(on_gpu) == len(on_cpu) == 3
    for (gpu_inputs, gpu_targets), (cpu_inputs, cpu_targets) in zip(on_gpu, on_cpu, strict=True):
        assert gpu_inputs.device == gpu_targets.device == torch.device("cuda", torch.cuda.current_device())
        assert gpu_inputs.shape == cpu_inputs.shape and gpu_inputs.dtype == cpu_inputs.dtype
        assert torch.equal(gpu_targets.cpu(), cpu_targets)
        # Each row's red level is its own (6 levels apart): other rows, crops or flips
        # than the CPU's would be far outside CLOSE.
        levels = np.abs(_pixels(gpu_inputs.cpu()) - _pixels(cpu_inputs))
        assert levels.mean() < CLOSE, levels.mean()


def test_an_image_recipe_trains_on_the_gpu_through_dali(tmp_path):
    images = write_pattern_images(tmp_path / "images", 64)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: dali-gpu
model: {{name: cnn, kwargs: {{channels: [16, 32]}}}}
data: {{source: images, path: {images}, image_size: 24, val_fraction: 0.25, loader: dali}}
optim: {{lr: 1.0e-2}}
engine: {{name: deepspeed, zero_stage: 2}}
precision: {{dtype: bf16}}
train: {{micro_batch_size: 12, max_steps: 120, eval_every: 60, early_stopping: {{patience: null}}}}
logging: {{run_root: {tmp_path / "runs"}, progress: false, report: false}}
cluster: {{device: cuda, procs_per_node: 1}}
""")
    result = dlaunch("run", str(recipe))
    assert result.returncode == 0, result.stderr[-4000:]
    [summary] = metrics(only_run_dir(tmp_path / "runs"), "summary")
    assert summary["val_acc"] > 0.8, summary
