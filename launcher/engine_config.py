"""Engine configuration as plain data: the DeepSpeed config JSON and the Accelerate
arguments. Computed once by the planner, written to the run directory, and handed to
the engines unchanged, so that what `dlaunch plan` prints is exactly what runs.
"""

from __future__ import annotations

from typing import Any

from launcher.recipe import Recipe

# DeepSpeed prints a line every `steps_per_print` steps; the trainer has its own logging.
_NEVER = 2**31 - 1


# The entries deepspeed_config writes from typed recipe keys (the key each comes from),
# which engine.deepspeed_config may not set (launcher/plan.py).
TYPED_DEEPSPEED_ENTRIES: dict[tuple[str, ...], str] = {
    ("train_batch_size",): "train.global_batch_size",
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum",
    ("gradient_clipping",): "train.clip_grad_norm",
    ("bf16", "enabled"): "precision.dtype",
    ("fp16", "enabled"): "precision.dtype",
    ("fp16", "loss_scale"): "precision.loss_scale",
    ("fp16", "initial_scale_power"): "precision.initial_scale_power",
    ("fp16", "loss_scale_window"): "precision.loss_scale_window",
    ("zero_optimization", "stage"): "engine.zero_stage",
    ("optimizer", "params", "lr"): "optim.lr",
    ("optimizer", "params", "betas"): "optim.betas",
    ("optimizer", "params", "eps"): "optim.eps",
    ("optimizer", "params", "weight_decay"): "optim.weight_decay",
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(recipe: Recipe, *, micro_batch: int, grad_accum: int, global_batch: int,
                     lr: float, zero_stage: int, device: str) -> dict[str, Any]:
    optim, precision, engine = recipe.optim, recipe.precision, recipe.engine
    config: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": recipe.train.clip_grad_norm or 0.0,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": precision.dtype == "bf16"},
        "fp16": {
            "enabled": precision.dtype == "fp16",
            "loss_scale": precision.loss_scale,
            "initial_scale_power": precision.initial_scale_power,
            "loss_scale_window": precision.loss_scale_window,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": {"stage": zero_stage},
    }
    if optim.name in ("adam", "adamw"):
        # DeepSpeed builds Adam itself: DeepSpeedCPUAdam when states are offloaded, and
        # torch's Adam otherwise (torch_adam avoids JIT-compiling FusedAdam on every
        # node at start-up; torch's fused kernel is used on CUDA instead).
        config["optimizer"] = {
            "type": "AdamW" if optim.name == "adamw" else "Adam",
            "params": {"lr": lr, "betas": list(optim.betas), "eps": optim.eps,
                       "weight_decay": optim.weight_decay},
        }
        if not engine.offload_optimizer:
            config["optimizer"]["params"]["torch_adam"] = True
    # SGD has no DeepSpeed config type: the engine passes torch.optim.SGD as a client
    # optimizer, which ZeRO accepts.
    zero = config["zero_optimization"]
    pin = device == "cuda"
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return _merge(config, engine.deepspeed_config)


def accelerate_kwargs(recipe: Recipe, *, grad_accum: int, zero_stage: int, device: str) -> dict[str, Any]:
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.precision.dtype]
    kwargs: dict[str, Any] = {
        "cpu": device == "cpu",
        "mixed_precision": mixed,
        "gradient_accumulation_steps": grad_accum,
        "strategy": recipe.engine.strategy,
    }
    if recipe.precision.dtype == "fp16":
        # torch's GradScaler, with the dynamic scaling the recipe asks DeepSpeed for.
        kwargs["grad_scaler"] = {"init_scale": 2.0 ** recipe.precision.initial_scale_power,
                                 "growth_interval": recipe.precision.loss_scale_window}
    if recipe.engine.strategy == "fsdp":
        # use_orig_params: the optimizer (and its no-decay groups) is built on the model's own
        # parameters before prepare(); FSDP1 would otherwise swap them for one flat
        # parameter the optimizer never sees, and nothing would train (seen on an H100).
        kwargs["fsdp"] = {"sharding_strategy": "FULL_SHARD" if zero_stage == 3 else "SHARD_GRAD_OP",
                          "use_orig_params": True}
    return kwargs
