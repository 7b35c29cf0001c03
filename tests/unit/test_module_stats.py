"""Weight norms from whole or sharded weights, ZeRO-3's padding, and activation hooks."""

from __future__ import annotations

import math

import pytest
import torch

from launcher.engines.module_stats import (
    ActivationRecorder,
    output_stats,
    partition_weights,
    recording_activations,
    sum_of_squares,
    weight_norms,
)

CPU = torch.device("cpu")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU())
        self.act = torch.nn.ReLU()  # no weights
        self.head = torch.nn.Linear(5, 2)
        self.tied = torch.nn.Linear(5, 2)
        self.tied.weight = self.head.weight  # shared with head: counted once in the total
        self.scale = torch.nn.Parameter(torch.full((2,), 3.0))  # on the root: the total only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.hidden(x))
        return (self.head(hidden) + self.tied(hidden)) * self.scale


def full_norm(*tensors: torch.Tensor) -> float:
    return math.sqrt(sum(t.double().square().sum().item() for t in tensors))


def test_weight_norms_per_top_level_module_and_in_total():
    torch.manual_seed(0)
    net = Net()
    total, modules = weight_norms(net, lambda p: p, CPU)
    assert modules.keys() == {"hidden", "head", "tied"}
    assert modules["hidden"] == pytest.approx(full_norm(*net.hidden.parameters()), rel=1e-6)
    assert modules["tied"] == pytest.approx(full_norm(net.head.weight, net.tied.bias), rel=1e-6)
    assert total == pytest.approx(full_norm(*net.parameters()), rel=1e-6)  # head.weight once


def test_sum_of_squares_takes_mixed_dtypes_and_empty_shards_in_float32():
    torch.manual_seed(0)
    tensors = [torch.randn(4, 3, dtype=torch.bfloat16), torch.randn(5), torch.zeros(0),
               torch.randn(6, dtype=torch.bfloat16) * 300]  # squares past bf16's 8-bit mantissa
    total = sum_of_squares(iter(tensors), CPU)  # weight_norms hands it a map
    assert total.dtype == torch.float32 and total.device == CPU
    assert total.item() == pytest.approx(full_norm(*tensors) ** 2, rel=1e-6)


def test_sharded_weight_norms_sum_the_shards_squares_over_ranks():
    torch.manual_seed(0)
    net = Net()
    world = 3
    size = {id(p): math.ceil(p.numel() / world) for p in net.parameters()}

    def shard(rank: int):
        # ZeRO-3's layout, padding filled with garbage the norms must not see.
        def local(p: torch.nn.Parameter) -> torch.Tensor:
            padded = torch.full((size[id(p)] * world,), 1e6)
            padded[:p.numel()] = p.detach().flatten()
            return partition_weights(padded.chunk(world)[rank].clone(), p.numel(), rank)
        return local

    def sum_over_ranks(sums: torch.Tensor) -> None:  # what all_reduce does, for ranks 1 and 2
        for rank in (1, 2):
            sums += torch.stack(_squares_of(net, shard(rank)))

    total, modules = weight_norms(net, shard(0), CPU, reduce=sum_over_ranks)
    expected_total, expected_modules = weight_norms(net, lambda p: p, CPU)
    assert total == pytest.approx(expected_total, rel=1e-6)
    assert modules == pytest.approx(expected_modules, rel=1e-6)


def _squares_of(net: torch.nn.Module, local) -> list[torch.Tensor]:
    total, modules = weight_norms(net, local, CPU)
    return [torch.tensor(v ** 2) for v in (*modules.values(), total)]


def test_partition_weights_cut_the_padding_and_leave_ranks_past_the_end_empty():
    partition = torch.tensor([1.0, 2.0, float("nan")])
    assert partition_weights(partition, numel=8, rank=2).tolist() == [1.0, 2.0]  # 3 + 3 + 2
    assert partition_weights(partition, numel=8, rank=1).numel() == 3
    assert partition_weights(partition, numel=2, rank=1).numel() == 0  # 2 elements on 4 ranks


def test_output_stats_are_mean_std_and_the_share_of_exact_zeros():
    out = torch.tensor([[0.0, 2.0], [0.0, 6.0]])
    mean, std, zero = output_stats(out).tolist()
    assert (mean, zero) == (2.0, 0.5)
    assert std == pytest.approx(out.std(correction=0).item())


def test_hooks_record_each_modules_first_call_only_and_are_gone_after_the_block():
    torch.manual_seed(0)
    net = Net()
    first, second = torch.randn(8, 3), torch.randn(8, 3) * 100
    with recording_activations(net, enabled=True) as recorder:
        net(first)
        net(second)  # a later micro-batch: not recorded
    assert all(not m._forward_hooks for m in net.children())
    stats = recorder.averaged(CPU)
    assert stats.keys() == {"hidden", "act", "head", "tied"}
    expected = output_stats(net.hidden(first)).tolist()
    assert stats["hidden"] == pytest.approx(expected)
    assert 0 < stats["hidden"][2] < 1  # a ReLU's dead units on a random batch

    with recording_activations(net, enabled=False) as nothing:
        assert nothing is None and all(not m._forward_hooks for m in net.children())


def test_averaged_stats_are_the_mean_over_the_ranks_where_a_module_ran():
    net = Net()
    recorder = ActivationRecorder(net)
    recorder.rows = {"hidden": torch.tensor([1.0, 2.0, 0.5]), "head": torch.tensor([3.0, 1.0, 0.0])}
    other_rank = torch.tensor([[3.0, 4.0, 0.25, 1.0],  # hidden
                               [0.0, 0.0, 0.0, 0.0],   # act: ran nowhere
                               [0.0, 0.0, 0.0, 0.0],   # head: not on that rank
                               [0.0, 0.0, 0.0, 0.0]])  # tied

    def sum_over_ranks(table: torch.Tensor) -> None:
        table += other_rank

    stats = recorder.averaged(CPU, reduce=sum_over_ranks)
    assert stats == {"hidden": pytest.approx((2.0, 3.0, 0.375)), "head": pytest.approx((3.0, 1.0, 0.0))}


def test_tuple_outputs_give_their_first_tensor_and_integer_outputs_none():
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x * 2, x

    class Ids(torch.nn.Module):
        def forward(self, x):
            return x.long()

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.ids = Pair(), Ids()

        def forward(self, x):
            return self.pair(x)[0] + self.ids(x)

    model = Both()
    with recording_activations(model, enabled=True) as recorder:
        model(torch.ones(4))
    assert recorder.averaged(CPU) == {"pair": pytest.approx((2.0, 0.0, 0.0))}
