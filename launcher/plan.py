"""Recipe + flags -> LaunchPlan: every decision about how a job runs, made once.

Pure: no torch, no I/O. What the planner needs to know about the host and the data
comes in as values (``HostFacts``, ``DataFacts``), so a test can plan a 4-node GPU job
on a laptop. Combinations that cannot work are refused here, before any process
starts, as ``UsageError`` naming the key to change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from launcher.data.facts import DataFacts
from launcher.engine_config import TYPED_DEEPSPEED_ENTRIES, accelerate_kwargs, deepspeed_config
from launcher.errors import UsageError
from launcher.memory import MemoryEstimate, amount, checkpoint_bytes, estimate, format_memory, weights_bytes
from launcher.models.counts import builtin_params
from launcher.models.facts import ModelFacts, uses_transfer
from launcher.recipe import DataConfig, EngineConfig, Recipe
from launcher.schedules import ScheduleShape, cycle_count, cycle_ends

MAX_SNAPSHOTS = 1000
"""Snapshots a run may save (schedule.snapshots): an ensemble uses a handful, and each is
a full copy of the weights, listed in the plan."""


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HostFacts(_Value):
    """What the planner may know about the machine that launches the job."""

    has_cuda: bool
    cpus: int
    hostname: str


class Topology(_Value):
    backend: Literal["local", "slurm", "ray"]
    nodes: int
    procs_per_node: int
    world_size: int
    device: Literal["cpu", "cuda"]
    dist_backend: Literal["gloo", "nccl"]
    rdzv_timeout: int


class BatchPlan(_Value):
    micro: int
    grad_accum: int
    global_: int


class LearningRate(_Value):
    base: float
    scaled: float
    rule: Literal["none", "linear", "sqrt"]
    reference_batch: int | None


class StepPlan(_Value):
    total: int
    per_epoch: int
    warmup: int
    eval_every: int
    checkpoint_every: int
    log_every: int
    snapshots: tuple[int, ...] = ()
    """Steps after which the weights are saved as a snapshot (schedule.snapshots): the
    ends of the warm-restart cycles and the last step."""


class EnginePlan(_Value):
    name: Literal["deepspeed", "accelerate"]
    zero_stage: int
    precision: Literal["fp32", "bf16", "fp16"]
    deepspeed: dict[str, Any] | None
    accelerate: dict[str, Any] | None


class TrainingPlan(_Value):
    data: DataFacts
    batch: BatchPlan
    lr: LearningRate
    steps: StepPlan
    engine: EnginePlan
    model: ModelFacts | None = None
    """Initial weights and frozen parameters, for a transfer-learning recipe."""
    memory: MemoryEstimate | None = None
    """The model states each rank holds (launcher/memory.py); None when the model's
    parameters could not be counted."""


class ScriptPlan(_Value):
    path: str
    args: list[str]


class LaunchPlan(_Value):
    name: str
    run_dir: str
    recipe: Recipe
    """The resolved recipe: the file, the overrides and every default."""
    topology: Topology
    env: dict[str, str]
    training: TrainingPlan | None
    """What the built-in trainer runs; None when the job is a user script."""
    script: ScriptPlan | None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LaunchPlan:
        return cls.model_validate_json(text)


def _device(recipe: Recipe, backend: str, host: HostFacts) -> Literal["cpu", "cuda"]:
    """On Slurm the launching host (a login node) says nothing about the compute nodes:
    the GPUs the job asks for do."""
    device = recipe.cluster.device
    if backend == "slurm":
        return ("cuda" if recipe.cluster.slurm.gpus_per_node else "cpu") if device == "auto" else device
    gpus_per_worker = recipe.cluster.ray.gpus_per_worker
    if backend == "ray":
        # The Ray cluster's nodes, not this host, run the job: GPUs asked of Ray decide;
        # unasked, this host stands for them (it is usually the head node, or the cluster).
        if device == "auto":
            return "cuda" if gpus_per_worker or (gpus_per_worker is None and host.has_cuda) else "cpu"
        if device == "cpu" and gpus_per_worker:
            raise UsageError("GPUs requested for a cpu job", key="cluster.ray.gpus_per_worker")
        if device == "cuda" and gpus_per_worker == 0:
            raise UsageError("a cuda job needs GPUs; set gpus_per_worker above 0 or unset it",
                             key="cluster.ray.gpus_per_worker")
        return device
    if device == "auto":
        return "cuda" if host.has_cuda else "cpu"
    if device == "cuda" and not host.has_cuda:
        raise UsageError("cuda requested but this host has no NVIDIA GPU", key="cluster.device")
    return device


def _topology(recipe: Recipe, host: HostFacts, backend: str | None, nodes: int | None,
              procs: int | None) -> Topology:
    cluster = recipe.cluster
    backend = backend or cluster.backend
    nodes = nodes or cluster.nodes
    procs = procs or cluster.procs_per_node
    if nodes < 1 or procs < 1:
        raise UsageError("nodes and procs per node must be at least 1", key="cluster.nodes")
    device = _device(recipe, backend, host)
    if backend == "slurm" and device == "cpu" and cluster.slurm.gpus_per_node:
        raise UsageError("GPUs requested for a cpu job", key="cluster.slurm.gpus_per_node")
    return Topology(backend=backend, nodes=nodes, procs_per_node=procs, world_size=nodes * procs,
                    device=device,
                    dist_backend="nccl" if device == "cuda" else "gloo",
                    rdzv_timeout=cluster.rdzv_timeout)


def _batch(recipe: Recipe, world: int) -> BatchPlan:
    train = recipe.train
    micro = train.micro_batch_size
    if train.global_batch_size is None:
        accum = train.grad_accum or 1
        return BatchPlan(micro=micro, grad_accum=accum, global_=micro * world * accum)
    per_step = micro * world
    if train.global_batch_size % per_step:
        raise UsageError(
            f"{train.global_batch_size} is not divisible by micro_batch_size x world size "
            f"= {micro} x {world} = {per_step}; pick a multiple of {per_step}",
            key="train.global_batch_size")
    accum = train.global_batch_size // per_step
    if train.grad_accum is not None and train.grad_accum != accum:
        raise UsageError(
            f"{train.grad_accum} disagrees with global_batch_size {train.global_batch_size} = "
            f"{micro} x {world} ranks x {accum}; set one of the two", key="train.grad_accum")
    return BatchPlan(micro=micro, grad_accum=accum, global_=train.global_batch_size)


def _learning_rate(recipe: Recipe, global_batch: int) -> LearningRate:
    optim = recipe.optim
    if optim.reference_batch is None or optim.scaling == "none":
        return LearningRate(base=optim.lr, scaled=optim.lr, rule="none", reference_batch=optim.reference_batch)
    rule = optim.scaling
    if rule == "auto":
        rule = "linear" if optim.name == "sgd" else "sqrt"
    ratio = global_batch / optim.reference_batch
    factor = ratio if rule == "linear" else math.sqrt(ratio)
    return LearningRate(base=optim.lr, scaled=optim.lr * factor, rule=rule,
                        reference_batch=optim.reference_batch)


def _steps(recipe: Recipe, data: DataFacts, global_batch: int, world_size: int) -> StepPlan:
    train = recipe.train
    usable = data.num_train
    if recipe.data.streaming:  # each rank its own rows: as many as the smallest share
        from launcher.data.streaming import train_rows_per_rank

        usable = world_size * train_rows_per_rank(recipe.data, data, world_size)
    per_epoch = usable // global_batch
    if per_epoch == 0:
        raise UsageError(
            f"the training split has {usable} rows{' the ranks can share' if usable < data.num_train else ''}, "
            f"fewer than one global batch of {global_batch}; lower micro_batch_size or use fewer ranks",
            key="train.micro_batch_size")
    if train.max_steps is not None:
        total = train.max_steps
    elif train.epochs is not None:
        total = max(1, math.ceil(train.epochs * per_epoch))
    else:
        raise UsageError("set train.epochs or train.max_steps", key="train.epochs")
    schedule = recipe.schedule
    warmup = schedule.warmup_steps
    if warmup is None:
        warmup = round(schedule.warmup_fraction * total)
    if warmup >= total:
        raise UsageError(f"{warmup} warmup steps leave nothing of a {total}-step run",
                         key="schedule.warmup_steps")
    if data.num_val == 0 and (train.early_stopping.patience is not None or schedule.name == "plateau"):
        raise UsageError("early stopping and reduce-on-plateau need a validation split; "
                         "set data.val_fraction > 0", key="data.val_fraction")
    eval_every = min(train.eval_every or per_epoch, total)
    if schedule.snapshots and schedule.name != "cosine_restarts":
        raise UsageError(f"snapshots are taken at the ends of warm-restart cycles; {schedule.name} has "
                         "none: set schedule.name: cosine_restarts", key="schedule.snapshots")
    profile = recipe.logging.profile
    if profile is not None and profile.start_step + profile.steps - 1 > total:
        raise UsageError(f"profiling steps {profile.start_step}-{profile.start_step + profile.steps - 1} "
                         f"run past the last of {total} steps", key="logging.profile.start_step")
    shape = schedule_shape(recipe, total, warmup)
    if schedule.snapshots and (cycles := cycle_count(shape)) > MAX_SNAPSHOTS:
        raise UsageError(f"{cycles} warm-restart cycles would save {cycles} snapshots, each a copy of the "
                         f"weights; set a longer restart_period (or a restart_mult above 1) for at most "
                         f"{MAX_SNAPSHOTS}", key="schedule.restart_period")
    snapshots = cycle_ends(shape) if schedule.snapshots else []
    return StepPlan(total=total, per_epoch=per_epoch, warmup=warmup, eval_every=eval_every,
                    checkpoint_every=min(train.checkpoint_every or eval_every, total),
                    log_every=recipe.logging.log_every, snapshots=tuple(snapshots))


def schedule_shape(recipe: Recipe, total_steps: int, warmup_steps: int) -> ScheduleShape:
    """The LR schedule's shape: what the engines' LRSchedule follows and the snapshot
    steps are derived from."""
    schedule = recipe.schedule
    return ScheduleShape(name=schedule.name, total_steps=total_steps, warmup_steps=warmup_steps,
                         min_lr_ratio=schedule.min_lr_ratio, restart_period=schedule.restart_period,
                         restart_mult=schedule.restart_mult)


_ABSENT = object()


def _check_deepspeed_overrides(engine: EngineConfig) -> None:
    """Refuse the deepspeed_config entries the plan derives from typed keys: DeepSpeed
    would run something other than what the plan checked, printed and estimated."""
    for path, typed in TYPED_DEEPSPEED_ENTRIES.items():
        node: Any = engine.deepspeed_config
        for part in path:
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            raise UsageError(f"dlaunch sets this from {typed}; set {typed} instead",
                             key=".".join(("engine", "deepspeed_config", *path)))
    # Offload is planned from the typed switches (the stage it needs, the optimizer it
    # runs, the memory it saves); the config may refine it (an NVMe device, buffer sizes).
    zero = engine.deepspeed_config.get("zero_optimization", {})
    for section, typed in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_params")):
        if isinstance(zero, dict) and section in zero and not getattr(engine, typed):
            raise UsageError(f"set engine.{typed}: true to offload; this section can then refine it",
                             key=f"engine.deepspeed_config.zero_optimization.{section}")


def _engine(recipe: Recipe, topo: Topology, batch: BatchPlan, lr: float) -> EnginePlan:
    engine, precision = recipe.engine, recipe.precision.dtype
    if engine.name == "deepspeed":
        if engine.strategy != "ddp":
            raise UsageError("strategy is for engine.name accelerate; DeepSpeed shards with "
                             "engine.zero_stage", key="engine.strategy")
        if precision == "fp16" and topo.device == "cpu":
            raise UsageError("DeepSpeed does not train fp16 on CPU; use bf16 or fp32 here, "
                             "fp16 on GPUs", key="precision.dtype")
        stage = 2 if engine.zero_stage is None else engine.zero_stage
        if precision == "fp16" and stage == 0:
            # DeepSpeed 0.19's engine scales the loss for ZeRO optimizers only, yet its
            # non-ZeRO fp16 optimizer still divides the gradients by the loss scale:
            # updates shrink by 2**16 and nothing trains (seen on an H100).
            raise UsageError("DeepSpeed trains fp16 with ZeRO only: without it the loss scale divides "
                             "gradients it never multiplied; use zero_stage 1-3, or bf16", key="engine.zero_stage")
        if engine.offload_optimizer and stage == 0:
            raise UsageError("optimizer offload needs ZeRO stage 1, 2 or 3", key="engine.offload_optimizer")
        if engine.offload_optimizer and recipe.optim.name == "sgd":
            raise UsageError("optimizer offload runs DeepSpeedCPUAdam; use optim.name adam or adamw",
                             key="engine.offload_optimizer")
        if engine.offload_params and stage != 3:
            raise UsageError("parameter offload needs ZeRO stage 3", key="engine.offload_params")
        _check_deepspeed_overrides(engine)
        config = deepspeed_config(recipe, micro_batch=batch.micro, grad_accum=batch.grad_accum,
                                  global_batch=batch.global_, lr=lr, zero_stage=stage,
                                  device=topo.device)
        return EnginePlan(name="deepspeed", zero_stage=stage, precision=precision,
                          deepspeed=config, accelerate=None)
    if engine.offload_optimizer or engine.offload_params:
        raise UsageError("CPU offload is a DeepSpeed feature; use engine.name deepspeed",
                         key="engine.offload_optimizer" if engine.offload_optimizer else "engine.offload_params")
    if engine.deepspeed_config:
        raise UsageError("deepspeed_config is for engine.name deepspeed", key="engine.deepspeed_config")
    if engine.strategy == "ddp":
        stage = engine.zero_stage or 0
        if stage > 0:
            raise UsageError(f"ZeRO stage {stage} shards model state, which DDP does not; use "
                             "engine.name deepspeed, or engine.strategy fsdp", key="engine.zero_stage")
    else:
        if topo.device == "cpu":
            # Accelerate switches to FSDP only for GPU-family devices; on CPU it would
            # silently fall back to plain data parallelism.
            raise UsageError("Accelerate runs FSDP on GPUs only; on CPU shard with engine.name "
                             "deepspeed and zero_stage 3", key="engine.strategy")
        stage = 3 if engine.zero_stage is None else engine.zero_stage
        if stage not in (2, 3):
            raise UsageError(f"FSDP shards like ZeRO 2 (SHARD_GRAD_OP) or 3 (FULL_SHARD), not "
                             f"{stage}", key="engine.zero_stage")
    if precision == "fp16" and topo.device == "cpu":
        raise UsageError("fp16 mixed precision needs GPUs; use bf16 or fp32 on CPU",
                         key="precision.dtype")
    if precision == "fp16" and recipe.precision.loss_scale:
        raise UsageError("a static loss scale is a DeepSpeed setting; Accelerate's GradScaler is "
                         "dynamic: leave loss_scale 0 and set initial_scale_power", key="precision.loss_scale")
    kwargs = accelerate_kwargs(recipe, grad_accum=batch.grad_accum, zero_stage=stage, device=topo.device)
    return EnginePlan(name="accelerate", zero_stage=stage, precision=precision,
                      deepspeed=None, accelerate=kwargs)


def _check_alerts(recipe: Recipe) -> None:
    """Skip policies the engine can honour. DeepSpeed applies each step inside its own
    step(), before dlaunch sees the gradient norm; it skips a step itself only when the
    gradients hold a NaN or an Inf, and that check runs in ZeRO stages 1-2 and in fp16."""
    if recipe.engine.name != "deepspeed":
        return
    if recipe.alerts.exploding_grad.policy == "skip":
        raise UsageError("DeepSpeed applies a step before its gradient norm is known, so a step "
                         "with a finite norm cannot be skipped; use warn or stop, or engine accelerate",
                         key="alerts.exploding_grad.policy")
    if (recipe.alerts.nonfinite.policy == "skip" and recipe.engine.zero_stage in (0, 3)
            and recipe.precision.dtype != "fp16"):
        raise UsageError(f"DeepSpeed checks gradients for NaN/Inf in ZeRO stages 1-2 and in fp16 only, "
                         f"not in stage {recipe.engine.zero_stage} with {recipe.precision.dtype}; use "
                         "stop, or one of those", key="alerts.nonfinite.policy")


def _check_model(recipe: Recipe, data: DataFacts) -> None:
    if recipe.data.augment.cutmix_alpha and len(data.input_shape) != 3:
        raise UsageError(f"cutmix pastes boxes of images (C, H, W); the data has shape "
                         f"{list(data.input_shape)}; set data.shape or use mixup_alpha",
                         key="data.augment.cutmix_alpha")
    model = recipe.model
    if model.target is not None:
        return
    tokens = recipe.data.kind == "tokens"
    if model.name == "gpt" and not tokens:
        raise UsageError("gpt predicts tokens; set data.kind: tokens", key="model.name")
    if model.name != "gpt" and tokens:
        raise UsageError(f"{model.name} classifies feature rows; use model.name gpt for token data",
                         key="model.name")
    if model.name == "cnn" and len(data.input_shape) != 3:
        raise UsageError(f"cnn needs image-shaped inputs (C, H, W), the data has shape "
                         f"{list(data.input_shape)}; set data.shape", key="model.name")


def _check_unfreeze(recipe: Recipe, steps: StepPlan) -> None:
    if recipe.model.unfreeze and recipe.engine.name == "accelerate" and recipe.engine.strategy == "fsdp":
        # FSDP's forward runs on views of its flat parameters, so the gradient hooks that
        # hold a parameter until its step (launcher/models/transfer.py) never fire.
        raise UsageError("FSDP trains views of its flat parameters, past the gradient hooks that hold "
                         "a parameter until its step; use engine.strategy ddp or engine.name deepspeed",
                         key="model.unfreeze")
    for index, entry in enumerate(recipe.model.unfreeze):
        if entry.at_step >= steps.total:
            raise UsageError(f"step {entry.at_step} is not before the run's end ({steps.total} steps): "
                             "those parameters would never train", key=f"model.unfreeze.{index}.at_step")


def _memory(recipe: Recipe, data: DataFacts, topo: Topology, engine: EnginePlan, model: ModelFacts | None,
            target_params: int | None) -> MemoryEstimate | None:
    """The per-rank model states, from the parameters the transfer facts counted, the
    caller counted (a ``model.target`` model), or the built-in model's formula. A target
    model's frozen parameters are not known here: all of them count as trainable."""
    frozen = 0
    if model is not None and model.params is not None:
        params = model.params
        # Those unfrozen later train from the start, as far as the engine knows.
        frozen = (model.frozen or 0) - (model.unfrozen_later or 0)
    elif recipe.model.target is not None:
        params = target_params
    else:
        params = builtin_params(recipe.model, data)
    if params is None:
        return None
    return estimate(recipe, zero_stage=engine.zero_stage, world_size=topo.world_size, params=params,
                    trainable=params - frozen)


