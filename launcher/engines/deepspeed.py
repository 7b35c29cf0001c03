"""DeepSpeed: ZeRO 0-3, CPU offload, bf16, and fp16 with DeepSpeed's own loss scaler.

DeepSpeed does accumulation (``engine.step()`` after every micro-batch only steps the
optimizer at the boundary), clipping and loss scaling from the config the planner
wrote; this class only feeds it batches and moves its checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

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
from launcher.engines.module_stats import partition_weights, weight_norms
from launcher.plan import LaunchPlan

log = logging.getLogger(__name__)

# DeepSpeed keeps its files in a tag folder inside the directory it is given.
_TAG = "deepspeed"


_NO_SHARE = torch.zeros(0)


def _local_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's share of ``param``'s gradient, such that the squares summed over the
    ranks are the whole gradient's: ZeRO-3's partition, or under ZeRO 1-2 the fragment of
    the flat partition this rank's optimizer owns, read as DeepSpeed's get_full_hp_grad
    reads it before all-reducing a zero-padded copy of the whole parameter. That copy and
    its all_reduce, per parameter, cost 9% of the steps at ZeRO-2 when each logged step
    asked for every module's norm (bench/trainer_overhead.py); one all_reduce of the
    modules' sums does now. Empty where this rank owns none of it, so that every rank
    reduces the same modules. A frozen parameter has no gradient (and under ZeRO-3 no
    optimizer to ask for one)."""
    if not param.requires_grad:
        return None
    if hasattr(param, "ds_id"):  # ZeRO-3
        return safe_get_local_grad(param)
    mapping = param._hp_mapping
    if mapping is None:
        return _NO_SHARE
    fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).flatten()
    if fragment.numel() == param.numel():  # a whole-parameter buffer: take this rank's part
        address = mapping.lp_fragment_address
        fragment = fragment.narrow(0, address.start, address.numel)
    return fragment


class DeepSpeedEngine:
    def __init__(self, plan: LaunchPlan, model: torch.nn.Module, groups: list[dict]) -> None:
        training = plan.training
        config = dict(training.engine.deepspeed)
        # Adam-family optimizers are built by DeepSpeed from the config (its LR is every
        # group's peak, which the LR schedule scales group by group); SGD has no config
        # type there, so it is handed over ready-made.
        client_optimizer = None if "optimizer" in config else build_optimizer(
            plan, groups, plan.topology.device)
        self.engine, _, _, self.schedule = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=client_optimizer, config=config,
            lr_scheduler=lambda optimizer: make_schedule(plan, optimizer))
        self.device = self.engine.device
        self.module = self.engine.module
        self.fp16 = training.engine.precision == "fp16"
        self.compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            training.engine.precision, torch.float32)
        log.info("deepspeed: ZeRO stage %d, %s, optimizer %s in %s", self.engine.zero_optimization_stage(),
                 training.engine.precision, type(self.engine.basic_optimizer).__name__,
                 type(self.engine.optimizer).__name__)

    def _to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = to_device(inputs, self.device)
        # DeepSpeed casts the model to bf16/fp16 but not its inputs; token ids stay ints.
        return inputs.to(self.compute_dtype) if inputs.is_floating_point() else inputs

    def train_step(self, micro_batches: Sequence[Batch], *, skip_above: float | None = None,
                   module_norms: bool = False, before_update: BeforeUpdate | None = None) -> StepResult:
        """DeepSpeed itself skips a step whose gradients hold a NaN or an Inf (its overflow
        check); the planner refuses a finite ``skip_above``, which DeepSpeed cannot honour:
        it applies the step before the norm is known here."""
        self.engine.train()
        mean_loss = torch.zeros((), device=self.device)  # over the step's micro-batches
        modules = None
        for index, (inputs, targets) in enumerate(micro_batches):
            loss = loss_fn(self.engine(self._to_device(inputs)), to_device(targets, self.device))
            self.engine.backward(loss)  # scales by 1/accumulation itself
            mean_loss.add_(loss.detach(), alpha=1 / len(micro_batches))
            if index == len(micro_batches) - 1:  # the step's gradients are complete until engine.step()
                if module_norms:
                    modules = self._module_grad_norms()
                if before_update is not None:
                    before_update(mean_loss)
            self.engine.step()  # applies the update at the accumulation boundary only
        # A float at ZeRO-0, a tensor at ZeRO 1-3: there this read waits, on a GPU, for the
        # optimizer's kernels (the one such wait left; the alerts need every step's norm).
        norm = self.engine.get_global_grad_norm()
        applied = self.engine.was_step_applied()
        return StepResult(loss=mean_loss, grad_norm=None if norm is None else float(norm),
                          applied=applied, module_grad_norms=modules, loss_scale=self._loss_scale(),
                          # In fp16 a step is skipped for one reason: its loss scaler's overflow check.
                          overflow=self.fp16 and not applied)

    def _module_grad_norms(self) -> dict[str, float]:
        if self.engine.zero_optimization_stage() == 0:  # every rank holds every gradient whole
            return module_grad_norms(self.module, lambda p: safe_get_full_grad(p) if p.requires_grad else None,
                                     self.device)
        return module_grad_norms(self.module, _local_grad, self.device, reduce=dist.all_reduce)

    def _loss_scale(self) -> float | None:
        # Every fp16 optimizer DeepSpeed wraps (FP16_Optimizer, FP16_UnfusedOptimizer,
        # ZeRO 1-2 and ZeRO-3) exposes its scaler's current scale as `loss_scale`; the
        # engine's own loss_scale() is the static scale of the config.
        scale = self.engine.optimizer.loss_scale if self.fp16 else None
        return None if scale is None else float(scale)

    def weight_norms(self) -> tuple[float, dict[str, float]]:
        if self.engine.zero_optimization_stage() == 3:
            return weight_norms(self.module, _zero3_local_weights, self.device, reduce=dist.all_reduce)
        return weight_norms(self.module, lambda param: param, self.device)

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        self.engine.eval()
        return self.engine(self._to_device(inputs))

    def save(self, directory: Path) -> None:
        # The LR schedule is saved by the trainer with the rest of its state.
        self.engine.save_checkpoint(str(directory), tag=_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        module = self.engine.module
        params = list(module.parameters())
        # Under ZeRO-3 each rank holds a shard; GatheredParameters reassembles them
        # for the duration of the block (a no-op for stages 0-2).
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def _zero3_local_weights(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's share of a ZeRO-3 parameter: its partition (``ds_tensor``, in the
    model's dtype, kept current by the optimizer; on the CPU when parameters are
    offloaded), which is what GatheredParameters assembles for model.pt."""
    return partition_weights(param.ds_tensor, param.ds_numel,
                             dist.get_rank(group=getattr(param, "ds_process_group", None)))
