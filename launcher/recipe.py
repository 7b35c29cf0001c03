"""The recipe: one YAML file, validated up front into a strict, typed schema.

One small model per concern, each field documented once, right under it (the docstring
becomes the field's description: ``dlaunch explain KEY`` prints it). Defaults follow
best practice: AdamW, warmup then cosine, gradient clipping at 1.0, bf16.

``load_recipe`` turns a file plus ``--set`` overrides into a ``Recipe`` or raises a
``UsageError`` that names the key path and the YAML line.
"""

from __future__ import annotations

import difflib
import math
import typing
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from launcher.credentials import names_credential
from launcher.errors import UsageError
from launcher.yamlio import KeyPath, SourceMap, apply_override, load_yaml, parse_override

# Values that reach `#SBATCH` lines and comments: sbatch reads those lines without a shell, so only
# a line break could smuggle a command into the script.
_ONE_LINE = r"^[^\n\r\x00]*$"


class Section(BaseModel):
    # strict: "8" is not an int and "yes" is not a bool; extra="forbid": a typo is an
    # error with a did-you-mean, not a silently ignored key.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True,
                              use_attribute_docstrings=True)


class UnfreezeConfig(Section):
    at_step: int = Field(gt=0)
    """Optimizer step from which the parameters train; the steps before it leave them
    exactly as they are."""
    patterns: list[str] = Field(min_length=1)
    """Parameters `model.freeze` froze that train from `at_step` on (fnmatch patterns over
    parameter names; `*` unfreezes every frozen one)."""


class ModelConfig(Section):
    name: Literal["mlp", "cnn", "gpt"] = "mlp"
    """Built-in model: mlp, cnn (a small ResNet-style CNN) or gpt (a tiny GPT)."""
    target: str | None = None
    """Any other model, by import path `package.module:factory` (importable from the
    working directory); the factory is called with `kwargs` and returns an nn.Module.
    When set, `name` is not used."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the model factory (built-in or `target`)."""
    init_from: str | None = None
    """Initial weights for transfer learning: a finished dlaunch run directory (its
    model.pt), one of its checkpoints (RUN_DIR/checkpoints/step-N, DeepSpeed or
    Accelerate), a torch state-dict file (.pt, .pth, .bin) or a .safetensors file.
    Loaded into the new model before the engine wraps it; a resumed run continues from
    its own checkpoint instead."""
    init_exclude: list[str] = Field(default_factory=list)
    """Weights not taken from `init_from` (fnmatch patterns over parameter and buffer
    names, such as `[head.*]` for a new head): they keep the new model's initialisation.
    Every other weight must be in `init_from`, with the model's shape."""
    freeze: list[str] = Field(default_factory=list)
    """Parameters that do not train (fnmatch patterns over parameter names, such as
    `[stem.*, blocks.*]`): no gradient, no optimizer state; a BatchNorm layer whose
    parameters are all frozen keeps its running statistics too (eval mode)."""
    unfreeze: list[UnfreezeConfig] = Field(default_factory=list)
    """Gradual unfreezing (ULMFiT): frozen parameters that start training at a later
    step, such as `[{at_step: 100, patterns: [blocks.1.*]}, {at_step: 200, patterns:
    ['*']}]`. Each starts with fresh optimizer state and the LR scheduled for that step;
    not with FSDP."""


class AugmentConfig(Section):
    """Training-time augmentation; evaluation never sees it. Crops, flips and colour
    jitter apply to images (source: images); mixup, cutmix and label smoothing to any
    classification data (cutmix to image-shaped rows)."""

    random_crop: bool = True
    """Random resized crop of each training image (else the whole image, resized)."""
    crop_scale: list[float] = Field(default_factory=lambda: [0.08, 1.0], min_length=2, max_length=2)
    """Range of the crop's share of the image area (torchvision's default)."""
    crop_ratio: list[float] = Field(default_factory=lambda: [0.75, 4 / 3], min_length=2, max_length=2)
    """Range of the crop's aspect ratio, drawn log-uniformly."""
    flip: bool = True
    """Horizontal flip with probability 0.5."""
    color_jitter: float = Field(default=0.0, ge=0, lt=1)
    """Brightness, contrast and saturation factors drawn from [1 - j, 1 + j]."""
    mixup_alpha: float = Field(default=0.0, ge=0)
    """Mixup: each batch blended with itself reversed, weights ~ Beta(a, a), the labels
    blended alike; 0 is off."""
    cutmix_alpha: float = Field(default=0.0, ge=0)
    """CutMix: a box of the reversed batch pasted in, of area share ~ Beta(a, a), the
    labels mixed by area; 0 is off. With mixup also on, each batch takes one of the two."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    """Share of each target's probability spread evenly over all classes."""


class DaliConfig(Section):
    num_threads: int = Field(default=2, gt=0)
    """CPU threads of each rank's DALI pipeline."""
    prefetch_queue_depth: int = Field(default=2, gt=0)
    """Batches the pipeline prepares ahead of the one being trained on."""


