"""`dlaunch doctor RECIPE`: the sanity checks a careful engineer runs before a long job,
on the recipe's own model and data, in this process (fp32 on CPU; no process group, no
engine).

    inputs normalised   per-channel / per-feature mean and std of the batches the model sees
    labels              in [0, classes), and no class starved of rows
    gradients           every trainable parameter gets a finite, non-zero gradient
    overfit             a fresh copy of the model drives one small batch's loss to ~0
    initial loss        near log(classes): what uniform predictions score
    loader speed        producing a batch takes less time than a training step on it

Each check is a function of tensors and models returning a ``CheckResult``;
``run_doctor`` builds what they need once, the way the trainer does (rank 0's batches,
augmentation and mixing included), and runs every check so that one's failure, or crash,
does not stop the others.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from launcher.data.augment import mix_batch
from launcher.data.datasets import load_split
from launcher.data.image_rows import ImageRows
from launcher.data.loaders import Batch, train_batches
from launcher.engines.base import build_optimizer, loss_fn
from launcher.models.build import build_model, param_groups
from launcher.plan import LaunchPlan
from launcher.trainer import seed_everything

Verdict = Literal["PASS", "WARN", "FAIL", "SKIP"]

NORMALISED = "inputs normalised"
LABELS = "labels"
GRADIENTS = "gradients"
OVERFIT = "overfit one batch"
INITIAL_LOSS = "initial loss"
LOADER = "loader speed"

# Normalisation bands. Default initialisations (Kaiming, Xavier) assume inputs of unit
# scale around zero: within half a std of zero and 2x of unit std the first layer sees what
# it was initialised for (augmentation and a rank's share of the rows move the figures a
# little). An order of magnitude off (raw 0..255 pixels, features in their own units)
# saturates or starves the first layer at the recipe's LR: FAIL. Between: WARN.
MEAN_PASS, STD_PASS = 0.5, (0.5, 2.0)
MEAN_FAIL, STD_FAIL = 3.0, (0.1, 10.0)
CONSTANT_STD = 1e-6
"""A feature this flat is constant (a digits border pixel): judged on its mean alone."""

IMBALANCE = 10.0
"""Largest class over smallest above which the labels are called imbalanced."""

OVERFIT_LOSS, OVERFIT_SHARE = 0.05, 0.01
"""Overfitting succeeds below 0.05, or 1% of the starting loss if that is higher."""
OVERFIT_SAMPLES = 8
OVERFIT_LR = 3e-3
"""Adam at a fixed LR, no schedule or weight decay to blame (Karpathy's recipe): the
quickstart's CNN fits its 8 samples in ~45 steps at 3e-3 (~100 at 1e-3), the tiny GPT
in ~60 (~180)."""

INIT_LOSS_PASS, INIT_LOSS_FAIL = 1.5, 3.0
"""Initial loss over log(classes): up to 1.5x is a sane init; above 3x the model starts
confidently wrong (an output layer scaled far too large)."""

SAMPLED_BATCHES = 50
"""Micro-batches of rank 0's first epoch read for the input statistics and the loader's
timing (at most)."""
KEPT_BATCHES = 8
"""Of those, the first ones kept for the checks that run the model."""
TIMED_STEPS = 3
"""Optimizer steps timed, after one untimed warm-up step."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    verdict: Verdict
    detail: str
    """One line, with the numbers."""
    figures: dict[str, Any] = field(default_factory=dict)
    """The numbers behind the verdict, for --json."""


def _names(names: Sequence[Any], limit: int = 8) -> str:
    """The first ``limit`` of ``names``, and how many more."""
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(map(str, names[:limit])) + more


# -- 1. inputs normalised ---------------------------------------------------------------

class InputStats:
    """Running count, sum and sum of squares per channel of image batches (N, C, H, W),
    else per feature, in float64: the batches need not be kept."""

    def __init__(self) -> None:
        self.unit = "feature"
        self.values = 0
        """Values summed per unit."""
        self.sum = self.sumsq = torch.zeros(0, dtype=torch.float64)
        self.nonfinite = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().double()
        if x.dim() == 4:
            self.unit = "channel"
            per_unit = x.transpose(0, 1).reshape(x.shape[1], -1)
        else:
            per_unit = x.reshape(len(x), -1).T
        finite = torch.isfinite(per_unit)
        self.nonfinite += int((~finite).sum())
        per_unit = per_unit.where(finite, torch.zeros(()))
        if self.values == 0:
            self.sum = self.sumsq = torch.zeros(len(per_unit), dtype=torch.float64)
        self.sum = self.sum + per_unit.sum(1)
        self.sumsq = self.sumsq + per_unit.pow(2).sum(1)
        self.values += per_unit.shape[1]

    @classmethod
    def of(cls, inputs: torch.Tensor) -> InputStats:
        stats = cls()
        stats.add(inputs)
        return stats

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.sum / self.values
        return mean, (self.sumsq / self.values - mean.pow(2)).clamp(min=0).sqrt()


def check_normalisation(stats: InputStats) -> CheckResult:
    """Every channel (feature) near mean 0 and std 1, within the bands above."""
    if stats.values == 0:
        return CheckResult(NORMALISED, "FAIL", "no training inputs were read")
    mean, std = stats.mean_std()
    units = len(mean)
    figures = {"unit": stats.unit, "units": units, "values_per_unit": stats.values,
               "mean": mean.tolist(), "std": std.tolist()}
    if stats.nonfinite:
        return CheckResult(NORMALISED, "FAIL", f"{stats.nonfinite} inputs are NaN or Inf", figures)
    constant = std < CONSTANT_STD
    out_of_pass = (mean.abs() >= MEAN_PASS) | (~constant & ((std <= STD_PASS[0]) | (std >= STD_PASS[1])))
    out_of_warn = (mean.abs() > MEAN_FAIL) | (~constant & ((std < STD_FAIL[0]) | (std > STD_FAIL[1])))
    flat = f" (+{int(constant.sum())} constant)" if constant.any() and not constant.all() else ""
    if not out_of_pass.any():
        varying = ~constant
        mean = mean.round(decimals=2) + 0.0  # no "-0.00"
        if units == 1 or not varying.any():
            spread = f"mean {float(mean.max()):+.2f}, std {float(std.max()):.2f}"
        else:
            spread = (f"mean {float(mean.min()):+.2f}..{float(mean.max()):+.2f}, "
                      f"std {float(std[varying].min()):.2f}..{float(std[varying].max()):.2f}")
        judged = int(varying.sum()) or units
        detail = f"{judged} {stats.unit}{'s' if judged > 1 else ''}{flat}: {spread}"
        return CheckResult(NORMALISED, "PASS", detail, figures)
    bad = out_of_warn if out_of_warn.any() else out_of_pass
    # The worst unit: the furthest from unit scale, in log terms, or from zero mean.
    badness = mean.abs() + torch.where(constant, torch.zeros_like(std), std.clamp(min=1e-12).log().abs())
    worst = int(torch.where(bad, badness, torch.full_like(badness, -1.0)).argmax())
    others = int(bad.sum()) - 1
    verdict: Verdict = "FAIL" if out_of_warn.any() else "WARN"
    band = (f"|mean|<{MEAN_FAIL:g} and {STD_FAIL[0]:g}<std<{STD_FAIL[1]:g}" if verdict == "FAIL"
            else f"|mean|<{MEAN_PASS:g} and {STD_PASS[0]:g}<std<{STD_PASS[1]:g}")
    more = f" and {others} more of {units}" if others else f" of {units}"
    detail = (f"{stats.unit} {worst}{more} outside {band}: mean {float(mean[worst]):+.3g}, "
              f"std {float(std[worst]):.3g}; normalise them (data.normalize, data.mean/std)")
    return CheckResult(NORMALISED, verdict, detail, figures)


# -- 2. labels ---------------------------------------------------------------------------

def check_labels(labels: torch.Tensor, num_classes: int, *, tokens: bool = False) -> CheckResult:
    """Every label in [0, num_classes); for classes, none empty and the largest at most
    ``IMBALANCE`` times the smallest. Token frequencies are skewed by nature: for token
    targets only the range is checked."""
    labels = labels.reshape(-1).long()
    if len(labels) == 0:
        return CheckResult(LABELS, "FAIL", "the training split has no labels")
    low, high = int(labels.min()), int(labels.max())
    outside = int(((labels < 0) | (labels >= num_classes)).sum())
    figures: dict[str, Any] = {"num_classes": num_classes, "min": low, "max": high, "outside": outside}
    what = "token ids" if tokens else "labels"
    if outside:
        detail = (f"{outside} of {len(labels)} {what} outside 0..{num_classes - 1} (the model's "
                  f"{num_classes} outputs): they span {low}..{high}")
        return CheckResult(LABELS, "FAIL", detail, figures)
    if tokens:
        detail = (f"{len(labels)} target {what} in {low}..{high}, within the vocabulary of {num_classes} "
                  "(balance not judged for tokens)")
        return CheckResult(LABELS, "PASS", detail, figures)
    counts = torch.bincount(labels, minlength=num_classes)
    figures["counts"] = counts.tolist()
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        detail = f"{len(empty)} of {num_classes} classes have no training rows: {_names(empty, 10)}"
        return CheckResult(LABELS, "WARN", detail, figures)
    big, small = int(counts.argmax()), int(counts.argmin())
    ratio = float(counts[big] / counts[small])
    figures["imbalance"] = ratio
    if ratio > IMBALANCE:
        detail = (f"class {big} has {ratio:.1f}x the rows of class {small} ({int(counts[big])} vs "
                  f"{int(counts[small])}), over {IMBALANCE:g}x")
        return CheckResult(LABELS, "WARN", detail, figures)
    detail = (f"{len(labels)} labels in 0..{num_classes - 1}, every class present, "
              f"{int(counts[small])}..{int(counts[big])} rows each ({ratio:.1f}x)")
    return CheckResult(LABELS, "PASS", detail, figures)


# -- 3. gradients ------------------------------------------------------------------------

def _gradients(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    return float(loss.detach()), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def check_gradients(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> CheckResult:
    """One forward and backward on a copy of ``model``: every trainable parameter must get
    a finite gradient that is not all zeros. A gradient that is zero only because the path
    to it starts at zero (a zero-initialised norm scale, as the residual blocks' last one)
    gets a second chance after one Adam step."""
    model = copy.deepcopy(model).train()
    loss, grads = _gradients(model, inputs, targets)
    if not grads:
        return CheckResult(GRADIENTS, "FAIL", "the model has no trainable parameters")
    missing = [n for n, g in grads.items() if g is None]
    nonfinite = [n for n, g in grads.items() if g is not None and not bool(torch.isfinite(g).all())]
    zero = [n for n, g in grads.items() if g is not None and n not in nonfinite and not bool(g.any())]
    zero_after = []
    if zero and not nonfinite:
        torch.optim.Adam([p for p in model.parameters() if p.grad is not None], lr=OVERFIT_LR).step()
        _, grads = _gradients(model, inputs, targets)
        zero_after = [n for n in zero if grads[n] is None or not bool(grads[n].any())]
    figures = {"parameters": len(grads), "loss": loss, "no_gradient": missing, "nonfinite": nonfinite,
               "zero_at_init": zero, "zero_after_a_step": zero_after}
    problems = [f"no gradient (detached or unused): {_names(missing)}" if missing else "",
                f"non-finite gradient: {_names(nonfinite)}" if nonfinite else "",
                f"all-zero gradient, also after a step: {_names(zero_after)}" if zero_after else ""]
    problems = [p for p in problems if p]
    if problems:
        return CheckResult(GRADIENTS, "FAIL", f"{len(missing) + len(nonfinite) + len(zero_after)} of "
                                              f"{len(grads)} parameters: " + "; ".join(problems), figures)
    values = sum(p.numel() for p in model.parameters() if p.requires_grad)
    late = (f" ({len(zero)} from the second step on: they sit behind a zero-initialised weight, "
            f"e.g. {zero[0]})" if zero else "")
    return CheckResult(GRADIENTS, "PASS", f"all {len(grads)} parameters ({values:,} values) get a finite, "
                                          f"non-zero gradient{late}", figures)


# -- 4. overfit one batch ----------------------------------------------------------------

@torch.no_grad()
def _eval_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    loss = float(loss_fn(model(inputs), targets))
    model.train()
    return loss


def check_overfit(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, steps: int = 200,
                  lr: float = OVERFIT_LR) -> CheckResult:
    """A copy of ``model`` trained on this one batch with Adam at ``lr`` for up to
    ``steps`` steps must drive its loss (in eval mode: no dropout) below
    max(OVERFIT_LOSS, OVERFIT_SHARE x the starting loss). It stops as soon as it has."""
    model = copy.deepcopy(model).train()
    start = _eval_loss(model, inputs, targets)
    goal = max(OVERFIT_LOSS, OVERFIT_SHARE * start)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    final, taken = start, 0
    while taken < steps and not (final < goal):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        taken += 1
        # The training-mode loss is free; confirm it without dropout once it is low enough.
        train_loss = float(loss.detach())
        if train_loss < goal or taken == steps or not math.isfinite(train_loss):
            final = _eval_loss(model, inputs, targets)
            if not math.isfinite(final):
                break
    figures = {"start": start, "final": final, "goal": goal, "steps": taken, "samples": len(inputs), "lr": lr}
    fell = f"loss {start:.3f} -> {final:.4f}"
    how = f"{len(inputs)} samples, {taken} Adam steps at lr {lr:g}"
    if final < goal:
        return CheckResult(OVERFIT, "PASS", f"{fell} (< {goal:.3g}) in {how}", figures)
    if math.isfinite(final) and final < start / 2:
        detail = (f"{fell}, not below {goal:.3g}, in {how}; more steps (--overfit-steps) or less "
                  "regularisation may get there")
        return CheckResult(OVERFIT, "WARN", detail, figures)
    return CheckResult(OVERFIT, "FAIL", f"{fell} in {how}: the model cannot fit one small batch", figures)


# -- 5. initial loss ---------------------------------------------------------------------

def check_initial_loss(model: nn.Module, batches: Sequence[Batch], num_classes: int) -> CheckResult:
    """The mean loss of the untrained model over ``batches`` against log(num_classes),
    what uniform predictions score. Lower is fine (a prior-matched bias, pretrained
    weights); well above means confident wrong predictions from the start."""
    with torch.no_grad():
        model = copy.deepcopy(model).eval()
        losses = [float(loss_fn(model(x), y)) for x, y in batches]
    loss = sum(losses) / len(losses)
    expected = math.log(num_classes)
    ratio = loss / expected
    figures = {"loss": loss, "expected": expected, "ratio": ratio, "batches": len(batches)}
    detail = f"{loss:.3f} vs log({num_classes}) = {expected:.3f} expected ({ratio:.2f}x)"
    if not math.isfinite(loss):
        return CheckResult(INITIAL_LOSS, "FAIL", f"the loss at init is {loss}", figures)
    if ratio > INIT_LOSS_FAIL:
        detail += (f", over {INIT_LOSS_FAIL:g}x: the outputs start far too confident (a bad init or "
                   "final-layer scale)")
        return CheckResult(INITIAL_LOSS, "FAIL", detail, figures)
    if ratio > INIT_LOSS_PASS:
        detail += f", over {INIT_LOSS_PASS:g}x: check the init and the final layer's scale"
        return CheckResult(INITIAL_LOSS, "WARN", detail, figures)
    return CheckResult(INITIAL_LOSS, "PASS", detail, figures)


# -- 6. loader speed ---------------------------------------------------------------------

def check_loader_speed(load_s: float, step_s: float, *, note: str = "") -> CheckResult:
    """Seconds to produce one micro-batch against seconds of training step per
    micro-batch: a loader slower than the step leaves the model waiting."""
    figures = {"load_ms": load_s * 1e3, "step_ms": step_s * 1e3}
    detail = f"a batch loads in {load_s * 1e3:.2f} ms, a step takes {step_s * 1e3:.2f} ms a batch{note}"
    if load_s >= step_s:
        detail += ": the step waits for data; raise data.num_workers (or data.loader: dali for images)"
        return CheckResult(LOADER, "WARN", detail, figures)
    detail += f": loading is {step_s / max(load_s, 1e-9):.0f}x faster"
    return CheckResult(LOADER, "PASS", detail, figures)


# -- the runner ----------------------------------------------------------------------------

@dataclass
class _Sample:
    """What one pass over rank 0's first batches leaves: input statistics, the first
    batches (as loaded, and as the trainer mixes them) and the loader's timing."""

    stats: InputStats
    raw: list[Batch]
    mixed: list[Batch]
    load_s: float
    """Seconds per batch after the first (which pays for starting workers)."""


def _sample_batches(plan: LaunchPlan, train: Dataset) -> _Sample:
    recipe, batch = plan.recipe, plan.training.batch
    cfg, seed, world = recipe.data, recipe.train.seed, plan.topology.world_size
    # The doctor reads the rows whole, also for a streamed recipe: the steps an epoch are
    # the whole-read sampler's (the same as the plan's unless streaming).
    steps_per_epoch = len(train) // (batch.micro * world * batch.grad_accum)
    loader = train_batches(train, cfg, rank=0, world_size=world, micro_batch=batch.micro,
                           batches_per_step=batch.grad_accum, steps_per_epoch=steps_per_epoch,
                           on_gpu=False, seed=seed)
    loader.set_epoch(0)
    augment = cfg.augment
    mixing = bool(augment.mixup_alpha or augment.cutmix_alpha or augment.label_smoothing)
    stats, raw, mixed, waits = InputStats(), [], [], []
    batches = iter(loader)
    for index in range(min(SAMPLED_BATCHES, steps_per_epoch * batch.grad_accum)):
        started = time.perf_counter()
        inputs, targets = next(batches)
        waits.append(time.perf_counter() - started)
        if mixing:  # as Trainer._mix draws it, for rank 0
            step, micro = divmod(index, batch.grad_accum)
            mix_seed = np.random.SeedSequence([seed % 2**64, 0, step, micro]).generate_state(1)[0]
            mixed_batch = mix_batch(inputs, targets, num_classes=plan.training.data.num_classes,
                                    mixup_alpha=augment.mixup_alpha, cutmix_alpha=augment.cutmix_alpha,
                                    label_smoothing=augment.label_smoothing,
                                    generator=torch.Generator().manual_seed(int(mix_seed)))
        else:
            mixed_batch = (inputs, targets)
        if cfg.kind != "tokens":
            stats.add(mixed_batch[0])
        if index < KEPT_BATCHES:
            raw.append((inputs, targets))
            mixed.append(mixed_batch)
    del batches  # stops the loader's workers
    load_s = sum(waits[1:]) / (len(waits) - 1) if len(waits) > 1 else waits[0]
    return _Sample(stats, raw, mixed, load_s)


def _time_steps(plan: LaunchPlan, model: nn.Module, batches: list[Batch]) -> float:
    """Seconds per micro-batch of the trainer's step (forward, backward, clipping, the
    recipe's optimizer), fp32."""
    recipe, accum = plan.recipe, plan.training.batch.grad_accum
    model = copy.deepcopy(model).train()
    optimizer = build_optimizer(plan, param_groups(model, recipe.optim.weight_decay), "cpu")
    started = 0.0
    for step in range(TIMED_STEPS + 1):
        if step == 1:  # the first step pays for allocations: untimed
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            inputs, targets = batches[(step * accum + micro) % len(batches)]
            (loss_fn(model(inputs), targets) / accum).backward()
        if recipe.train.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), recipe.train.clip_grad_norm)
        optimizer.step()
    return (time.perf_counter() - started) / (TIMED_STEPS * accum)


def _train_labels(train: Dataset) -> torch.Tensor:
    return train.labels if isinstance(train, ImageRows) else train.tensors[1]


def _output_width(model: nn.Module, inputs: torch.Tensor) -> int | None:
    """How many classes the model scores (its logits' last dimension), or None when its
    forward fails, which the checks that run it report."""
    try:
        with torch.no_grad():
            return int(copy.deepcopy(model).eval()(inputs[:2]).shape[-1])
    except Exception:  # noqa: BLE001 - any failure of a user's forward is reported by the checks
        return None


def _isolated(name: str, check: Callable[[], CheckResult]) -> CheckResult:
    """Run one check; its crash is its own FAIL, never the others'."""
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - a crash is exactly what a check reports
        message = " ".join(str(exc).split()) or type(exc).__name__
        return CheckResult(name, "FAIL", f"crashed: {type(exc).__name__}: {message}"[:300])


def run_doctor(plan: LaunchPlan, *, overfit_steps: int = 200,
               overfit_lr: float | None = None) -> list[CheckResult]:
    """Every check on ``plan``'s model and data, in this process, as rank 0 of the run
    would see them: the run's initial weights, its first batches, the threads a rank gets
    (OMP_NUM_THREADS of the plan: on a busy machine more threads than a rank's share of
    the cores slow every step many times over)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(plan.env.get("OMP_NUM_THREADS", threads)))
    try:
        return _run_checks(plan, overfit_steps, overfit_lr or OVERFIT_LR)
    finally:
        torch.set_num_threads(threads)


def _run_checks(plan: LaunchPlan, overfit_steps: int, overfit_lr: float) -> list[CheckResult]:
    recipe, facts = plan.recipe, plan.training.data
    tokens = recipe.data.kind == "tokens"
    seed_everything(recipe.train.seed)  # as the trainer: the run's initial weights
    split = load_split(recipe.data, facts, seed=recipe.train.seed)
    model = build_model(recipe.model, facts).float()
    seed_everything(recipe.train.seed)  # rank 0's dropout and augmentation
    sample = _sample_batches(plan, split.train)
    classes = _output_width(model, sample.raw[0][0]) or facts.num_classes
    overfit_inputs, overfit_targets = (t[:OVERFIT_SAMPLES] for t in sample.raw[0])
    cuda = plan.topology.device == "cuda"
    threads = plan.env.get("OMP_NUM_THREADS")
    note = (f" (fp32 on this CPU{f', {threads} thread(s) as a rank of the run' if threads else ''}"
            f"{'; the GPU run steps faster' if cuda else ''})")
    skip_tokens = CheckResult(NORMALISED, "SKIP", "token ids are embedded, not scaled: nothing to normalise")
    checks: list[tuple[str, Callable[[], CheckResult]]] = [
        (NORMALISED, lambda: skip_tokens if tokens else check_normalisation(sample.stats)),
        (LABELS, lambda: check_labels(_train_labels(split.train), classes, tokens=tokens)),
        (GRADIENTS, lambda: check_gradients(model, *sample.mixed[0])),
        (OVERFIT, lambda: check_overfit(model, overfit_inputs, overfit_targets, steps=overfit_steps,
                                        lr=overfit_lr)),
        (INITIAL_LOSS, lambda: check_initial_loss(model, sample.raw, classes)),
        (LOADER, lambda: check_loader_speed(sample.load_s, _time_steps(plan, model, sample.mixed),
                                            note=note)),
    ]
    return [_isolated(name, check) for name, check in checks]


# -- output ----------------------------------------------------------------------------------

def verdict_of(results: Sequence[CheckResult]) -> Verdict:
    verdicts = {r.verdict for r in results}
    return "FAIL" if "FAIL" in verdicts else "WARN" if "WARN" in verdicts else "PASS"


def format_results(results: Sequence[CheckResult], seconds: float) -> str:
    """The table (check, verdict, detail) and a verdict line."""
    width = max(len(r.name) for r in results)
    lines = [f"{'check':<{width}}  verdict  detail"]
    lines += [f"{r.name:<{width}}  {r.verdict:<7}  {r.detail}" for r in results]
    counts = ", ".join(f"{sum(r.verdict == v for r in results)} {v}" for v in ("PASS", "WARN", "FAIL", "SKIP")
                       if any(r.verdict == v for r in results))
    overall = verdict_of(results)
    failed = ", ".join(r.name for r in results if r.verdict == "FAIL")
    ending = {"PASS": "ready for a long run",
              "WARN": "it can run; read the warnings first",
              "FAIL": f"fix {failed} before a long run"}[overall]
    lines.append(f"doctor: {overall}: {counts} in {seconds:.1f}s; {ending}")
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: a non-finite figure becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def results_json(results: Sequence[CheckResult], seconds: float, recipe: str) -> str:
    return json.dumps(_finite({"recipe": recipe, "verdict": verdict_of(results), "seconds": round(seconds, 2),
                               "checks": [asdict(r) for r in results]}), indent=2, allow_nan=False) + "\n"
