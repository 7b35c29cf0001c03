"""Statistics of a model's top-level modules at logged steps: weight norms and activations.

Both work on the model as it is held, sharded or not: a weight norm sums the squares of
this rank's share of each parameter (``local_weights``) and all-reduces the sums, so
that no rank ever gathers a whole parameter; activations are seen through forward hooks
that exist only around the step being logged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

Reduce = Callable[[torch.Tensor], None]
"""An in-place sum over ranks (``torch.distributed.all_reduce``)."""

ACTIVATION_STATS = ("mean", "std", "zero")
"""What is recorded of each top-level module's output: its mean, its standard deviation
and the share of its elements that are exactly zero (dead ReLUs)."""


@torch.no_grad()  # rather than a detach() per tensor: weights require grad
def sum_of_squares(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of the tensors' squared elements, in float32 whatever the training dtype,
    on ``device``. Each tensor is summed where it lives (a CPU-offloaded shard on the
    CPU), by torch's multi-tensor norm (as clip_grad_norm_ does): a handful of kernels
    for every tensor of a device and dtype rather than several for each, since a logged
    step takes the norms of every parameter twice (bench/host_work.py)."""
    places: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for tensor in tensors:
        places[tensor.device, tensor.dtype].append(tensor)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for group in places.values():
        norms = torch._foreach_norm(group, 2, dtype=torch.float32)
        total += torch.stack(norms).square().sum().to(device)
    return total


def weight_norms(model: torch.nn.Module, local_weights: Callable[[torch.nn.Parameter], torch.Tensor],
                 device: torch.device, reduce: Reduce | None = None) -> tuple[float, dict[str, float]]:
    """(norm of all the model's weights, norm of each top-level module's weights).

    ``local_weights`` gives a parameter's weights (the whole tensor, or this rank's
    shard with ``reduce`` summing the squares over ranks); ``device`` is where the sums
    are reduced. A weight shared by two modules counts once in the total; a top-level
    module without weights (an activation) is left out."""
    names, squares = [], []
    for name, module in model.named_children():
        params = list(module.parameters())
        if params:
            names.append(name)
            squares.append(sum_of_squares(map(local_weights, params), device))
    squares.append(sum_of_squares(map(local_weights, model.parameters()), device))
    stacked = torch.stack(squares)
    if reduce is not None:
        reduce(stacked)
    norms = stacked.sqrt().tolist()
    return norms[-1], dict(zip(names, norms[:-1], strict=True))


def partition_weights(partition: torch.Tensor, numel: int, rank: int) -> torch.Tensor:
    """The weights in ``rank``'s partition of a parameter of ``numel`` elements that was
    flattened, padded to a multiple of the world size and split into equal partitions
    (ZeRO-3's layout): the padding, which DeepSpeed leaves uninitialised, cut off."""
    size = partition.numel()
    return partition.narrow(0, 0, max(0, min(size, numel - size * rank)))


class ActivationRecorder:
    """The statistics (``ACTIVATION_STATS``) of each top-level module's output on its
    first call, kept on the device until ``averaged`` sums them over ranks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names = [name for name, _ in model.named_children()]
        self.rows: dict[str, torch.Tensor] = {}

    def hook(self, name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, inputs: object, output: object) -> None:
            # The first call only: the step's first micro-batch.
            tensor = _first_float_tensor(output)
            if name not in self.rows and tensor is not None:
                self.rows[name] = output_stats(tensor)

        return record

    def averaged(self, device: torch.device, reduce: Reduce | None = None) -> dict[str, tuple[float, ...]]:
        """{module: (mean, std, zero)}, each the mean over the ranks where the module
        ran; with ``reduce``, a collective every rank must call. The table summed has a
        row per top-level module, in the same order on every rank, and a last column
        counting the ranks that saw it run."""
        if not self.names:
            return {}
        unseen = torch.zeros(len(ACTIVATION_STATS) + 1, device=device)
        table = torch.stack([torch.cat([self.rows[n].to(device), torch.ones(1, device=device)])
                             if n in self.rows else unseen for n in self.names])
        if reduce is not None:
            reduce(table)
        table = table.cpu()
        return {name: tuple((row[:-1] / row[-1]).tolist())
                for name, row in zip(self.names, table, strict=True) if row[-1] > 0}


def output_stats(output: torch.Tensor) -> torch.Tensor:
    """(mean, std, share of exact zeros) of a tensor, in float32."""
    values = output.detach().float()
    return torch.stack([values.mean(), values.std(correction=0), (values == 0).float().mean()])


def _first_float_tensor(output: object) -> torch.Tensor | None:
    """The tensor a module returned, or the first of a tuple or list it returned; None
    when there is no floating-point one (token ids, masks)."""
    if isinstance(output, (tuple, list)):
        output = next((o for o in output if isinstance(o, torch.Tensor)), None)
    if isinstance(output, torch.Tensor) and output.is_floating_point() and output.numel() > 0:
        return output
    return None


@contextmanager
def recording_activations(model: torch.nn.Module, enabled: bool) -> Iterator[ActivationRecorder | None]:
    """Forward hooks on each top-level module of ``model`` for the duration of the block
    (nothing at all when not ``enabled``); they are removed on leaving it."""
    if not enabled:
        yield None
        return
    recorder = ActivationRecorder(model)
    handles = [module.register_forward_hook(recorder.hook(name)) for name, module in model.named_children()]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
