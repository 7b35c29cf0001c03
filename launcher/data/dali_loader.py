"""DALI loaders: decoding and augmentation in DALI, batches as torch tensors.

``DaliTrainLoader`` stands in for a torch DataLoader over the same image rows: it yields
``(inputs, targets)`` micro-batches, float32 ``(N, 3, size, size)`` normalised and int64
``(N,)``. DALI only does the pixel work. Which rows a micro-batch holds is the
``ResumableDistributedSampler``'s choice (not a DALI reader's shuffle), and each sample's
crop, flip and colour factors are ``augment.draw``'s (fed to the pipeline as per-sample
inputs), so the DALI and the torch loader train on the same rows with the same
augmentations, a resume replays the uninterrupted run's batches, and nothing depends on
the number of DALI threads.

``dali_eval_batches`` is the evaluation view, sharded across ranks by DALI's own reader.

Only the DALI loader path imports this module, so it imports DALI at the top.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.backend import TensorGPU, TensorListCPU, TensorListGPU
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

from launcher.data.augment import ImageAugment, draw
from launcher.data.sampler import ResumableDistributedSampler

Batch = tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
              np.ndarray, np.ndarray]
"""One micro-batch as the train pipeline's external source takes it: encoded files, crop
anchors (x, y), crop shapes (w, h), flips, brightness, contrast, saturation, labels."""


def dali_device() -> int | None:
    """The GPU DALI should run on (this process's current CUDA device), or None for
    DALI's CPU operators where there is no GPU."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


class DaliTrainLoader:
    """Training micro-batches of ``sampler``'s rows, decoded and augmented by DALI.

    ``encoded(row)`` gives a row's image file (JPEG or PNG) as a uint8 array, from
    wherever the rows live (``np.fromfile(path, dtype=np.uint8)`` for a folder). With a
    ``device_id`` the decoder is DALI's ``mixed`` one and the batches are CUDA tensors on
    that device; with None everything runs on DALI's CPU operators.

    Each ``iter()`` builds a fresh pipeline for the sampler's current epoch. DALI asks the
    external source for ``prefetch_queue_depth`` batches ahead and a pipeline cannot drop
    what it has queued; an epoch that was left part-way (early stop, an exception in the
    step) would hand its queued batches to the next epoch. A new pipeline per epoch makes
    that impossible, for the price of building the pipeline: about 25 ms per epoch on
    CPU (2 cores; refilling the prefetch queue costs what a reused pipeline's reset would).
    The epoch's end needs no count: the source raises StopIteration when the sampler runs
    out, and DALI ends the epoch after exactly the batches it was given.
    """

    def __init__(self, encoded: Callable[[int], np.ndarray], labels: np.ndarray,
                 sampler: ResumableDistributedSampler, aug: ImageAugment, *, seed: int,
                 mean: Sequence[float], std: Sequence[float], num_threads: int = 4,
                 prefetch_queue_depth: int = 2, device_id: int | None = None) -> None:
        self.encoded = encoded
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sampler = sampler
        self.aug = aug
        self.seed = seed
        self.mean = [m * 255 for m in mean]  # the pipeline normalises uint8 pixels
        self.std = [s * 255 for s in std]
        self.num_threads = num_threads
        self.prefetch_queue_depth = prefetch_queue_depth
        self.device_id = device_id

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """As ``ResumableDistributedSampler.set_epoch``: call before each epoch."""
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.sampler.epoch
        micro_batches = iter(self.sampler)

        def source() -> Batch:
            # next() raising StopIteration is how an external source ends DALI's epoch.
            return self._inputs(epoch, next(micro_batches))

        pipe = self._pipeline(source)
        pipe.build()
        while True:
            try:
                images, targets = pipe.run()
            except StopIteration:
                return
            inputs = _to_torch(images)
            yield inputs, _to_torch(targets).to(inputs.device)

    def _inputs(self, epoch: int, rows: list[int]) -> Batch:
        draws = [draw(self.aug, self.seed, epoch, row) for row in rows]
        return ([self.encoded(row) for row in rows],
                np.array([d.crop[:2] for d in draws], dtype=np.float32),
                np.array([d.crop[2:] for d in draws], dtype=np.float32),
                np.array([d.flip for d in draws], dtype=np.int32),
                np.array([d.brightness for d in draws], dtype=np.float32),
                np.array([d.contrast for d in draws], dtype=np.float32),
                np.array([d.saturation for d in draws], dtype=np.float32),
                self.labels[rows])

    def _pipeline(self, source: Callable[[], Batch]) -> Pipeline:
        pipe = Pipeline(batch_size=self.sampler.micro_batch, num_threads=self.num_threads,
                        device_id=self.device_id, prefetch_queue_depth=self.prefetch_queue_depth)
        with pipe:
            encoded, anchor, shape, flip, brightness, contrast, saturation, labels = \
                fn.external_source(
                    source=source, num_outputs=8, batch=True,
                    dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT,
                           types.FLOAT, types.FLOAT, types.INT64],
                    ndim=[1, 1, 1, 0, 0, 0, 0, 0])
            # anchor and shape are (x, y) and (w, h): image_slice's default axis_names "WH".
            images = fn.decoders.image_slice(
                encoded, anchor, shape, normalized_anchor=True, normalized_shape=True,
                device=_decoder_device(self.device_id), output_type=types.RGB)
            images = fn.resize(images, resize_x=self.aug.size, resize_y=self.aug.size)
            images = fn.color_twist(images, brightness=brightness, contrast=contrast,
                                    saturation=saturation)
            images = fn.crop_mirror_normalize(images, mirror=flip, mean=self.mean, std=self.std,
                                              dtype=types.FLOAT, output_layout="CHW")
            pipe.set_outputs(images, labels)
        return pipe


