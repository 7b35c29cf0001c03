"""A recipe's ``sweep:`` section, checked whole before any trial starts.

``parse_sweep`` turns the section into a ``SweepSpec``: every key path names a recipe
field that a trial may change, every distribution is well formed, every value (and both
bounds of a range) passes the recipe schema, and the metric is one the trainer reports.
A sweep that would fail in its tenth trial fails here, as a ``UsageError`` at the
line of the offending key.

Pure: no Ray import, no I/O; cluster/tune_space.py turns the spec into Tune objects,
and ``overrides_for`` turns a trial's config back into ``--set`` overrides.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from launcher.errors import UsageError
from launcher.recipe import Recipe, SweepConfig, SweepSchedulerConfig, has_validation, recipe_from_data
from launcher.yamlio import KeyPath, SourceMap, apply_override

Kind = Literal["choice", "grid", "uniform", "loguniform", "randint"]
KINDS: tuple[str, ...] = typing.get_args(Kind)
RANGES = ("uniform", "loguniform", "randint")

REPORTED_METRICS = ("val_loss", "val_acc")
"""What the trainer reports at every evaluation, and so all a sweep can optimise."""

# Keys that decide where a trial runs or where its records go: the sweep sets them per
# trial, or they are the same for all trials by design.
_NOT_HYPERPARAMETERS = {
    "sweep": "the sweep cannot sweep its own settings",
    "name": "the sweep names each trial's run itself",
    "logging.run_root": "the sweep puts each trial's run directory in the sweep directory",
    "cluster": "a trial's placement is not a hyperparameter; set it once, outside sweep:",
}


@dataclass(frozen=True)
class Dimension:
    """One axis of the search: a recipe key path and the distribution of its values."""

    key: str
    kind: Kind
    values: tuple[Any, ...] | None = None
    """choice and grid: the values to try."""
    low: float | int | None = None
    """uniform, loguniform, randint: the lower bound (included)."""
    high: float | int | None = None
    """uniform, loguniform: the upper bound; randint: the bound above the largest value."""

    @property
    def extremes(self) -> tuple[float | int, float | int]:
        """A range's smallest and largest value: randint excludes its high, as Tune does."""
        return (self.low, self.high - 1) if self.kind == "randint" else (self.low, self.high)


@dataclass(frozen=True)
class SweepSpec:
    """A checked sweep: what cluster/tune_space.py builds Tune's objects from."""

    dimensions: tuple[Dimension, ...]
    metric: str
    mode: Literal["min", "max"]
    num_samples: int
    max_concurrent: int | None
    search: Literal["random", "grid", "optuna"]
    seed: int
    scheduler: SweepSchedulerConfig


def parse_sweep(recipe: Recipe, source: SourceMap, base_data: dict[str, Any]) -> SweepSpec:
    """Check ``recipe.sweep`` in full and return it as a SweepSpec.

    ``base_data`` is the recipe as a mapping (parsed YAML after ``--set``): each value
    of the space is applied to a copy of it and validated by the schema, exactly as a
    trial's override will be.
    """
    sweep = recipe.sweep
    if sweep is None:
        raise UsageError("the recipe has no sweep: section; add one with the recipe keys to search, "
                         "e.g. sweep: {space: {optim.lr: {loguniform: [1.0e-4, 1.0e-1]}}}", key="sweep")
    if not sweep.space:
        raise _error(source, ("sweep", "space"), "the search space is empty; add a recipe key and its "
                     "distribution, e.g. optim.lr: {loguniform: [1.0e-4, 1.0e-1]}")
    _check_metric(recipe, source)
    dimensions = tuple(_dimension(key, dist, source, base_data, sweep.metric)
                       for key, dist in sweep.space.items())
    _check_search(sweep.search, sweep.scheduler.name, dimensions, source)
    _check_population(sweep, source)
    _check_copied_optimizers(sweep.scheduler.name, dimensions, source)
    mode = sweep.mode
    if mode == "auto":
        mode = "max" if "acc" in sweep.metric else "min"
    return SweepSpec(dimensions=dimensions, metric=sweep.metric, mode=mode, num_samples=sweep.num_samples,
                     max_concurrent=sweep.max_concurrent, search=sweep.search, seed=sweep.seed,
                     scheduler=sweep.scheduler)


def overrides_for(config: dict[str, Any]) -> list[str]:
    """A trial's config (nested as param_space builds it) as ``--set`` overrides,
    sorted by key: ``{"optim": {"lr": 0.003}}`` -> ``["optim.lr=0.003"]``. JSON is
    valid YAML flow syntax, so ``parse_override`` reads each value back with its type."""
    return [f"{key}={json.dumps(value)}" for key, value in sorted(_flatten(config, ()))]


