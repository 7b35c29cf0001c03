"""``build_model``: the recipe's model section plus the data's facts → an nn.Module."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from launcher.data.facts import DataFacts
from launcher.errors import UsageError
from launcher.models.cnn import CNN
from launcher.models.gpt import GPT
from launcher.models.mlp import MLP
from launcher.models.target import load_target
from launcher.recipe import ModelConfig

BUILTINS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN, "gpt": GPT}
FROM_DATA = ("input_shape", "num_classes")
"""Built-in arguments that come from the data, never from ``model.kwargs``."""


def build_model(cfg: ModelConfig, facts: DataFacts) -> nn.Module:
    """The built-in ``cfg.name`` sized for ``facts``, or ``cfg.target(**cfg.kwargs)``."""
    if cfg.target is not None:
        return _from_target(cfg.target, cfg.kwargs)
    factory = BUILTINS[cfg.name]
    _check_kwargs(cfg.name, factory, cfg.kwargs, skip=FROM_DATA)
    try:
        return factory(facts.input_shape, facts.num_classes, **cfg.kwargs)
    except (TypeError, ValueError) as exc:  # a kwarg of the wrong type or a bad combination
        raise UsageError(f"{cfg.name} with {cfg.kwargs}: {exc}", key="model.kwargs") from None


def _from_target(target: str, kwargs: dict[str, Any]) -> nn.Module:
    factory = load_target(target)
    _check_kwargs(target, factory, kwargs)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{target} returned a {type(model).__name__}, not a torch.nn.Module",
                         key="model.target")
    return model


def _check_kwargs(name: str, factory: Callable[..., Any], kwargs: dict[str, Any],
                  skip: tuple[str, ...] = ()) -> None:
    """Reject keyword arguments ``factory`` does not take, naming the ones it does.

    Only the binding is checked here; errors raised inside a user's factory keep their
    own traceback.
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a callable without an introspectable signature
        return
    params = signature.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    named = {n: p for n, p in params.items()
             if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(kwargs) - set(named))
    if unknown:
        raise UsageError(f"{name} takes no argument {', '.join(map(repr, unknown))}; "
                         f"it accepts {', '.join(named) or 'none'}", key="model.kwargs")
    missing = [n for n, p in named.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise UsageError(f"{name} needs argument {', '.join(map(repr, missing))}; "
                         f"set it in model.kwargs", key="model.kwargs")


def param_groups(model: nn.Module, weight_decay: float, lr_multipliers: Mapping[str, float] | None = None,
                 start_steps: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups, as nanoGPT: weight decay on matrices and embeddings
    (>= 2-D), which it regularises; none on biases and normalisation gains (1-D), which
    set offsets and scales rather than model capacity.

    Without weight decay the two are one group: DeepSpeed's ZeRO 1-2 step waits on the
    host for each group's gradient check in turn, a few milliseconds a group a step on a
    GPU (docs/benchmarks.md).

    Transfer learning splits them further, by each parameter's LR multiplier and the step
    it starts training at (by name; absent: 1 and 0): a group other than the base one
    carries its `lr_multiplier` and `start_step`, which LRSchedule applies."""
    multipliers, starts = lr_multipliers or {}, start_steps or {}
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for decays in (True, False):
        for name, p in named:
            if (p.dim() >= 2 and weight_decay > 0) != decays:
                continue
            multiplier, start = multipliers.get(name, 1.0), starts.get(name, 0)
            group = groups.get((multiplier, start, decays))
            if group is None:
                group = {"params": [], "weight_decay": weight_decay if decays else 0.0}
                group.update({"lr_multiplier": multiplier} if multiplier != 1.0 else {})
                group.update({"start_step": start} if start else {})
                groups[(multiplier, start, decays)] = group
            group["params"].append(p)
    # No empty groups: they trip up some optimizer wrappers (DeepSpeed's ZeRO flattens each group).
    return list(groups.values())
