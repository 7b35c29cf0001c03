"""What the planner knows about the model of a transfer-learning recipe (``model.init_from``,
``freeze``, ``unfreeze``, ``optim.lr_multipliers``): where its initial weights come from
and how many of its parameters train. Plain values, no torch: the plan holds them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from launcher.data.facts import DataFacts
    from launcher.recipe import Recipe

WeightsFormat = Literal["torch", "safetensors", "deepspeed"]


@dataclass(frozen=True)
class WeightsSource:
    path: str
    """Absolute: a torch or safetensors file, or a DeepSpeed checkpoint's tag folder."""
    format: WeightsFormat


@dataclass(frozen=True)
class ModelFacts:
    init: WeightsSource | None
    """The weights ``model.init_from`` names, resolved; None: the model's own initialisation."""
    params: int | None = None
    """Parameters (scalars) of the model; None for a ``model.target`` model, which is not
    built before the run."""
    frozen: int | None = None
    """Of them, frozen at the start (by ``model.freeze``)."""
    unfrozen_later: int | None = None
    """Of the frozen ones, those that ``model.unfreeze`` starts training at a later step."""


def uses_transfer(recipe: Recipe) -> bool:
    """Whether the recipe sets initial weights, freezes parameters or scales LRs: only then
    does planning build the model (and import torch) to check its patterns."""
    model = recipe.model
    return bool(model.init_from or model.freeze or model.unfreeze or recipe.optim.lr_multipliers)


def model_facts(recipe: Recipe, data: DataFacts) -> ModelFacts | None:
    """The model facts of a transfer-learning recipe, checked against the model; None for
    any other. The one part of planning that imports torch, for the recipes that need it."""
    if not uses_transfer(recipe):
        return None
    from launcher.models.transfer import describe_model

    return describe_model(recipe, data)
