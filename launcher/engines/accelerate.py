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
from accelerate.utils import (
    DistributedDataParallelKwargs,
    FullyShardedDataParallelPlugin,
    GradScalerKwargs,
    InitProcessGroupKwargs,
)

from launcher.engines.base import (
    Batch,
    BeforeUpdate,
    StepResult,
    build_optimizer,
    loss_fn,
    make_schedule,
    module_grad_norms,
    to_device,
)
from launcher.engines.module_stats import weight_norms
from launcher.plan import LaunchPlan
from launcher.watchdog import process_group_timeout

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
            find_unused_parameters=plan.recipe.model.target is not None),
            # Above the watchdog's timeouts: the watchdog, which names the ranks, fires first.
            # Accelerate passes it to init_process_group on its CPU (gloo) path too.
            InitProcessGroupKwargs(timeout=process_group_timeout(plan)),
            *([GradScalerKwargs(**kwargs["grad_scaler"])] if "grad_scaler" in kwargs else [])],
    )


class AccelerateEngine:
    def __init__(self, plan: LaunchPlan, model: torch.nn.Module, groups: list[dict]) -> None:
        kwargs = plan.training.engine.accelerate
        self.accelerator = _accelerator(kwargs, plan)
        self.device = self.accelerator.device
        self.clip = plan.recipe.train.clip_grad_norm
        optimizer = build_optimizer(plan, groups, plan.topology.device)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # The module prepare() wrapped (DDP and FSDP keep it, and its autocast forward, as
        # their .module), which is what unwrap_model returns; unwrap_model also imports
        # DeepSpeed when it is installed, two seconds of every rank's start-up.
        self.module = model
        # Under FSDP each rank holds a shard of each weight and gradient: norms sum the
        # squares of the shards over ranks.
        self.sharded = self.accelerator.distributed_type.value == "FSDP"
        self.schedule = make_schedule(plan, self.optimizer.optimizer)
        log.info("accelerate: %s, mixed precision %s, %d accumulation steps",
                 self.accelerator.distributed_type.value, self.accelerator.mixed_precision,
                 self.accelerator.gradient_accumulation_steps)

    def train_step(self, micro_batches: Sequence[Batch], *, skip_above: float | None = None,
                   module_norms: bool = False, before_update: BeforeUpdate | None = None) -> StepResult:
        self.model.train()
        mean_loss = torch.zeros((), device=self.device)  # over the step's micro-batches
        norm, applied, overflow, modules = None, True, False, None
        scaler = self.accelerator.scaler  # fp16 only
        for inputs, targets in micro_batches:
            with self.accelerator.accumulate(self.model):
                loss = loss_fn(self.model(to_device(inputs, self.device)), to_device(targets, self.device))
                self.accelerator.backward(loss)
                mean_loss.add_(loss.detach(), alpha=1 / len(micro_batches))
                if self.accelerator.sync_gradients:
                    if module_norms:
                        modules = self._module_norms()
                    norm = self._grad_norm()
                    # Every rank holds the same reduced gradients (DDP) or the same
                    # global norm (FSDP): they all decide alike. In fp16 a non-finite
                    # norm is an overflow of the scaled gradients, the scaler's to
                    # handle: its step() skips the update and lowers the scale.
                    overflow = scaler is not None and not math.isfinite(norm)
                    applied = skip_above is None or overflow or (math.isfinite(norm) and norm <= skip_above)
                    if before_update is not None:
                        before_update(mean_loss)
                if applied:
                    self.optimizer.step()  # a no-op until the last micro-batch
                self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        # The scaler skips a step whose unscaled gradients hold an Inf or a NaN: exactly
        # a non-finite norm (clipping unscales them first). Accelerate's step_was_skipped
        # cannot tell: a fused optimizer is called and skips by itself (seen on an H100).
        return StepResult(loss=mean_loss, grad_norm=norm, applied=applied and not overflow,
                          module_grad_norms=modules, overflow=overflow,
                          loss_scale=None if scaler is None else float(scaler.get_scale()))

    def _module_norms(self) -> dict[str, float]:
        """Before clipping, which unscales fp16 gradients (once a step, as GradScaler
        allows): divided by the loss scale here."""
        norms = module_grad_norms(self.module, lambda p: p.grad, self.device,
                                  reduce=torch.distributed.all_reduce if self.sharded else None)
        scale = 1.0 if self.accelerator.scaler is None else float(self.accelerator.scaler.get_scale())
        return {name: norm / scale for name, norm in norms.items()}

    def weight_norms(self) -> tuple[float, dict[str, float]]:
        # FSDP's use_orig_params keeps each original parameter as a view of this rank's
        # part of the flat shard (empty where the rank holds none of it), padding excluded.
        return weight_norms(self.module, lambda param: param, self.device,
                            reduce=torch.distributed.all_reduce if self.sharded else None)

    def _grad_norm(self) -> float:
        params = self.model.parameters()
        if self.clip is not None:
            return float(self.accelerator.clip_grad_norm_(params, self.clip))
        return float(self.accelerator.clip_grad_norm_(params, float("inf")))

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(to_device(inputs, self.device))

    def save(self, directory: Path) -> None:
        self.accelerator.save_state(str(directory))

    def load(self, directory: Path) -> None:
        self.accelerator.load_state(str(directory))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        # FSDP gathers the shards; DDP's module holds the weights whole, and asking
        # Accelerate for them would import DeepSpeed (unwrap_model), 2 s of every run's end.
        state = self.accelerator.get_state_dict(self.model) if self.sharded else self.module.state_dict()
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}
