"""Model FLOPs utilisation: the FLOPs a training step needs, measured once, against what
the devices could do at peak.

The FLOPs of one sample are counted, not estimated from a formula per architecture:
``torch.utils.flop_counter.FlopCounterMode`` records every matmul and convolution of a
forward pass (2 FLOPs per multiply-add), and training costs three forward passes'
worth (the forward, and a backward that computes gradients for both activations and
weights), the convention of the PaLM paper's MFU (Chowdhery et al., 2022, appendix B).
Recomputation, when a model uses it, is not counted: MFU, not hardware FLOPs
utilisation.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
def _cpu_flash_attention_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: object,
                               **kwargs: object) -> int:
    # FlopCounterMode knows the CUDA attention kernels but not the CPU one that
    # scaled_dot_product_attention runs here; it is the same computation.
    return sdpa_flop_count(query.shape, key.shape, value.shape)

PEAK_TFLOPS = {
    # Dense bf16/fp16 tensor-core peaks from NVIDIA's data sheets (without sparsity).
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
}
"""By a substring of ``torch.cuda.get_device_name()``, the most specific first."""


def training_flops_per_sample(model: torch.nn.Module, example: torch.Tensor) -> float:
    """FLOPs of one training sample: 3x those of a forward pass of ``example`` (one
    sample, with its batch axis), counted on this process's copy of the model."""
    was_training = model.training
    model.eval()  # dropout and the like change no matmul; eval avoids updating BN statistics
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    return 3.0 * counter.get_total_flops()


def peak_flops(device_name: str | None, dtype: str, configured_tflops: float | None) -> float | None:
    """One device's peak FLOP/s: the recipe's figure, else the table's for a known GPU in
    bf16/fp16, else None: a CPU has no tensor-core peak, and an fp32 run's depends on
    whether TF32 is on, so neither reports an MFU unless the recipe gives the peak."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device_name is None or dtype == "fp32":
        return None
    for name, tflops in PEAK_TFLOPS.items():
        if name in device_name:
            return tflops * 1e12
    return None


@dataclass(frozen=True)
class Throughput:
    """Turns samples/s into the figures a run reports."""

    flops_per_sample: float
    tokens_per_sample: int | None
    """Tokens a sample trains on (token data), else None."""
    peak: float | None
    """Peak FLOP/s of all the run's devices together, when known."""

    def rates(self, samples_per_s: float) -> dict[str, float]:
        rates = {"samples_per_s": samples_per_s}
        if self.tokens_per_sample is not None:
            rates["tokens_per_s"] = samples_per_s * self.tokens_per_sample
        if self.peak is not None:
            rates["mfu"] = samples_per_s * self.flops_per_sample / self.peak
        return rates


class RateWindows:
    """Samples/s over windows of steps, a window closed at each logged step.

    A window is closed the moment its rate is read, before the logged step's
    diagnostics and writes (weight norms, the metrics sinks) and whatever follows it
    (an evaluation, a checkpoint): those fall in the next window, so that every second
    of a run is in one window and the rate counts what logging costs too."""

    def __init__(self, samples_per_step: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.samples_per_step, self.clock = samples_per_step, clock
        self.started, self.steps = clock(), 0
        self.closed: list[float] = []
        """The rate of each closed window, oldest first."""

    def step(self) -> None:
        self.steps += 1

    def rate(self, now: float | None = None) -> float:
        """The open window's samples/s so far (0 before its first step)."""
        elapsed = (self.clock() if now is None else now) - self.started
        return self.steps * self.samples_per_step / elapsed if elapsed > 0 else 0.0

    def close(self) -> float:
        """The open window's rate; the next window starts now."""
        now = self.clock()
        rate = self.rate(now)
        self.closed.append(rate)
        self.started, self.steps = now, 0
        return rate

    def steady_rate(self) -> float | None:
        """The training rate a run reports at its end: the median of the closed windows
        past the first, whose time holds the first step's warm-up (kernel selection, the
        allocator, DeepSpeed's lazy set-up), as the benchmarks read a run. A window after
        an evaluation or a checkpoint holds that too, and the median leaves them out when
        they are rarer than the logged steps. One window: its rate; none: None."""
        steady = self.closed[1:] or self.closed
        return statistics.median(steady) if steady else None
