"""Transfer learning on a freshly built model, before an engine wraps it: initial weights
(``model.init_from`` less ``init_exclude``), frozen parameters (``model.freeze``),
parameters that start training later (``model.unfreeze``) and per-parameter LR
multipliers (``optim.lr_multipliers``), all named by fnmatch patterns over parameter
names. A pattern that matches nothing is an error: a typo must not freeze nothing.

Engines fix their parameter sets when they are built (ZeRO flattens and partitions each
param group, DDP buckets the gradients), so a parameter that starts training later is
trainable from the start. It sits in param groups of its own whose LR is 0 until its step
(launcher/schedules.py), and a gradient hook zeroes its gradient until then, so that it
neither moves (AdamW's decoupled decay, lr x wd x p, is 0 too) nor counts in the clipped
global gradient norm.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from launcher.data.facts import DataFacts
from launcher.errors import UsageError
from launcher.models.build import build_model, param_groups
from launcher.models.facts import ModelFacts, WeightsSource
from launcher.models.weights import KEY, Shapes, read_shapes, read_weights, resolve
from launcher.recipe import Recipe
from launcher.schedules import LRSchedule

NEVER = math.inf
"""The start step of a parameter frozen for good."""


def matching(patterns: Sequence[str], names: Sequence[str], key: str,
             what: str = "parameter") -> list[list[str]]:
    """The names each pattern matches (fnmatch, case-sensitive); one that matches none is
    a UsageError naming it and a few of the names."""
    found = []
    for pattern in patterns:
        hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise UsageError(f"{pattern!r} matches no {what}; the {what}s are named like "
                             f"{_examples(names)}", key=key)
        found.append(hits)
    return found


def _examples(names: Sequence[str]) -> str:
    """The first name of each top-level module (a few): they show the naming best."""
    firsts: dict[str, str] = {}
    for name in names:
        firsts.setdefault(name.split(".")[0], name)
    shown = list(firsts.values())[:5]
    return ", ".join(shown) + (f" ({len(names)} in all)" if len(names) > len(shown) else "")


def _few(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


@dataclass(frozen=True)
class Transfer:
    """What freezing, unfreezing and LR multipliers make of one model's parameters."""

    starts: dict[str, float]
    """Each parameter's first training step: 0 from the start, an `unfreeze` step, or
    NEVER (frozen for good)."""
    multipliers: dict[str, float]
    """Each parameter's LR multiplier."""

    @classmethod
    def of(cls, model: nn.Module, recipe: Recipe) -> Transfer:
        cfg = recipe.model
        names = [name for name, _ in model.named_parameters()]
        starts: dict[str, float] = dict.fromkeys(names, 0)
        for hits in matching(cfg.freeze, names, "model.freeze"):
            starts.update(dict.fromkeys(hits, NEVER))
        frozen = [name for name in names if starts[name] == NEVER]
        for index, entry in enumerate(cfg.unfreeze):
            key = f"model.unfreeze.{index}.patterns"
            for hits in matching(entry.patterns, frozen, key, "frozen parameter"):
                starts.update((name, min(starts[name], entry.at_step)) for name in hits)
        return cls(starts, _multipliers(names, recipe.optim.lr_multipliers))

    def freeze(self, model: nn.Module) -> None:
        """No gradient for the parameters frozen for good: no engine sees them as trainable."""
        for name, param in model.named_parameters():
            if self.starts[name] == NEVER:
                param.requires_grad_(False)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        return param_groups(model, weight_decay, self.multipliers, self.starts)

    def hold(self, model: nn.Module, schedule: LRSchedule) -> None:
        """Until its start step (as ``schedule`` counts optimizer steps): a gradient hook
        zeroes each later-starting parameter's gradient, and each BatchNorm layer whose
        parameters are all frozen normalises with its running statistics (eval mode)."""
        start_of = {id(param): self.starts[name] for name, param in model.named_parameters()}
        for name, param in model.named_parameters():
            if 0 < self.starts[name] < NEVER:
                param.register_hook(partial(_held_gradient, schedule, self.starts[name]))
        for module in model.modules():
            # In training mode a BatchNorm layer normalises with each batch's statistics and
            # moves its running statistics towards the new data's: a frozen layer's output
            # would change, and the features it feeds would no longer be the pretrained ones
            # (Keras does the same for a BatchNormalization layer with trainable=False). One
            # without affine parameters has nothing freeze can name, and trains as it is.
            params = list(module.parameters(recurse=False))
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and params:
                start = min(start_of[id(p)] for p in params)
                if start > 0:
                    module.register_forward_pre_hook(partial(_held_norm, schedule, start))

    def held_modules(self, step: int) -> set[str]:
        """Top-level modules none of whose parameters trains at ``step``: their zero
        gradients are held, not vanishing."""
        first: dict[str, float] = {}
        for name, start in self.starts.items():
            module = name.split(".")[0]
            first[module] = min(first.get(module, NEVER), start)
        return {module for module, start in first.items() if start > step}