def dali_eval_batches(paths: Sequence[str], labels: np.ndarray, *, rank: int, world_size: int,
                      batch: int, size: int, mean: Sequence[float], std: Sequence[float],
                      num_threads: int = 4, device_id: int | None = None,
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's share of the validation images as ``(inputs, targets, weight)``: the
    shorter side resized to ``size``, the centre ``size`` x ``size``, normalised.

    Every rank yields the same number of batches, because under ZeRO-3 a forward pass is a
    collective that a rank with fewer batches would leave hanging. The ranks' shards can
    differ by one image, so a rank may run past its shard: the reader fills its last batch
    by repeating the shard's last image, and a further batch reads on into the reader's
    next epoch. ``weight`` is 1.0 for each of the rank's own images and 0.0 for such
    fillers, so summed over all ranks every validation image counts exactly once.
    """
    if len(paths) < world_size:
        raise ValueError(f"{len(paths)} validation images cannot be shared by {world_size} ranks")
    # DALI's shard of rank r is rows [floor(n * r / w), floor(n * (r + 1) / w)).
    own = len(paths) * (rank + 1) // world_size - len(paths) * rank // world_size
    largest_shard = -(-len(paths) // world_size)
    num_batches = -(-largest_shard // batch)
    pipe = Pipeline(batch_size=batch, num_threads=num_threads, device_id=device_id)
    with pipe:
        encoded, targets = fn.readers.file(
            files=list(paths), labels=[int(label) for label in labels], shard_id=rank,
            num_shards=world_size, random_shuffle=False, pad_last_batch=True)
        images = fn.decoders.image(encoded, device=_decoder_device(device_id),
                                   output_type=types.RGB)
        images = fn.resize(images, resize_shorter=size)
        images = fn.crop_mirror_normalize(images, crop=(size, size), mean=[m * 255 for m in mean],
                                          std=[s * 255 for s in std], dtype=types.FLOAT,
                                          output_layout="CHW")
        pipe.set_outputs(images, targets)
    pipe.build()
    for index in range(num_batches):
        images, targets = pipe.run()
        inputs = _to_torch(images)
        position = torch.arange(index * batch, (index + 1) * batch)
        weight = (position < own).to(torch.float32)
        yield (inputs, _to_torch(targets).view(-1).to(torch.int64).to(inputs.device),
               weight.to(inputs.device))


def _decoder_device(device_id: int | None) -> str:
    """``mixed`` decodes on the GPU (and the operators after it run there); ``cpu`` where
    the pipeline has no GPU."""
    return "cpu" if device_id is None else "mixed"


def _to_torch(batch: TensorListCPU | TensorListGPU) -> torch.Tensor:
    """A copy of a pipeline output as one torch tensor, on the output's device.

    A copy, because DALI may reuse an output's memory for a later iteration. A GPU copy
    is queued on torch's current stream, after DALI's work that produced the output."""
    dense = batch.as_tensor()
    on_gpu = isinstance(dense, TensorGPU)
    device = torch.device("cuda", dense.device_id()) if on_gpu else torch.device("cpu")
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    return feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if on_gpu else None)
