"""The interface the trainer drives, whatever does the distributed work underneath.

An engine owns the wrapped model, the optimizer and the LR schedule. The trainer hands
it the micro-batches of one optimizer step; the engine does forward, backward,
accumulation, clipping and the optimizer step the way its library wants them done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from launcher.engines.module_stats import Reduce, sum_of_squares
from launcher.plan import LaunchPlan, schedule_shape
from launcher.recipe import TrainConfig
from launcher.schedules import LRSchedule

Batch = tuple[torch.Tensor, torch.Tensor]
BeforeUpdate = Callable[[torch.Tensor], None]
"""What the trainer does between a step's backward pass and its update. On a GPU a read
there waits for the backward's kernels, which the engine's update waits for anyway (its
gradient-norm and overflow checks read back); after the update it would also wait out the
optimizer's kernels, which otherwise run while the host queues the next step."""


@dataclass
class StepResult:
    loss: torch.Tensor
    """Mean loss over the step's micro-batches on this rank (detached, float32)."""
    grad_norm: float | None
    """Global gradient norm before clipping, when the engine reports it (inf when the
    gradients held a NaN or an Inf)."""
    applied: bool = True
    """Whether the optimizer step was applied (not skipped for bad gradients)."""
    module_grad_norms: dict[str, float] | None = None
    """Gradient norm of each top-level module, when asked for."""
    loss_scale: float | None = None
    """fp16: the loss scale after this step (lowered by an overflow); None otherwise."""
    overflow: bool = False
    """fp16: the scaled gradients overflowed (Inf/NaN), so the loss scaler skipped the
    step and lowered its scale: routine, not a fault."""


class Engine(Protocol):
    schedule: LRSchedule
    module: torch.nn.Module
    """The model as built, unwrapped from the engine: its top-level children are the
    modules whose statistics are logged (under ZeRO-3 and FSDP its parameters hold
    this rank's shards)."""

    def train_step(self, micro_batches: Sequence[Batch], *, skip_above: float | None = None,
                   module_norms: bool = False, before_update: BeforeUpdate | None = None) -> StepResult:
        """One optimizer step. With ``skip_above``, a step whose global gradient norm is
        not finite or above it is not applied (the same decision on every rank).
        ``module_norms`` asks for each top-level module's gradient norm.
        ``before_update`` is called once, with the step's mean loss on this rank (as
        StepResult.loss), after the last backward pass and before the optimizer update."""
        ...

    def weight_norms(self) -> tuple[float, dict[str, float]]:
        """(norm of all the model's weights, norm of each top-level module's), as the
        model holds them: the same numbers as the full weights' in model.pt. A
        collective under ZeRO-3 and FSDP: every rank must call it."""
        ...

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits for ``inputs`` (eval mode, no grad). A collective under ZeRO-3 and
        FSDP: every rank must call it the same number of times."""
        ...

    def save(self, directory: Path) -> None:
        """Model, optimizer and loss-scaler state; called by every rank."""
        ...

    def load(self, directory: Path) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The complete model weights in float32 (gathered when sharded); every rank
        must call it, rank 0's result is the one to keep."""
        ...


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch's copy to the device that does not wait for the work already queued there.
    From pinned memory (the loaders pin on GPUs) the host goes on to queue the forward
    pass while the copy runs; a blocking copy first waits out what is queued: under
    DeepSpeed, where the host is the bottleneck, 2.5 ms of a profiled step of GPT-2
    medium on an H200 (docs/benchmarks.md)."""
    return batch.to(device, non_blocking=True)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification (B, C) and next-token prediction (B, T, V) alike,
    computed in float32 whatever the training precision. Targets are class indices, or
    class probabilities (B, C) where mixup, cutmix or label smoothing made them."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    if targets.is_floating_point():
        return F.cross_entropy(flat, targets.reshape(-1, targets.shape[-1]).float())
    return F.cross_entropy(flat, targets.reshape(-1))


def module_grad_norms(model: torch.nn.Module, grad_of: Callable[[torch.nn.Parameter], torch.Tensor | None],
                      device: torch.device, reduce: Reduce | None = None) -> dict[str, float]:
    """The gradient norm of each top-level module (``grad_of`` gives a parameter's full
    gradient, or this rank's shard with ``reduce`` summing the squares over ranks, on
    ``device``)."""
    names, squares = [], []
    for name, module in model.named_children():
        grads = [g for g in (grad_of(p) for p in module.parameters()) if g is not None]
        if grads:
            names.append(name)
            squares.append(sum_of_squares(grads, device))
    if not names:
        return {}
    stacked = torch.stack(squares)
    if reduce is not None:
        reduce(stacked)
    return dict(zip(names, stacked.sqrt().tolist(), strict=True))


def sample_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (loss, accuracy) in float32; a token sequence's are its tokens' means."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    hits = (flat.argmax(-1) == targets.reshape(-1)).float()
    losses = F.cross_entropy(flat, targets.reshape(-1), reduction="none")
    return losses.view(len(targets), -1).mean(1), hits.view(len(targets), -1).mean(1)


def make_schedule(plan: LaunchPlan, optimizer: torch.optim.Optimizer) -> LRSchedule:
    schedule, steps = plan.recipe.schedule, plan.training.steps
    shape = schedule_shape(plan.recipe, steps.total, steps.warmup)
    return LRSchedule(optimizer, shape, plateau_factor=schedule.plateau_factor,
                      plateau_patience=schedule.plateau_patience, mode=monitor_mode(plan.recipe.train))


# The optimizer options a recipe sets (optim.*), as torch and DeepSpeed name them in a
# param group. Not "lr" (the schedule sets it every step), nor what an optimizer counts in
# its groups (DeepSpeed's fused Adam keeps its step count there).
RECIPE_GROUP_OPTIONS = ("weight_decay", "betas", "eps", "momentum")


@contextmanager
def recipe_options_kept(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Loading optimizer state also loads the options its param groups were saved with
    (torch's and DeepSpeed's load_state_dict replace each group's). Around a load, this
    puts the recipe's back: a PBT trial that took another trial's checkpoint with
    perturbed values (cluster/tune.py) steps with its own weight decay, betas and eps."""
    chosen = [{key: group[key] for key in RECIPE_GROUP_OPTIONS if key in group} for group in optimizer.param_groups]
    yield
    for group, options in zip(optimizer.param_groups, chosen, strict=True):
        group.update(options)


def monitor_mode(train: TrainConfig) -> Literal["min", "max"]:
    """min or max for ``train.monitor``; auto means up for accuracies."""
    if train.monitor_mode != "auto":
        return train.monitor_mode
    return "max" if train.monitor.endswith("acc") else "min"


def build_optimizer(plan: LaunchPlan, param_groups: list[dict], device: str) -> torch.optim.Optimizer:
    """The torch optimizer, for engines (Accelerate) and optimizers (SGD under DeepSpeed)
    that take one ready-made."""
    optim = plan.recipe.optim
    lr = plan.training.lr.scaled
    if optim.name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=optim.momentum, nesterov=True)
    cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    # The fused kernel is CUDA-only; on CPU torch picks its default, the single-tensor
    # loop (py-spy: _single_tensor_adam). Nor does the fused kernel take FSDP's sharded
    # fp16 grad scaler, whose inf flag has a shape it refuses (seen on an H100).
    accelerate = plan.training.engine.accelerate or {}
    sharded_fp16 = accelerate.get("strategy") == "fsdp" and plan.training.engine.precision == "fp16"
    return cls(param_groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps,
               fused=device == "cuda" and not sharded_fp16)
