"""Images per second of the two image loaders on the same JPEG folder with the same
augmentations (random resized crop, flip, colour jitter, normalise), side by side in one
run: the torch DataLoader (main process, and worker processes) and DALI's CPU operators,
plus DALI's GPU operators when this machine has a GPU.

    .venv/bin/python bench/data_loading.py [--images 1200] [--size 224] [--out bench/results/data_loading.json]

A figure is steady-state throughput: one micro-batch is drawn before the clock starts
(workers spawned, pipeline built), then `--batches` batches are timed. It is the loader
alone, with no model: the rate at which it could feed a training step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from launcher.data.augment import ImageAugment
from launcher.data.image_rows import ImageRows
from launcher.data.images import scan_image_folder
from launcher.data.loaders import TorchBatches
from launcher.data.pattern_images import write_pattern_images
from launcher.data.sampler import ResumableDistributedSampler
from launcher.recipe import DataConfig

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def images_per_second(batches: Iterable, num_batches: int, batch_size: int) -> float:
    iterator = iter(batches)
    next(iterator)  # start-up (worker processes, pipeline build) is not throughput
    started = time.perf_counter()
    for _ in range(num_batches):
        inputs, _ = next(iterator)
    if inputs.is_cuda:
        torch.cuda.synchronize()
    return num_batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1200, help="JPEGs to generate (3 classes)")
    parser.add_argument("--size", type=int, default=224, help="side of the training crops")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=25, help="timed batches per loader and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/data_loading.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dlaunch-bench-") as tmp:
        # ImageNet-like files: JPEGs of 300-500 px a side, cropped and resized to --size.
        folder = scan_image_folder(str(write_pattern_images(Path(tmp), args.images // 3, sizes=(300, 500),
                                                            suffixes=(".jpg",))))
        for path in folder.paths():  # into the page cache: no loader pays for the first read
            Path(path).read_bytes()
        augment = ImageAugment(size=args.size, color_jitter=0.4)
        dataset = ImageRows(folder.paths(), folder.labels, size=args.size, mean=torch.tensor(MEAN),
                            std=torch.tensor(STD), augment=augment, seed=0)

        def sampler() -> ResumableDistributedSampler:
            return ResumableDistributedSampler(len(dataset), rank=0, world_size=1, micro_batch=args.batch,
                                               batches_per_step=1, seed=0)

        def torch_loader(workers: int) -> Callable[[], Iterable]:
            cfg = DataConfig(num_workers=workers, prefetch_factor=4 if workers else None)
            return lambda: TorchBatches(dataset, sampler(), cfg, on_gpu=False, seed=0)

        def dali_loader(device_id: int | None) -> Callable[[], Iterable]:
            from launcher.data.dali_loader import DaliTrainLoader

            return lambda: DaliTrainLoader(dataset.encoded, folder.labels,
                                           sampler(), augment, seed=0, mean=MEAN, std=STD,
                                           num_threads=os.cpu_count() or 1, device_id=device_id)

        cores = os.cpu_count() or 1
        loaders = {"torch DataLoader, main process": torch_loader(0),
                   f"torch DataLoader, {cores} workers": torch_loader(cores),
                   f"DALI, CPU operators, {cores} threads": dali_loader(None)}
        if torch.cuda.is_available():
            loaders["DALI, GPU decoder and operators"] = dali_loader(torch.cuda.current_device())
        results: dict[str, list[float]] = {name: [] for name in loaders}
        # Loaders take turns within each repeat, so drifts of the machine hit all alike.
        for _ in range(args.repeats):
            for name, make in loaders.items():
                results[name].append(images_per_second(make(), args.batches, args.batch))

    baseline = statistics.median(results["torch DataLoader, main process"])
    print(f"{args.images} JPEGs (300-500 px), crop to {args.size}, flip, jitter 0.4, batch {args.batch}; "
          f"median of {args.repeats} x {args.batches} batches")
    print(f"{'loader':40} {'images/s':>10} {'spread':>16} {'vs torch main':>14}")
    rows = []
    for name, values in results.items():
        median = statistics.median(values)
        rows.append({"loader": name, "images_per_s": median, "runs": values, "ratio": median / baseline})
        print(f"{name:40} {median:10.0f} {min(values):7.0f}-{max(values):<8.0f} {median / baseline:13.2f}x")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU only, {cores} cores"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "host": platform.node(), "images": args.images,
                               "size": args.size, "batch": args.batch, "results": rows}, indent=2) + "\n")
    print(f"device: {device}; written to {out}")


if __name__ == "__main__":
    main()