# What the planner sets for CPU ranks that a user may have tuned in the environment
# dlaunch runs in: theirs wins, as torchrun leaves an OMP_NUM_THREADS it finds alone.
TUNABLE_ENV = ("OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def user_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings of TUNABLE_ENV that ``environ`` has."""
    return {name: environ[name] for name in TUNABLE_ENV if name in environ}


def _env(recipe: Recipe, topo: Topology, host: HostFacts, environ: Mapping[str, str]) -> dict[str, str]:
    # The user's recorded in the plan, not left to inheritance: Slurm and Ray ranks get
    # them too, and `--resume` from a shell without them runs as the run started.
    return {**_planned_env(recipe, topo, host), **user_env(environ)}


def _planned_env(recipe: Recipe, topo: Topology, host: HostFacts) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1"}
    if topo.device == "cpu":
        # Tell DeepSpeed rather than let it probe (and warn about) every accelerator.
        env["DS_ACCELERATOR"] = "cpu"
        # Its CPU accelerator counts a node's devices, its ranks, from LOCAL_SIZE, which its
        # own launcher sets; without it each count runs `numactl --hardware` in a child
        # process, and ZeRO-3 counts at every step.
        env["LOCAL_SIZE"] = str(topo.procs_per_node)
        # glibc's malloc hands a CPU step's big temporaries (DeepSpeed's 954 MiB gradient
        # bucket, activations) back to the kernel when they are freed, and faults their
        # pages in again the next step. These keep them in the heap, as PyTorch's own CPU
        # launcher (torch.backends.xeon.run_cpu) does with jemalloc: 0.878 -> 0.946 of a
        # hand-written DeepSpeed loop's samples/s at ZeRO-2 (docs/benchmarks.md). Other
        # allocators ignore them.
        env["MALLOC_MMAP_THRESHOLD_"] = env["MALLOC_TRIM_THRESHOLD_"] = str(1 << 30)
        # One intra-op thread pool per worker, sized so the workers of a node share its
        # cores instead of oversubscribing them. A Slurm node's cores are the ones the
        # job asked for, not the login node's.
        if topo.backend == "ray":  # a rank gets the CPUs Ray reserves for it
            env["OMP_NUM_THREADS"] = str(max(1, int(recipe.cluster.ray.cpus_per_worker)))
            return env
        if topo.backend == "slurm":
            cpus, sharing = recipe.cluster.slurm.cpus_per_task, topo.procs_per_node
        else:  # the local backend's nodes are all this host: every rank shares its cores
            cpus, sharing = host.cpus, topo.world_size
        if cpus:
            env["OMP_NUM_THREADS"] = str(max(1, cpus // sharing))
    return env


def build_plan(recipe: Recipe, *, host: HostFacts, data: DataFacts | None, run_dir: str,
               backend: str | None = None, nodes: int | None = None,
               procs_per_node: int | None = None, script: str | None = None,
               script_args: list[str] = (), model: ModelFacts | None = None,
               target_params: int | None = None, user_env: Mapping[str, str] | None = None) -> LaunchPlan:
    """The plan for ``recipe`` on ``host``; ``data`` is None only for ``--script`` jobs,
    ``model`` None unless the recipe is one of transfer learning. ``target_params``: a
    ``model.target`` model's parameters, counted by the caller (the planner imports no
    torch); without it, such a plan has no memory estimate. ``user_env``: the
    environment of the command, whose thread and allocator settings (TUNABLE_ENV) the
    ranks keep."""
    topo = _topology(recipe, host, backend, nodes, procs_per_node)
    if topo.backend == "ray" and recipe.train.max_restarts:
        # Not built: a lost Ray node takes actors and a bundle of the placement group with
        # it, so a restart there means a new reservation, not a loop around the ranks.
        raise UsageError("the Ray backend does not restart jobs; set 0, or run on the local or Slurm "
                         "backend", key="train.max_restarts")
    training = None
    if script is None:
        if data is None:
            raise ValueError("a built-in training job needs DataFacts")
        if uses_transfer(recipe) and model is None:
            raise ValueError("a transfer-learning job needs ModelFacts")
        _check_model(recipe, data)
        _check_alerts(recipe)
        batch = _batch(recipe, topo.world_size)
        lr = _learning_rate(recipe, batch.global_)
        steps = _steps(recipe, data, batch.global_, topo.world_size)
        _check_unfreeze(recipe, steps)
        engine = _engine(recipe, topo, batch, lr.scaled)
        training = TrainingPlan(data=data, batch=batch, lr=lr, steps=steps, engine=engine, model=model,
                                memory=_memory(recipe, data, topo, engine, model, target_params))
    return LaunchPlan(
        name=recipe.name, run_dir=run_dir, recipe=recipe, topology=topo,
        env=_env(recipe, topo, host, user_env or {}), training=training,
        script=ScriptPlan(path=script, args=list(script_args)) if script is not None else None,
    )


def _validation(data: DataConfig) -> str:
    if data.validation in ("holdout", "stratified"):
        return data.validation
    return f"{data.validation}, fold {data.fold} of 0..{data.folds - 1}"


def _model_rows(plan: LaunchPlan) -> list[tuple[str, str]]:
    cfg, facts = plan.recipe.model, plan.training.model
    model = cfg.target or cfg.name
    if facts is None:
        return [("model", model)]
    if facts.params is not None:
        model += (f", {facts.params:,} parameters: {facts.params - facts.frozen:,} trainable, "
                  f"{facts.frozen:,} frozen")
        if facts.unfrozen_later:
            model += f" ({facts.unfrozen_later:,} of them unfrozen later)"
    rows = [("model", model)]
    if facts.init is not None:
        rows.append(("initial weights", f"{facts.init.path} ({facts.init.format})" + (
            f", except {', '.join(cfg.init_exclude)}" if cfg.init_exclude else "")))
    return rows


def _memory_rows(plan: LaunchPlan) -> list[tuple[str, str]]:
    train, topo = plan.training, plan.topology
    if train.memory is None:
        return [("memory", "not estimated: the model's parameters could not be counted")]
    e, ranks = train.engine, f"over {topo.world_size} rank{'s' if topo.world_size > 1 else ''}"
    if e.name == "deepspeed":
        sharding = f"ZeRO-{e.zero_stage} {ranks}"
    elif plan.recipe.engine.strategy == "fsdp":
        sharding = f"FSDP {e.accelerate['fsdp']['sharding_strategy']} {ranks}"
    else:
        sharding = f"DDP {ranks}"
    first, *more = format_memory(train.memory, device=topo.device, sharding=sharding)
    return [("memory", first), *(("", line) for line in more)]


def checkpoint_size(plan: LaunchPlan) -> int | None:
    """About how many bytes one of the run's checkpoints takes; None for a --script, or
    a model whose parameters could not be counted."""
    train = plan.training
    if train is None or train.memory is None:
        return None
    return checkpoint_bytes(train.memory, engine=train.engine.name, zero_stage=train.engine.zero_stage)


def weights_size(plan: LaunchPlan) -> int | None:
    """About how many bytes the run's final weights take, and each of its snapshots; None
    where ``checkpoint_size`` is."""
    train = plan.training
    if train is None or train.memory is None:
        return None
    return weights_bytes(train.memory)


def _disk_rows(plan: LaunchPlan) -> list[tuple[str, str]]:
    size, weights = checkpoint_size(plan), weights_size(plan)
    if size is None or weights is None:
        return []
    keep, snapshots = plan.recipe.train.keep_last, len(plan.training.steps.snapshots)
    return [("checkpoints", f"≈ {amount(size)} each; up to {keep + 1} on disk, {amount(size * (keep + 1))} "
                            f"(train.keep_last {keep}, and the one being written)"),
            ("weights", f"≈ {amount(weights)} (model.pt)"
                        + (f", and {snapshots} snapshots of that size" if snapshots else ""))]


def format_plan(plan: LaunchPlan) -> str:
    """The human table `dlaunch plan` prints."""
    topo = plan.topology
    rows: list[tuple[str, str]] = [
        ("run dir", plan.run_dir),
        ("topology", f"{topo.nodes} node(s) x {topo.procs_per_node} proc(s) = world size "
                     f"{topo.world_size}, {topo.device}, {topo.dist_backend}, {topo.backend}"),
    ]
    if plan.script is not None:
        rows.append(("script", " ".join([plan.script.path, *plan.script.args])))
    restarts = plan.recipe.train.max_restarts
    rows.append(("restarts", f"up to {restarts} after a failure, each from the latest checkpoint" if restarts
                 else "none: the first failure ends the run"))
    train = plan.training
    if train is not None:
        b, lr, s, e, d = train.batch, train.lr, train.steps, train.engine, train.data
        recipe = plan.recipe
        rows += [
            *_model_rows(plan),
            ("data", f"{recipe.data.source}: {d.num_train} train / {d.num_val} val / {d.num_test} test "
                     f"rows ({_validation(recipe.data)}), input {list(d.input_shape)}, {d.num_classes} classes"
                     + (f", streamed by rank from {len(d.row_groups)} row groups" if d.row_groups else "")),
            ("batch", f"micro {b.micro} x {topo.world_size} ranks x accum {b.grad_accum} = global {b.global_}"),
            ("learning rate", f"{lr.scaled:.6g}" + (
                f" ({lr.rule} scaling of {lr.base:g} from batch {lr.reference_batch})"
                if lr.rule != "none" else "")),
            ("schedule", f"{recipe.schedule.name}, {s.warmup} warmup steps" + (
                f", snapshots after steps {', '.join(map(str, s.snapshots))}" if s.snapshots else "")),
            ("steps", f"{s.total} ({s.per_epoch} per epoch), eval every {s.eval_every}, "
                      f"checkpoint every {s.checkpoint_every}"),
            ("engine", f"{e.name}, ZeRO stage {e.zero_stage}, {e.precision}"
                       + (f", {recipe.engine.strategy}" if e.name == "accelerate" else "")),
            *_memory_rows(plan),
            *_disk_rows(plan),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