class DataConfig(Section):
    source: Literal["digits", "synthetic", "parquet", "images"] = "digits"
    """digits (scikit-learn's 8x8 handwritten digits, 1797 real images), synthetic
    (generated tensors), parquet (files read with pyarrow), or images (a folder of class
    folders of JPEG/PNG files, decoded as they are read)."""
    kind: Literal["classification", "tokens"] = "classification"
    """classification: (features, label) rows. tokens: sequences for next-token
    prediction (the gpt model)."""
    path: str | None = None
    """Parquet file or directory of .parquet files (source: parquet); the folder of
    class folders (source: images)."""
    feature_columns: list[str] | None = None
    """Parquet columns holding the features; default: every column but the label and
    the time column."""
    label_column: str = "label"
    """Parquet column holding the class label (kind: classification)."""
    image_column: str = "image"
    """Parquet column of encoded JPEG/PNG files, as `dlaunch data prepare` writes for an
    image folder: when the files have it, each row is an image (with its label), decoded
    and augmented as an image folder's."""
    tokens_column: str = "tokens"
    """Parquet column holding a list of token ids per row (kind: tokens)."""
    shape: list[int] | None = None
    """Reshape each feature row to this shape, e.g. [1, 8, 8] for a CNN."""
    samples: int = Field(default=2048, gt=0)
    """Number of rows to generate (source: synthetic)."""
    num_features: int = Field(default=32, gt=0)
    """Features per row (source: synthetic, kind: classification)."""
    num_classes: int = Field(default=4, gt=1)
    """Classes (source: synthetic, kind: classification)."""
    classes: list[int] | None = Field(default=None, min_length=2)
    """Keep only the rows of these classes, such as [5, 6, 7, 8, 9], relabelled 0..k-1 in
    the listed order: the model has k classes. Unset, every row. Classification data read
    whole (not streamed)."""
    seq_len: int = Field(default=32, gt=1)
    """Tokens per sequence (source: synthetic, kind: tokens)."""
    vocab_size: int = Field(default=64, gt=1)
    """Vocabulary size (source: synthetic, kind: tokens)."""
    validation: Literal["holdout", "stratified", "kfold", "stratified_kfold", "walk_forward"] = "holdout"
    """How rows are split for validation: holdout (a seeded random `val_fraction` of
    them), stratified (the same, keeping every class's share), kfold and
    stratified_kfold (`folds` seeded folds, `fold` validates), or walk_forward
    (time-ordered: fold f validates on its window and trains on every row before it)."""
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    """Share of rows held out for validation (holdout, stratified); never trained on."""
    folds: int = Field(default=5, ge=2)
    """Folds of kfold and stratified_kfold; validation windows of walk_forward."""
    fold: int = Field(default=0, ge=0)
    """The fold this run validates on, 0..folds-1; for walk_forward, 0 is the earliest
    window (the least training data) and folds-1 the latest."""
    gap: int = Field(default=0, ge=0)
    """Rows left out between each walk_forward training window and its validation
    window, so that features that look back in time (lags, rolling means) do not carry
    validation rows into training."""
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Share of rows set aside before any other split, never trained or validated on:
    the test split; for walk_forward, the latest rows."""
    time_column: str | None = None
    """Parquet column giving walk_forward its time order (rows are sorted by it); unset,
    the row order is the time order."""
    split_seed: int = 0
    """Seed of the train/validation/test split, independent of the training seed so that
    runs with different seeds are evaluated on the same rows."""
    normalize: bool = True
    """Standardise features with mean and std computed on the training split only (for
    images: per channel, unless `mean` and `std` are given)."""
    mean: list[float] | None = None
    """Per-channel mean of the images (an image folder or a Parquet image column), e.g.
    ImageNet's [0.485, 0.456, 0.406]; unset, it is measured on the training split."""
    std: list[float] | None = None
    """Per-channel standard deviation to go with `mean`."""
    image_size: int = Field(default=32, gt=0)
    """Side of the square images the model sees (an image folder or a Parquet image
    column): training crops and evaluation centre crops are resized to it."""
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """Training-time augmentation."""
    streaming: bool = False
    """Parquet too large for a rank's memory: each rank reads only its own row groups
    (dealt round-robin, as `dlaunch data prepare` writes them), one at a time, with the
    columns it needs; an epoch shuffles the rank's row groups and the rows within each.
    Feature and token rows; holdout, kfold or row-ordered walk_forward splits."""
    loader: Literal["torch", "dali"] = "torch"
    """Who reads, decodes and augments batches: torch (a DataLoader) or dali (an NVIDIA
    DALI pipeline: GPU operators when the rank has a GPU, CPU operators when not)."""
    num_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes per rank (loader: torch)."""
    pin_memory: bool | None = None
    """Page-locked batches for faster copies to the GPU; unset, on when training on GPUs."""
    prefetch_factor: int | None = Field(default=None, gt=0)
    """Batches each DataLoader worker loads ahead (torch's default 2); needs num_workers."""
    persistent_workers: bool = True
    """Keep DataLoader workers alive from one epoch to the next (with num_workers)."""
    dali: DaliConfig = Field(default_factory=DaliConfig)
    """DALI pipeline settings (loader: dali)."""


class OptimConfig(Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate, for `reference_batch` samples per step when that is set."""
    weight_decay: float = Field(default=0.01, ge=0)
    """Decoupled weight decay; not applied to biases and normalisation weights."""
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    """Adam betas."""
    eps: float = Field(default=1e-8, gt=0)
    """Adam epsilon."""
    momentum: float = Field(default=0.9, ge=0)
    """SGD momentum (Nesterov)."""
    reference_batch: int | None = Field(default=None, gt=0)
    """The global batch `lr` was tuned for. When set, the LR is scaled to the actual
    global batch by `scaling`; when unset, `lr` is used as is."""
    scaling: Literal["auto", "linear", "sqrt", "none"] = "auto"
    """LR scaling rule for large batches: linear (Goyal et al., for SGD), sqrt (for
    Adam-family optimizers), auto picks by optimizer."""
    lr_multipliers: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    """Discriminative learning rates, such as `{stem.*: 0.1, blocks.*: 0.3}`: a
    parameter's LR is the scheduled LR times the multiplier of the first pattern (fnmatch,
    over parameter names) it matches; 1 when none does."""


class ScheduleConfig(Section):
    name: Literal["cosine", "cosine_restarts", "linear", "constant", "plateau"] = "cosine"
    """LR schedule after warmup: cosine decay, cosine with warm restarts (SGDR), linear
    decay, constant, or reduce-on-plateau of `train.monitor`."""
    warmup_steps: int | None = Field(default=None, ge=0)
    """Linear warmup from 0 to the peak LR; default: `warmup_fraction` of the run."""
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    """Warmup length as a share of all optimizer steps, when `warmup_steps` is unset."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Floor of the decay, as a share of the peak LR. With `snapshots`, set 0 (as Huang
    et al.): each snapshot is then taken where the LR has annealed to nothing."""
    restart_period: int | None = Field(default=None, gt=0)
    """Steps in the first cycle (cosine_restarts); default: a quarter of the run."""
    restart_mult: int = Field(default=1, ge=1)
    """Each cycle is this many times longer than the one before (cosine_restarts)."""
    snapshots: bool = False
    """Snapshot ensemble (cosine_restarts): save the float32 weights at the end of every
    cycle (its last step, at the lowest LR) and at the run's last step to
    RUN_DIR/snapshots/, each evaluated, indexed in snapshots/snapshots.json; `dlaunch eval
    --ensemble RUN_DIR` scores them alone and averaged."""
    plateau_factor: float = Field(default=0.5, gt=0, lt=1)
    """Multiply the LR by this when the monitored metric stops improving (plateau)."""
    plateau_patience: int = Field(default=2, ge=0)
    """Evaluations without improvement before the LR is reduced (plateau)."""


class PrecisionConfig(Section):
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision. fp16 uses a loss scaler; bf16 needs none."""
    loss_scale: float = Field(default=0.0, ge=0)
    """fp16 only: 0 for dynamic loss scaling, otherwise a static scale (DeepSpeed only)."""
    initial_scale_power: int = Field(default=16, ge=0, le=32)
    """fp16 dynamic scaling starts at 2**initial_scale_power."""
    loss_scale_window: int = Field(default=1000, gt=0)
    """fp16: steps without overflow before the scale is raised."""


