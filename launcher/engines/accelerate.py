"""Accelerate: DDP or FSDP, with bf16/fp16 autocast (and Accelerate's grad scaler for fp16).

The step is the loop Accelerate's documentation teaches: ``accumulate()`` decides when
gradients are synchronised, ``backward`` scales the loss, the optimizer only steps on
the last micro-batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, FullyShardedDataParallelPlugin

from launcher.engines.base import (
    Batch,
    StepResult,
    build_optimizer,
    loss_fn,
    make_schedule,
    module_grad_norms,
)
from launcher.plan import LaunchPlan

log = logging.getLogger(__name__)


def _accelerator(kwargs: dict, plan: LaunchPlan) -> Accelerator:
    plugin = None
    if kwargs["strategy"] == "fsdp":
        plugin = FullyShardedDataParallelPlugin(**kwargs["fsdp"])
    return Accelerator(
        cpu=kwargs["cpu"], mixed_precision=kwargs["mixed_precision"],
        gradient_accumulation_steps=kwargs["gradient_accumulation_steps"],
        # The trainer steps the schedule once per optimizer step; letting Accelerate
        # step it would advance it once per process.
        step_scheduler_with_optimizer=False,
        fsdp_plugin=plugin,
        # Built-in models use every parameter; a user model may not, and DDP hangs
        # rather than erroring when a parameter gets no gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=plan.recipe.model.target is not None)],
    )


class AccelerateEngine:
    def __init__(self, plan: LaunchPlan, model: torch.nn.Module, groups: list[dict]) -> None:
        kwargs = plan.training.engine.accelerate
        self.accelerator = _accelerator(kwargs, plan)
        self.device = self.accelerator.device
        self.clip = plan.recipe.train.clip_grad_norm
        optimizer = build_optimizer(plan, groups, plan.topology.device)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.schedule = make_schedule(plan, self.optimizer.optimizer)
        log.info("accelerate: %s, mixed precision %s, %d accumulation steps",
                 self.accelerator.distributed_type.value, self.accelerator.mixed_precision,
                 self.accelerator.gradient_accumulation_steps)

    def train_step(self, micro_batches: Sequence[Batch], *, skip_above: float | None = None,
                   module_norms: bool = False) -> StepResult:
        self.model.train()
        total = torch.zeros((), device=self.device)
        norm, applied, modules = None, True, None
        for inputs, targets in micro_batches:
            with self.accelerator.accumulate(self.model):
                loss = loss_fn(self.model(inputs.to(self.device)), targets.to(self.device))
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:
                    if module_norms:
                        modules = self._module_norms()
                    norm = self._grad_norm()
                    # Every rank holds the same reduced gradients (DDP) or the same
                    # global norm (FSDP): they all decide alike.
                    applied = skip_above is None or (math.isfinite(norm) and norm <= skip_above)
                if applied:
                    self.optimizer.step()  # a no-op until the last micro-batch
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        self.schedule.step()
        return StepResult(loss=total / len(micro_batches), grad_norm=norm, applied=applied,
                          module_grad_norms=modules)

    def _module_norms(self) -> dict[str, float]:
        # Under FSDP each rank holds a shard of each gradient: sum the squares over ranks.
        sharded = self.accelerator.distributed_type.value == "FSDP"
        return module_grad_norms(self.accelerator.unwrap_model(self.model), lambda p: p.grad,
                                 reduce=torch.distributed.all_reduce if sharded else None)

    def _grad_norm(self) -> float:
        params = self.model.parameters()
        if self.clip is not None:
            return float(self.accelerator.clip_grad_norm_(params, self.clip))
        return float(self.accelerator.clip_grad_norm_(params, float("inf")))

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(inputs.to(self.device))

    def save(self, directory: Path) -> None:
        self.accelerator.save_state(str(directory))

    def load(self, directory: Path) -> None:
        self.accelerator.load_state(str(directory))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        state = self.accelerator.get_state_dict(self.model)
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}
