"""MFU's ingredients: FLOPs counted per training sample, device peaks, the reported rates."""

from __future__ import annotations

import pytest
import torch

from launcher.flops import RateWindows, Throughput, peak_flops, training_flops_per_sample
from launcher.models.gpt import GPT


def test_a_linear_layer_costs_three_forward_passes_of_two_flops_per_multiply_add():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    assert training_flops_per_sample(model, torch.zeros(1, 64)) == 3 * 2 * (64 * 32 + 32 * 10)


def test_a_convolution_is_counted_per_output_position():
    model = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    # 8 x 16 x 16 outputs, each 3 x 3 x 3 multiply-adds.
    assert training_flops_per_sample(model, torch.zeros(1, 3, 16, 16)) == 3 * 2 * 8 * 16 * 16 * 27


def test_a_gpt_costs_six_flops_per_weight_and_token_plus_attention():
    tokens, width, layers = 32, 64, 2
    model = GPT((tokens,), 64, n_layer=layers, n_head=2, n_embd=width)
    counted = training_flops_per_sample(model, torch.zeros(1, tokens, dtype=torch.long))
    matmul_weights = sum(p.numel() for p in model.blocks.parameters() if p.dim() == 2)
    head = 64 * width  # the output projection to the vocabulary (tied to the embedding)
    attention = 2 * 2 * tokens * tokens * width * layers  # QK^T and AV, 2 FLOPs a multiply-add
    assert counted == pytest.approx(3 * (2 * (matmul_weights + head) * tokens + attention), rel=0.02)


def test_peaks_come_from_the_recipe_or_the_table_and_never_for_cpus_or_fp32():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16", None) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "fp16", None) == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16", None) == 312e12
    assert peak_flops(None, "bf16", None) is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32", None) is None
    assert peak_flops(None, "fp32", 3.5) == 3.5e12


def test_rates_add_tokens_and_mfu_when_known():
    assert Throughput(1e6, None, None).rates(100.0) == {"samples_per_s": 100.0}
    rates = Throughput(2e9, 128, 1e12).rates(50.0)
    assert rates == {"samples_per_s": 50.0, "tokens_per_s": 6400.0, "mfu": pytest.approx(0.1)}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_window_closes_when_its_rate_is_read_and_what_follows_falls_in_the_next():
    clock = Clock()
    windows = RateWindows(samples_per_step=8, clock=clock)
    for _ in range(4):
        clock.now += 1.0
        windows.step()
    assert windows.rate() == 8.0  # the progress bar's, the window left open
    assert windows.close() == 8.0
    clock.now += 2.0  # the logged step's weight norms and sink writes, an evaluation
    for _ in range(4):
        clock.now += 1.0
        windows.step()
    assert windows.close() == 4 * 8 / 6.0
    assert windows.closed == [8.0, 4 * 8 / 6.0]


def windows_of(rates: list[float]) -> RateWindows:
    clock = Clock()
    windows = RateWindows(samples_per_step=1, clock=clock)
    for rate in rates:
        clock.now += 1 / rate
        windows.step()
        windows.close()
    return windows


def test_the_end_of_run_rate_leaves_out_the_first_window_and_slow_ones():
    # The first window holds the warm-up; one after an evaluation is slow too.
    assert windows_of([12.0, 100.0, 104.0, 40.0, 102.0]).steady_rate() == pytest.approx(101.0)
    assert windows_of([12.0]).steady_rate() == pytest.approx(12.0)
    assert windows_of([]).steady_rate() is None
