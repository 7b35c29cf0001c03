"""The engines' batch copy to the GPU (launcher.engines.base.to_device) leaves the host
free to queue the forward pass while the GPU is still busy with the step before.
Skipped, and reported as skipped, without a CUDA GPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from launcher.engines.base import to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BUSY_CYCLES = 200_000_000  # about 0.1 s of one kernel on any recent GPU
CUDA = torch.device("cuda")


@pytest.mark.parametrize("copy, waits", [
    (to_device, False),
    # The control: a blocking copy, as the engines made before, waits for the kernel.
    (lambda batch, device: batch.to(device), True),
], ids=["to_device", "blocking copy"])
def test_a_pinned_batch_is_copied_without_waiting_for_queued_work(copy: Callable, waits: bool):
    batch = torch.arange(16 * 1025).reshape(16, 1025).pin_memory()  # as the loaders pin on GPUs
    torch.cuda.synchronize()
    torch.cuda._sleep(BUSY_CYCLES)  # stands for the optimizer kernels of the step before
    copied = copy(batch, CUDA)
    assert torch.cuda.current_stream().query() is waits  # True: the queued kernel had finished
    assert torch.equal(copied.cpu(), batch)