def _held_gradient(schedule: LRSchedule, start: float, grad: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(grad) if schedule.last_step < start else grad


def _held_norm(schedule: LRSchedule, start: float, module: nn.Module, _: Any) -> None:
    if schedule.last_step < start:
        module.train(False)


def _multipliers(names: list[str], patterns: dict[str, float]) -> dict[str, float]:
    """The multiplier of the first pattern each name matches; 1 when none does."""
    chosen: dict[str, str] = {}
    for pattern, hits in zip(patterns, matching(list(patterns), names, "optim.lr_multipliers"), strict=True):
        won = [name for name in hits if name not in chosen]
        if not won:
            raise UsageError(f"{pattern!r} sets no parameter's LR: an earlier pattern, "
                             f"{chosen[hits[0]]!r}, matches all of its", key="optim.lr_multipliers")
        chosen.update(dict.fromkeys(won, pattern))
    return {name: patterns[chosen[name]] if name in chosen else 1.0 for name in names}


def shapes_of(model: nn.Module) -> Shapes:
    """Every weight the model's state dict holds (parameters and persistent buffers)."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_fit(model: Shapes, source: Shapes, exclude: Sequence[str], where: str) -> set[str]:
    """The names ``exclude`` leaves out; every other weight of the model must be in the
    source with its shape, and the source must hold nothing else: one error lists what
    does not fit."""
    names = list(model) + [name for name in source if name not in model]
    excluded = {name for hits in matching(exclude, names, "model.init_exclude", "weight") for name in hits}
    missing = [n for n in model if n not in source and n not in excluded]
    unexpected = [n for n in source if n not in model and n not in excluded]
    reshaped = [n for n in model if n in source and n not in excluded and model[n] != source[n]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the model's weights missing ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} the model does not have ({_few(unexpected)})")
    if reshaped:
        problems.append(f"{len(reshaped)} of another shape (" + ", ".join(
            f"{n}: {list(source[n])} there, {list(model[n])} here" for n in reshaped[:3])
            + (", ..." if len(reshaped) > 3 else "") + ")")
    if problems:
        raise UsageError(f"{where} does not fit the model: {'; '.join(problems)}; list what should "
                         "keep its new initialisation in model.init_exclude", key=KEY)
    return excluded


def load_initial_weights(model: nn.Module, source: WeightsSource, exclude: Sequence[str]) -> None:
    """``source``'s weights into ``model``, but for those ``exclude`` names."""
    weights = read_weights(source)
    excluded = check_fit(shapes_of(model), {n: tuple(t.shape) for n, t in weights.items()}, exclude,
                         source.path)
    model.load_state_dict({n: t for n, t in weights.items() if n not in excluded}, strict=False)


def describe_model(recipe: Recipe, data: DataFacts) -> ModelFacts:
    """The model facts of a transfer-learning recipe, its patterns and initial weights
    checked against the model, built on the meta device (no memory, no initialisation).
    A ``model.target`` model is the user's code, run only by the workers, which check it
    before training."""
    cfg = recipe.model
    init = resolve(cfg.init_from) if cfg.init_from is not None else None
    source = read_shapes(init) if init is not None else None
    if cfg.target is not None:
        return ModelFacts(init)
    try:
        with torch.device("meta"):
            model = build_model(cfg, data)
    except RuntimeError as exc:  # torch's word for a shape it cannot make: hidden: [-1]
        raise UsageError(f"{cfg.name} with {cfg.kwargs}: {exc}", key="model.kwargs") from None
    transfer = Transfer.of(model, recipe)
    if source is not None:
        check_fit(shapes_of(model), source, cfg.init_exclude, str(cfg.init_from))
    sizes = {name: param.numel() for name, param in model.named_parameters()}
    frozen = [name for name, start in transfer.starts.items() if start > 0]
    return ModelFacts(init, params=sum(sizes.values()), frozen=sum(sizes[n] for n in frozen),
                      unfrozen_later=sum(sizes[n] for n in frozen if transfer.starts[n] < NEVER))