def _flatten(config: dict[str, Any], prefix: tuple[str, ...]) -> list[tuple[str, Any]]:
    # A mapping is always a level of the key path: parse_sweep refuses mapping values.
    items = []
    for name, value in config.items():
        path = (*prefix, str(name))
        items.extend(_flatten(value, path) if isinstance(value, dict) else [(".".join(path), value)])
    return items


def _error(source: SourceMap, path: KeyPath, message: str) -> UsageError:
    """An error at ``path``, with the line it was written on. The path is a tuple
    because a space key holds dots: ("sweep", "space", "optim.lr")."""
    line, origin = source.locate(path)
    return UsageError(message, key=".".join(map(str, path)), line=line, origin=origin)


def _dimension(key: str, distribution: dict[str, Any], source: SourceMap, base_data: dict[str, Any],
               metric: str) -> Dimension:
    path = ("sweep", "space", key)
    try:
        annotation = _field_type(key)
        dim = _parse_distribution(key, distribution, annotation)
        _check_values(dim, base_data, metric)
    except UsageError as err:
        raise _error(source, path, err.message) from None
    return dim


def _field_type(key: str) -> Any:
    """The annotation of the recipe field ``key`` names (Any below a dict-typed field,
    where every sub-key is the user's), or a UsageError saying why it cannot be swept."""
    for prefix, reason in _NOT_HYPERPARAMETERS.items():
        if key == prefix or key.startswith(prefix + "."):
            raise UsageError(f"{key} cannot be swept: {reason}")
    parts = key.split(".")
    if not all(parts) or "=" in key:
        raise UsageError(f"{key!r} is not a key path; write section.key, e.g. optim.lr")
    model: type[BaseModel] = Recipe
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            known = list(model.model_fields)
            guess = difflib.get_close_matches(part, known, n=1)
            hint = (f"did you mean {'.'.join([*parts[:depth], guess[0], *parts[depth + 1:]])!r}?" if guess
                    else f"known keys here: {', '.join(known)}")
            raise UsageError(f"no such recipe key; {hint}")
        annotation = field.annotation
        section = _section(annotation)
        if section is None:
            if depth == len(parts) - 1:
                return annotation
            if typing.get_origin(annotation) is dict:
                return Any  # model.kwargs.hidden: the keys of a dict belong to the user
            raise UsageError(f"{'.'.join(parts[:depth + 1])} is a value, not a section; "
                             f"it has no key {parts[depth + 1]!r}")
        model = section
    raise UsageError(f"{key} is a section; sweep one of its keys (`dlaunch explain {key}` lists them)")


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section a field holds, unwrapping an optional one (`SweepConfig | None`)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_distribution(key: str, distribution: dict[str, Any], annotation: Any) -> Dimension:
    if len(distribution) != 1:
        got = ", ".join(map(str, distribution)) or "none"
        raise UsageError(f"give exactly one distribution, e.g. {{loguniform: [1.0e-4, 1.0e-1]}}; got {got}")
    (kind, args), = distribution.items()
    if kind not in KINDS:
        guess = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f"did you mean {guess[0]!r}?" if guess else f"use one of {', '.join(KINDS)}"
        raise UsageError(f"unknown distribution {kind!r}; {hint}")
    if kind in ("choice", "grid"):
        return _listed(key, kind, args)
    return _ranged(key, kind, args, annotation)


def _listed(key: str, kind: Kind, values: Any) -> Dimension:
    if not isinstance(values, list) or not values:
        raise UsageError(f"{kind} needs a non-empty list of values, e.g. {kind}: [16, 32]")
    for value in values:
        if isinstance(value, dict):
            # A trial's config nests by key path; a mapping value would read as more path.
            # (So only a dict field's keys are swept, never the dict and a key below it.)
            raise UsageError(f"{kind} value {value!r} is a mapping; sweep its keys one by one, "
                             f"e.g. {key}.KEY: {{{kind}: [...]}}")
    return Dimension(key=key, kind=kind, values=tuple(values))


def _ranged(key: str, kind: Kind, bounds: Any, annotation: Any) -> Dimension:
    example = "[16, 128]" if kind == "randint" else "[1.0e-4, 1.0e-1]"
    if not isinstance(bounds, list) or len(bounds) != 2 or not all(map(_is_number, bounds)):
        raise UsageError(f"{kind} needs a list of two numbers [low, high], e.g. {kind}: {example}")
    low, high = bounds
    if low >= high:
        raise UsageError(f"low {low} {'>' if low > high else '='} high {high}; write {kind}: [low, high] "
                         "with low below high")
    if kind == "randint":
        if not all(isinstance(bound, int) for bound in bounds):
            raise UsageError(f"randint needs integer bounds, got [{low}, {high}]; use uniform for floats")
        return Dimension(key=key, kind=kind, low=low, high=high)
    if kind == "loguniform" and low <= 0:
        raise UsageError(f"loguniform needs low > 0, got {low}; e.g. loguniform: {example}")
    if _takes_only_ints(annotation):
        raise UsageError(f"{key} is an integer and {kind} samples floats; use randint: [low, high]")
    return Dimension(key=key, kind=kind, low=float(low), high=float(high))