class EngineConfig(Section):
    name: Literal["deepspeed", "accelerate"] = "deepspeed"
    """Training engine."""
    zero_stage: int | None = Field(default=None, ge=0, le=3)
    """ZeRO stage 0-3. Default: 2 with deepspeed, 0 (plain DDP) with accelerate; with
    accelerate, stages 2 and 3 need strategy fsdp."""
    offload_optimizer: bool = False
    """deepspeed: keep optimizer states in CPU memory (ZeRO 1-3)."""
    offload_params: bool = False
    """deepspeed: keep parameters in CPU memory (ZeRO 3 only)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """accelerate: data parallel (ddp) or fully sharded (fsdp)."""
    deepspeed_config: dict[str, Any] = Field(default_factory=dict)
    """Extra DeepSpeed config entries, merged over the generated config. Not those
    dlaunch writes from typed keys (batch sizes, clipping, precision, the ZeRO stage, the
    optimizer's values); an offload section refines the offload switch it needs on."""


class EarlyStoppingConfig(Section):
    patience: int | None = Field(default=5, ge=1)
    """Stop after this many evaluations without improvement of `train.monitor`; null
    turns early stopping off."""
    min_delta: float = Field(default=0.0, ge=0)
    """Smallest change that counts as an improvement."""


class TrainConfig(Section):
    micro_batch_size: int = Field(default=32, gt=0)
    """Samples per rank per forward pass."""
    global_batch_size: int | None = Field(default=None, gt=0)
    """Samples per optimizer step across all ranks; gradient accumulation makes up the
    difference. Default: micro_batch_size x world size x grad_accum."""
    grad_accum: int | None = Field(default=None, gt=0)
    """Micro-batches per optimizer step; derived from global_batch_size when unset."""
    epochs: float | None = Field(default=1.0, gt=0)
    """Passes over the training split (used when max_steps is unset)."""
    max_steps: int | None = Field(default=None, gt=0)
    """Optimizer steps to train; overrides epochs."""
    clip_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this; null turns clipping off."""
    eval_every: int | None = Field(default=None, gt=0)
    """Evaluate every N optimizer steps; default: once per epoch."""
    checkpoint_every: int | None = Field(default=None, gt=0)
    """Checkpoint every N optimizer steps; default: at every evaluation."""
    keep_last: int = Field(default=3, ge=1)
    """Checkpoints to keep; older ones are deleted once a newer one is complete (the
    newest one that verifies is never deleted)."""
    max_restarts: int = Field(default=0, ge=0)
    """Times the job restarts after a rank or a node agent dies (killed, out of memory,
    an exception, a hang), each time resuming from the latest good checkpoint; as
    torchrun's --max-restarts, for the whole job. 0: the first failure ends the run."""
    hang_timeout: int = Field(default=600, gt=0)
    """Seconds a rank may spend in one phase (loading a batch, the step and its
    collectives, an evaluation, a checkpoint, the final gather and save) before the run
    is declared hung and ends, naming the ranks that did not arrive and where they are
    (a restart follows, if train.max_restarts allows); far sooner than NCCL's watchdog.
    Keep it above the longest evaluation or checkpoint write. The process group's own
    timeout is set 60 s above it and train.start_timeout. The built-in trainer's only:
    a --script has no watchdog."""
    start_timeout: int | None = Field(default=None, gt=0)
    """As train.hang_timeout, for the start: joining the process group, the engine's
    set-up (ZeRO-3 partitioning, compilation), a resume. It often takes longer than any
    step (as torchtitan's init_timeout_seconds). Default: train.hang_timeout."""
    monitor: str = "val_loss"
    """Metric that early stopping, reduce-on-plateau and `best` follow: val_loss or
    val_acc."""
    monitor_mode: Literal["auto", "min", "max"] = "auto"
    """Whether `monitor` should go down or up; auto: up for accuracies."""
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    """Early stopping on `monitor`."""
    seed: int = 1234
    """Seed for every RNG (python, numpy, torch) and the data order; each rank offsets
    it by its rank for dropout and augmentation."""


Policy = Literal["warn", "skip", "stop"]


class ExplodingGradConfig(Section):
    threshold: float = Field(default=100.0, gt=0)
    """Global gradient norm (before clipping) above which a step's gradients exploded."""
    policy: Policy = "warn"
    """warn (alerts.jsonl and the log), skip (the step is not applied; engine
    accelerate), or stop (the run ends with the alert, before the next checkpoint)."""


class VanishingGradConfig(Section):
    threshold: float = Field(default=1e-7, ge=0)
    """A top-level module whose gradient norm stays below this has stopped learning."""
    checks: int = Field(default=5, gt=0)
    """Consecutive logged steps below the threshold before the alert."""
    policy: Literal["warn", "stop"] = "warn"
    """warn, or stop the run."""


class LossSpikeConfig(Section):
    factor: float = Field(default=3.0, gt=1)
    """A step's loss above factor x the median of the last `window` steps is a spike."""
    window: int = Field(default=20, gt=1)
    """Steps the median is taken over (no alert before that many)."""
    policy: Literal["warn", "stop"] = "warn"
    """warn, or stop the run."""


class NonFiniteConfig(Section):
    policy: Literal["skip", "stop"] = "stop"
    """A NaN or Inf loss or gradient on any rank: stop the run (its checkpoints are all
    from before the bad step), or skip the step (no update is applied) and go on."""


class AlertsConfig(Section):
    """Training-health alerts, checked every step, each written to RUN_DIR/alerts.jsonl
    and the log and handled by its policy."""

    exploding_grad: ExplodingGradConfig = Field(default_factory=ExplodingGradConfig)
    vanishing_grad: VanishingGradConfig = Field(default_factory=VanishingGradConfig)
    loss_spike: LossSpikeConfig = Field(default_factory=LossSpikeConfig)
    nonfinite: NonFiniteConfig = Field(default_factory=NonFiniteConfig)


class MlflowConfig(Section):
    """Log every run to MLflow (the `mlflow` extra): one MLflow run per run directory, the
    recipe as parameters and as the artifact recipe.yaml, every metric, the summary."""

    enabled: bool = False
    """Log the run to MLflow."""
    tracking_uri: str | None = Field(default=None, pattern=_ONE_LINE)
    """Tracking server or store as MLflow spells it (`http://host:5000`,
    `sqlite:///path/mlflow.db`, `databricks`). Unset: MLFLOW_TRACKING_URI where rank 0
    runs, else a SQLite store `<run_root>/mlruns/mlflow.db`. Credentials go in MLflow's
    own variables (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN), never here."""
    experiment: str | None = Field(default=None, min_length=1, pattern=_ONE_LINE)
    """Experiment name, created if missing; default: the recipe's name."""


class WandbConfig(Section):
    """Log every run to Weights & Biases (the `wandb` extra): the recipe as the run's
    config and file, every metric, the summary."""

    enabled: bool = False
    """Log the run to W&B, in RUN_DIR/wandb."""
    project: str | None = Field(default=None, min_length=1, pattern=_ONE_LINE)
    """W&B project; default: the recipe's name."""
    mode: Literal["offline", "online"] = "offline"
    """offline: written to RUN_DIR/wandb only (`wandb sync` uploads it later); online:
    streamed to W&B as well (after `wandb login`, or with WANDB_API_KEY set)."""


class ProfileConfig(Section):
    """A window of steps under torch.profiler; each rank writes RUN_DIR/profile/rank-N.trace.json
    (a Chrome trace) and rank-N.txt (the operators that took the most time). The profiler
    slows the steps it records: the throughput logged over them counts its cost too."""

    start_step: int = Field(default=10, gt=0)
    """The first optimizer step profiled; past the first few, which warm up allocators
    and kernels."""
    steps: int = Field(default=5, gt=0, le=100)
    """Steps profiled. A trace grows with every kernel recorded: keep it a few steps."""


class LoggingConfig(Section):
    run_root: str = Field(default="runs", pattern=_ONE_LINE)
    """Directory under which run directories `<name>-<stamp>` are created."""
    log_every: int = Field(default=10, gt=0)
    """Write training metrics every N optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard event files to RUN_DIR/tb: every metric, the recipe as text and
    as hyperparameters (the HParams dashboard)."""
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """MLflow tracking."""
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    """Weights & Biases tracking."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    report: bool = True
    """Write RUN_DIR/report/ when the run ends: PNG plots of loss, evaluation, LR, gradient
    and weight norms and throughput, and summary.md (as `dlaunch report`)."""
    module_grad_norms: bool = True
    """Log the gradient norm of each top-level module at every logged step (and watch
    them for vanishing gradients)."""
    weight_norms: bool = True
    """Log the norm of the model's weights (`weight_norm`) and of each top-level module's
    (`weight_norm/<module>`) at every logged step. Under ZeRO-3 and FSDP each rank sums
    the squares of its own shards and the sums are all-reduced: no parameter is gathered."""
    activation_stats: bool = False
    """At every logged step, record the mean, standard deviation and share of exact zeros
    (dead ReLUs) of each top-level module's output over the step's first micro-batch,
    averaged over ranks: `act_mean/<module>`, `act_std/<module>`, `act_zero/<module>`.
    The forward hooks exist only during logged steps."""
    peak_tflops: float | None = Field(default=None, gt=0)
    """Peak dense TFLOP/s of one device in the run's precision, for model FLOPs
    utilisation (MFU); unset, known GPUs' bf16/fp16 peaks are used and CPUs report none."""
    profile: ProfileConfig | None = None
    """Profile a few training steps (`profile: {}` for steps 10-14); off when unset."""


class ContainerConfig(Section):
    image: str = Field(pattern=_ONE_LINE)
    """Image the agents run in: a pyxis/enroot image (`registry#image:tag`, a .sqsh
    file) or an apptainer .sif file / `docker://` URI."""
    runtime: Literal["pyxis", "apptainer"] = "pyxis"
    """pyxis: `srun --container-image`; apptainer: `apptainer exec --nv`."""
    mounts: list[str] = Field(default_factory=list)
    """Extra bind mounts `SRC:DST`; the run directory and the working directory are
    always mounted."""


class SlurmConfig(Section):
    job_name: str | None = Field(default=None, pattern=_ONE_LINE)
    """Slurm job name; default: the recipe name."""
    partition: str | None = Field(default=None, pattern=_ONE_LINE)
    """`--partition`."""
    account: str | None = Field(default=None, pattern=_ONE_LINE)
    """`--account`."""
    qos: str | None = Field(default=None, pattern=_ONE_LINE)
    """`--qos`."""
    time: str = Field(default="01:00:00", pattern=r"^[0-9:-]+$")
    """`--time` limit, in Slurm's formats (MM, HH:MM:SS, D-HH:MM:SS)."""
    gpus_per_node: int | None = Field(default=None, ge=0)
    """`--gpus-per-node`. When set above 0, `cluster.device: auto` means cuda; with
    device cuda it defaults to procs_per_node."""
    cpus_per_task: int | None = Field(default=None, gt=0)
    """`--cpus-per-task`: cores for a node's agent and all its workers."""
    mem: str | None = Field(default=None, pattern=r"^[0-9]+[KMGT]?$")
    """`--mem` per node, e.g. 64G."""
    constraint: str | None = Field(default=None, pattern=_ONE_LINE)
    """`--constraint`."""
    exclusive: bool = False
    """`--exclusive`: whole nodes."""
    signal: Literal["USR2", "USR1", "TERM"] = "USR2"
    """Signal Slurm sends before the time limit (and that preemption uses). USR2, as
    submitit: NCCL installs its own SIGUSR1 handler. Only this signal requeues the job:
    TERM makes every SIGTERM requeue it, a cancel's (scancel) too."""
    signal_grace: int = Field(default=120, gt=0)
    """Seconds before the time limit at which the signal is sent: time for a checkpoint."""
    requeue: bool = True
    """`--requeue`: a preempted or signalled job goes back to the queue and resumes."""
    extra_sbatch: list[str] = Field(default_factory=list)
    """More sbatch options, one per entry, e.g. `--mail-type=END`."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables exported in the job (values are shell-quoted). Not credentials
    (WANDB_API_KEY, HF_TOKEN, ...: a name with KEY, TOKEN, SECRET or PASSWORD as a word),
    which would be written to the run dir and the script: export those in the shell that
    runs dlaunch, whose environment sbatch passes on."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines run before the agents start, as written (`module load cuda`,
    `source /path/venv/bin/activate`)."""
    container: ContainerConfig | None = None
    """Run the agents in a container."""
    python: str | None = Field(default=None, pattern=_ONE_LINE)
    """Python on the compute nodes; default: the one running dlaunch (`python`
    inside a container)."""


class RayConfig(Section):
    address: str | None = Field(default=None, pattern=_ONE_LINE)
    """`HOST:PORT` of a running Ray cluster's head (`ray start --head` prints it);
    `--address` overrides, and so does RAY_ADDRESS, as for any Ray driver. Unset: a
    Ray instance on this host starts and stops with the command."""
    storage: str | None = Field(default=None, pattern=_ONE_LINE)
    """Directory every Ray node can reach (NFS, Lustre): run directories, checkpoints
    and sweeps go here. Default: `logging.run_root`, which is enough on one host."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs Ray reserves for each rank."""
    gpus_per_worker: float | None = Field(default=None, ge=0)
    """GPUs Ray reserves for each rank; default: 1 when the job runs on cuda, else 0.
    Above 0, `cluster.device: auto` means cuda."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources reserved for each rank, e.g. `{accelerator_type:H100: 0.01}`."""
    start_timeout: int = Field(default=300, gt=0)
    """Seconds to wait for the cluster to grant the job's resources before giving up."""


class ClusterConfig(Section):
    backend: Literal["local", "slurm", "ray"] = "local"
    """Where the job runs: local (N emulated nodes on this host), slurm (an sbatch
    job) or ray (workers on a Ray cluster); `--cluster` overrides."""
    nodes: int = Field(default=1, gt=0)
    """Nodes; `--nodes` overrides."""
    procs_per_node: int = Field(default=1, gt=0)
    """Worker processes per node (one per GPU); `--procs-per-node` overrides."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when this host has an NVIDIA GPU, cpu otherwise."""
    rdzv_timeout: int = Field(default=300, gt=0)
    """Seconds the node agents wait for each other at rendezvous."""
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    """The sbatch job (backend: slurm)."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """The Ray job (backend: ray, and the trials of a sweep)."""


class SweepSchedulerConfig(Section):
    name: Literal["fifo", "asha", "pbt"] = "asha"
    """fifo runs every trial to the end; asha (async successive halving) stops the
    worse trials at each rung; pbt (population based training) copies the better
    trials' checkpoints into the worse ones and perturbs their hyperparameters."""
    grace_period: int = Field(default=1, gt=0)
    """asha: evaluations a trial always gets before it may be stopped."""
    reduction_factor: float = Field(default=2.0, gt=1)
    """asha: keep the best 1/reduction_factor of trials at each rung."""
    perturbation_interval: int = Field(default=2, gt=0)
    """pbt: evaluations between two exploit/explore decisions."""
    synch: bool = False
    """pbt: decide only when every trial has reached the same evaluation (Tune's
    synchronous PBT), so each decision ranks the whole population. Asynchronous PBT
    (the default) decides as each trial arrives, against the others' last results, and
    skips a clone when the better trial was not checkpointed at its own last decision;
    synchronous PBT pauses, and so restarts, every trial at each decision."""


class SweepConfig(Section):
    space: dict[str, dict[str, Any]]
    """The search space: one distribution per recipe key path, e.g.
    `optim.lr: {loguniform: [1e-4, 1e-1]}`. Distributions: `choice: [values]`,
    `grid: [values]` (every value, each num_samples times), `uniform: [low, high]`,
    `loguniform: [low, high]`, `randint: [low, high]` (high excluded, as tune.randint)."""
    metric: str = "val_loss"
    """Eval metric the search optimises: val_loss or val_acc (what the trainer reports
    at every evaluation)."""
    mode: Literal["auto", "min", "max"] = "auto"
    """Whether `metric` should go down or up; auto: up for accuracies."""
    num_samples: int = Field(default=8, gt=0)
    """Trials to sample (with grid values: repeats of the whole grid)."""
    max_concurrent: int | None = Field(default=None, gt=0)
    """Trials running at once; default: as many as the cluster's resources allow."""
    search: Literal["random", "grid", "optuna"] = "random"
    """random sampling, grid (choice and grid values only, every combination), or
    optuna (Optuna's TPE; needs `pip install optuna`)."""
    seed: int = 0
    """Seed of the search: the same seed samples the same trials."""
    scheduler: SweepSchedulerConfig = Field(default_factory=SweepSchedulerConfig)
    """Early stopping of trials (a Ray Tune trial scheduler)."""


class Recipe(Section):
    name: str = Field(default="run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name; the run directory is RUN_ROOT/<name>-<stamp>."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    sweep: SweepConfig | None = None
    """Hyperparameter sweep for `dlaunch sweep` (Ray Tune); `dlaunch run` ignores it."""


def _section_fields(loc: KeyPath) -> list[str]:
    """Names of the fields that are valid at ``loc`` (for did-you-mean)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections (model.unfreeze)
            continue
        field = model.model_fields.get(str(part))
        section = _section_type(getattr(field, "annotation", None))
        if section is None:
            return []
        model = section
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    kind, loc = error["type"], error["loc"]
    if kind == "extra_forbidden":
        known = _section_fields(loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else f"; known keys: {', '.join(known)}"
        return f"unknown key{hint}"
    message = error["msg"]
    if kind == "string_pattern_mismatch" and error["ctx"]["pattern"] == _ONE_LINE:
        return "must be a single line"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"got {error['input']!r}; expected one of {expected}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{message[0].lower()}{message[1:]}, got {error['input']!r}"
    return message[0].lower() + message[1:]


def _check_values(value: Any, loc: KeyPath, source: SourceMap) -> None:
    """Every value, in typed fields and free-form ones (model.kwargs, deepspeed_config)
    alike, is one that JSON carries to the workers (plan.json has no NaN or Infinity, no
    key but text, and its UTF-8 no lone surrogate such as YAML's "\\ud800") and that
    torch, numpy and DeepSpeed take (64-bit integers)."""
    problem = None
    if isinstance(value, float) and not math.isfinite(value):
        problem = f"{value} is not a finite number"
    elif isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        problem = f"an integer of {len(str(abs(value)))} digits does not fit in 64 bits"
    elif isinstance(value, str) and not _is_unicode(value):
        problem = f"the text {_SURROGATE}"
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):  # JSON keys are text: plan.json would turn 1 or null into "1", "null"
                _refuse(f"key {key!r} is not text; put it in quotes", loc, source)
            if not _is_unicode(key):
                _refuse(f"the key {_SURROGATE}", (*loc, key), source)
            _check_values(item, (*loc, key), source)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_values(item, (*loc, index), source)
    if problem is not None:
        _refuse(problem, loc, source)


_SURROGATE = "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is no character; write the character itself"


def _refuse(problem: str, loc: KeyPath, source: SourceMap) -> None:
    line, origin = source.locate(loc)
    raise UsageError(problem, key=".".join(map(str, loc)) or source.filename, line=line, origin=origin)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def recipe_from_data(data: Any, source: SourceMap) -> Recipe:
    """Validate parsed YAML into a Recipe; the first problem becomes a UsageError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError("a recipe must be a mapping of sections (model:, data:, ...)",
                         key=source.filename, line=1)
    _check_values(data, (), source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc, message = tuple(error["loc"]), _describe(error)
        if error["type"] == "invalid_key" or loc[-1:] == ("[key]",):  # `1: x`, `null: x`
            loc = loc[:-2] if loc[-1] == "[key]" else loc[:-1]
            message = f"key {error['input']!r} is not text; put it in quotes"
        line, origin = source.locate(loc)
        raise UsageError(message, key=".".join(map(str, loc)) or source.filename,
                         line=line, origin=origin) from None
    try:
        _check_consistency(recipe)
    except UsageError as err:
        raise locate(err, source) from None
    return recipe


def _check_consistency(recipe: Recipe) -> None:
    """Rules that span fields of one recipe (rules that need flags live in plan.py)."""
    data = recipe.data
    if data.source == "parquet" and not data.path:
        raise UsageError("data.source is parquet; set data.path to a .parquet file or folder",
                         key="data.path")
    if data.source == "digits" and data.kind != "classification":
        raise UsageError("the digits dataset is for classification", key="data.kind")
    _check_validation(data)
    _check_loading(data)
    _check_classes(data)
    _check_transfer(recipe.model)
    target = recipe.model.target
    if target is not None and (":" not in target or target.startswith(":") or target.endswith(":")):
        raise UsageError(f"{target!r} is not an import path; write package.module:factory",
                         key="model.target")
    for name in [*recipe.cluster.slurm.env]:
        if not name.isidentifier() or not name.isascii():
            raise UsageError(f"{name!r} is not an environment variable name",
                             key=f"cluster.slurm.env.{name}")
        if names_credential(name):
            raise UsageError("a credential here would be written to recipe.yaml, plan.json, the sbatch script "
                             "and the trackers' parameters; export it in the shell that runs dlaunch instead "
                             "(sbatch passes that environment on to the job)", key=f"cluster.slurm.env.{name}")
    for index, option in enumerate(recipe.cluster.slurm.extra_sbatch):
        if not option.startswith("-") or any(c in option for c in "\n\r\x00"):
            raise UsageError(f"{option!r} is not one sbatch option such as --mail-type=END",
                             key=f"cluster.slurm.extra_sbatch.{index}")
    if recipe.train.monitor not in ("val_loss", "val_acc"):
        raise UsageError(f"cannot monitor {recipe.train.monitor!r}; use val_loss or val_acc",
                         key="train.monitor")
    if recipe.logging.mlflow.tracking_uri is not None:
        _check_tracking_uri(recipe.logging.mlflow.tracking_uri)


def _check_tracking_uri(uri: str) -> None:
    """No credential in the URI: it is written to recipe.yaml, plan.json and the logs. A
    server's go in MLflow's variables; a database's in its own (PGPASSWORD, ~/.pgpass),
    though the database URI may name its user."""
    key = "logging.mlflow.tracking_uri"
    try:
        parts = urlsplit(uri)
        password, user = parts.password, parts.username
    except ValueError as exc:
        raise UsageError(f"{uri!r} is not a URI: {exc}", key=key) from None
    server = parts.scheme in ("http", "https")
    if password is not None and server:
        raise UsageError("a password here would be written to recipe.yaml and plan.json; give it in "
                         "MLFLOW_TRACKING_PASSWORD instead", key=key)
    if password is not None:
        raise UsageError("a password here would be written to recipe.yaml and plan.json; give it the "
                         "database's own way (PGPASSWORD or ~/.pgpass, MYSQL_PWD or ~/.my.cnf)", key=key)
    if user is not None and server:
        raise UsageError("a user name or token here would be written to recipe.yaml and plan.json; give it in "
                         "MLFLOW_TRACKING_USERNAME, or a token in MLFLOW_TRACKING_TOKEN", key=key)
    secret = next((name for name, _ in parse_qsl(parts.query) if names_credential(name)), None)
    if secret is not None:
        raise UsageError(f"the query's {secret} would be written to recipe.yaml and plan.json; give a token in "
                         "MLFLOW_TRACKING_TOKEN instead", key=key)


def _check_loading(data: DataConfig) -> None:
    """Loader and augmentation settings fit the source."""
    if data.source == "images" and not data.path:
        raise UsageError("data.source is images; set data.path to a folder of class folders",
                         key="data.path")
    if data.source == "images" and data.kind != "classification":
        raise UsageError("an image folder holds classes; kind tokens needs parquet or synthetic",
                         key="data.kind")
    if data.source == "images" and data.shape is not None:
        raise UsageError("images reach the model as 3 x image_size x image_size; set "
                         "data.image_size instead", key="data.shape")
    if data.loader == "dali" and data.source not in ("images", "parquet"):
        raise UsageError(f"DALI decodes image files; {data.source} rows are tensors already, "
                         "use loader: torch", key="data.loader")
    if data.prefetch_factor is not None and data.num_workers == 0:
        raise UsageError("prefetch_factor is per DataLoader worker; set data.num_workers too",
                         key="data.prefetch_factor")
    if (data.mean is None) != (data.std is None):
        raise UsageError("give data.mean and data.std together", key="data.std" if data.std is None else "data.mean")
    for key in ("mean", "std"):
        values = getattr(data, key)
        if values is not None and (data.source not in ("images", "parquet") or len(values) != 3):
            raise UsageError(f"data.{key} is three per-channel values of images (source: images, "
                             "or parquet with an image column)", key=f"data.{key}")
    if data.std is not None and min(data.std) <= 0:
        raise UsageError("each channel's std must be above 0", key="data.std")
    if data.streaming:
        if data.source != "parquet":
            raise UsageError("streaming reads Parquet row groups; set data.source: parquet",
                             key="data.streaming")
        if data.validation.startswith("stratified") or data.time_column is not None:
            raise UsageError("a streaming rank reads its own rows only, so it cannot split by "
                             "labels or times of all rows; use holdout, kfold or walk_forward in "
                             "row order", key="data.validation")
    aug = data.augment
    low, high = aug.crop_scale
    if not 0 < low <= high <= 1:
        raise UsageError(f"crop_scale {aug.crop_scale} must satisfy 0 < low <= high <= 1",
                         key="data.augment.crop_scale")
    if not 0 < aug.crop_ratio[0] <= aug.crop_ratio[1]:
        raise UsageError(f"crop_ratio {aug.crop_ratio} must satisfy 0 < low <= high",
                         key="data.augment.crop_ratio")
    mixing = aug.mixup_alpha or aug.cutmix_alpha or aug.label_smoothing
    if mixing and data.kind != "classification":
        raise UsageError("mixup, cutmix and label smoothing mix class labels; token data has none",
                         key="data.augment")


def _check_classes(data: DataConfig) -> None:
    classes = data.classes
    if classes is None:
        return
    if data.kind != "classification":
        raise UsageError("data.classes picks classes of labelled rows; token data has none", key="data.classes")
    if data.streaming:
        raise UsageError("a streaming rank reads its own rows only, so the planner cannot count the "
                         "rows of the listed classes; set data.streaming: false", key="data.classes")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise UsageError(f"class {repeated[0]} is listed twice", key="data.classes")
    if min(classes) < 0:
        raise UsageError(f"class labels are 0 or more, not {min(classes)}", key="data.classes")


def _check_transfer(model: ModelConfig) -> None:
    """Settings that only mean something together. (Patterns are checked against the
    model's parameter names when the run is planned.)"""
    if model.init_exclude and model.init_from is None:
        raise UsageError("init_exclude leaves weights out of model.init_from; set init_from",
                         key="model.init_exclude")
    if model.unfreeze and not model.freeze:
        raise UsageError("unfreeze starts training parameters model.freeze froze; set model.freeze",
                         key="model.unfreeze")


def has_validation(data: DataConfig) -> bool:
    """Whether runs of ``data`` evaluate: the folded strategies always validate on a fold."""
    return data.validation not in ("holdout", "stratified") or data.val_fraction > 0


def _check_validation(data: DataConfig) -> None:
    """The split settings fit the strategy. A fold, gap or time column the strategy would
    ignore is an error: whoever set it expects an effect the run would not have."""
    folded = data.validation in ("kfold", "stratified_kfold", "walk_forward")
    if data.fold >= data.folds:
        raise UsageError(f"there is no fold {data.fold}; the {data.folds} folds are "
                         f"0..{data.folds - 1}", key="data.fold")
    if data.fold and not folded:
        raise UsageError(f"{data.validation} makes one split; folds are for kfold, "
                         "stratified_kfold and walk_forward", key="data.fold")
    if data.validation.startswith("stratified") and data.kind != "classification":
        raise UsageError("stratified splits keep the share of each class; token data has no "
                         "classes, use holdout or kfold", key="data.validation")
    if not folded and data.val_fraction + data.test_fraction >= 1:
        raise UsageError(f"val_fraction {data.val_fraction} and test_fraction "
                         f"{data.test_fraction} leave no rows to train on", key="data.test_fraction")
    if data.validation != "walk_forward":
        for key in ("gap", "time_column"):
            if getattr(data, key):
                raise UsageError(f"data.{key} is for validation: walk_forward",
                                 key=f"data.{key}")
    if data.time_column is not None and data.source != "parquet":
        raise UsageError("data.time_column names a Parquet column; other sources are in "
                         "time order as they are", key="data.time_column")


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> tuple[Recipe, SourceMap]:
    """Read ``path`` (None: all defaults), apply ``--set`` overrides, validate."""
    if path is None:
        data, source = {}, SourceMap(filename="<defaults>")
    else:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UsageError(f"recipe {str(path)!r} does not exist", key="recipe") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read recipe {str(path)!r}: {exc}", key="recipe") from None
        data, source = load_yaml(text, filename=path.name)
    if data is None:
        data = {}
    for spec in overrides:
        keys, value = parse_override(spec)
        if not isinstance(data, dict):
            break  # recipe_from_data reports the malformed document
        apply_override(data, keys, value)
        source.overridden.add(keys)
    return recipe_from_data(data, source), source


def locate(error: UsageError, source: SourceMap) -> UsageError:
    """Fill in the YAML line (or --set) of an error raised after validation."""
    if error.key and error.line is None and error.origin is None:
        path = tuple(error.key.split("."))
        error.line, error.origin = source.locate(path)
    return error


def _field(model: type[BaseModel], parts: list[str], depth: int, key: str):
    field = model.model_fields.get(parts[depth])
    if field is None:
        guess = difflib.get_close_matches(parts[depth], list(model.model_fields), n=1)
        hint = f"; did you mean {'.'.join([*parts[:depth], guess[0]])!r}?" if guess else ""
        raise UsageError(f"no such recipe key{hint}", key=key)
    return field


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The section a field holds, also for an optional one (`SweepConfig | None`)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _first_sentence(text: str | None) -> str:
    return " ".join((text or "").split()).split(". ")[0].rstrip(".")


def explain(key: str) -> str:
    """The documentation of one recipe key or section, from the schema itself."""
    parts = key.split(".")
    model: type[BaseModel] = Recipe
    for depth in range(len(parts) - 1):
        section = _section_type(_field(model, parts, depth, key).annotation)
        if section is None:
            raise UsageError(f"{'.'.join(parts[:depth + 1])} is a value, not a section", key=key)
        model = section
    field = _field(model, parts, len(parts) - 1, key)
    section = _section_type(field.annotation)
    if section is not None:
        rows = [f"  {name}: {_first_sentence(sub.description)}" for name, sub in section.model_fields.items()]
        if typing.get_origin(field.annotation) is list:  # model.unfreeze: its items are sections
            about = " ".join((field.description or "").split())
            return "\n".join([f"{key}: a list; each item has the keys below", f"  {about}", *rows])
        return "\n".join([f"{key}: a section; `dlaunch explain {key}.KEY` for more", *rows])
    default = "required" if field.is_required() else f"default: {field.get_default(call_default_factory=True)!r}"
    return f"{key} ({default})\n  {' '.join((field.description or '').split())}"