def _takes_only_ints(annotation: Any) -> bool:
    """``int`` or ``int | None``: a strict int field, which refuses 16.0."""
    types = typing.get_args(annotation) or (annotation,)
    return int in types and float not in types


def _samples(dim: Dimension) -> tuple[Any, ...]:
    """The values whose validity stands for every value the dimension can take: each
    listed value, or a range's extremes (the schema's numeric limits are bounds)."""
    return dim.values if dim.values is not None else dim.extremes


def _check_values(dim: Dimension, base_data: dict[str, Any], metric: str) -> None:
    """Validate the recipe with each sample of ``dim`` set, as a trial's --set would."""
    for value in _samples(dim):
        data = copy.deepcopy(base_data)
        try:
            apply_override(data, tuple(dim.key.split(".")), value)
            trial = recipe_from_data(data, SourceMap())
        except UsageError as err:
            where = f"{err.key}: " if err.key and err.key != dim.key else ""
            raise UsageError(f"value {value!r}: {where}{err.message}") from None
        if not has_validation(trial.data):
            raise UsageError(f"value {value!r} leaves no validation split, so {metric} is never reported")


def _check_metric(recipe: Recipe, source: SourceMap) -> None:
    metric = recipe.sweep.metric
    if metric not in REPORTED_METRICS:
        raise _error(source, ("sweep", "metric"), f"{metric!r} is never reported; the trainer reports "
                     "val_loss and val_acc at each evaluation")
    # A swept val_fraction replaces this one in every trial; _check_values checks its values.
    if not has_validation(recipe.data) and "data.val_fraction" not in recipe.sweep.space:
        raise _error(source, ("sweep", "metric"), f"data.val_fraction is 0, so there is no evaluation "
                     f"and {metric} is never reported; set data.val_fraction above 0, e.g. 0.2")


def _check_population(sweep: SweepConfig, source: SourceMap) -> None:
    """PBT copies the better trials' weights into the worse ones while they train side by
    side; a population run a few at a time has no one to copy from (Tune would go on
    regardless and the sweep would be random search with extra pauses)."""
    if sweep.scheduler.name == "pbt" and sweep.max_concurrent is not None \
            and sweep.max_concurrent < sweep.num_samples:
        raise _error(source, ("sweep", "max_concurrent"), f"scheduler pbt trains its population of "
                     f"{sweep.num_samples} side by side; set max_concurrent to {sweep.num_samples} "
                     "or leave it unset")


def _check_copied_optimizers(scheduler: str, dimensions: tuple[Dimension, ...], source: SourceMap) -> None:
    """PBT loads one trial's checkpoint, optimizer state included, into another trial. A
    trial without weight decay has one parameter group where one with it has two
    (launcher/models/build.py), and the state of one does not load into the other."""
    if scheduler != "pbt":
        return
    for dim in dimensions:
        if dim.key == "optim.weight_decay" and dim.values is not None \
                and 0 in dim.values and any(value != 0 for value in dim.values):
            raise _error(source, ("sweep", "space", dim.key), "scheduler pbt copies checkpoints between "
                         "trials, and the optimizer of a trial without weight decay has one parameter group "
                         "where the others have two; list values above 0 only (e.g. 1.0e-6 for hardly any)")


def _check_search(search: str, scheduler: str, dimensions: tuple[Dimension, ...],
                  source: SourceMap) -> None:
    for dim in dimensions:
        path = ("sweep", "space", dim.key)
        if search == "grid" and dim.kind in RANGES:
            raise _error(source, path, f"search grid tries listed values only, and {dim.kind} samples a "
                         "range; list the values (grid: [...]) or use search: random")
        if search == "optuna" and dim.kind == "grid":
            raise _error(source, path, "search optuna samples values, it does not enumerate a grid; "
                         "write choice: [...] instead of grid: [...]")
    if search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise _error(source, ("sweep", "search"), "search optuna needs Optuna; pip install optuna")
    if scheduler == "pbt" and search != "random":
        # PBT explores by mutating running trials; a searcher choosing new ones would
        # fight it (and Tune's PBT expects the plain variant generator).
        raise _error(source, ("sweep", "search"), f"scheduler pbt mutates the trials' values itself; "
                     f"use search: random with it, not {search}")
