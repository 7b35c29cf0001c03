"""A SweepSpec in Ray Tune's terms: the param space, the search algorithm, the scheduler.

Only `dlaunch sweep` imports this module, so Ray is imported at the top.

Who holds what, as Ray Tune 2.60 requires (ray/tune/tune.py, `run`):

* metric and mode live on the scheduler (ASHA, PBT) and on OptunaSearch, not on
  TuneConfig: Tune raises when both a scheduler and TuneConfig set them. FIFOScheduler
  takes neither, so with fifo they may go to TuneConfig (OptunaSearch accepts the same
  values again). Pass them to ``ResultGrid.get_best_result`` explicitly either way.
* the space lives on the Tuner (``param_space``); OptunaSearch is built without one
  and converts ``param_space`` when Tune calls its ``set_search_properties``. A
  searcher built with a space refuses an unresolved ``param_space``.
* concurrency: TuneConfig's ``max_concurrent_trials`` makes Tune wrap a Searcher
  (OptunaSearch) in a ConcurrencyLimiter itself, but a SearchAlgorithm passed in ready
  made (our seeded BasicVariantGenerator) is not wrapped: Tune ignores the setting and
  logs a warning saying so. So the BasicVariantGenerator carries ``max_concurrent``
  itself, and OptunaSearch is left for TuneConfig to wrap; a caller that sets
  ``max_concurrent_trials`` only with search optuna avoids the warning.
"""

from __future__ import annotations

import functools
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search import BasicVariantGenerator, SearchAlgorithm, Searcher

from launcher.errors import UsageError
from launcher.sweep import Dimension, SweepSpec

_RANGES = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The Tuner's ``param_space``, nested by key path: ``{"optim": {"lr": loguniform}}``.
    Nested, not dotted, because Tune and Optuna flatten nested keys with "/" and hand
    the trial a nested config again, which ``overrides_for`` reads back."""
    return _nest({dim.key: _domain(dim, spec.search) for dim in spec.dimensions})


def search_algorithm(spec: SweepSpec) -> SearchAlgorithm | Searcher:
    """Tune's ``search_alg``: a BasicVariantGenerator seeded with ``spec.seed`` (random
    and grid; it expands grid_search values and samples the rest) and limited to
    ``spec.max_concurrent`` trials, or OptunaSearch with a seeded TPE sampler and the
    spec's metric and mode. OptunaSearch is not limited here: the caller sets
    ``TuneConfig(max_concurrent_trials=spec.max_concurrent)`` and Tune wraps it."""
    if spec.search == "optuna":
        # Imported here: Optuna is needed by search optuna only (parse_sweep checks it is there).
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=spec.metric, mode=spec.mode,
                            sampler=optuna.samplers.TPESampler(seed=spec.seed))
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent or 0)


def trial_scheduler(spec: SweepSpec, max_t: int) -> TrialScheduler:
    """Tune's ``scheduler``. ``max_t``: the evaluations a full trial makes, one
    ``training_iteration`` per evaluation reported.

    ASHA and PBT hold the spec's metric and mode, so TuneConfig must not set them;
    FIFOScheduler holds none. PBT mutates every dimension and clamps a mutated range
    value into its bounds, which parse_sweep validated. Tune 2.60's PBT takes no seed
    (it draws from the ``random`` module), so its mutations are not reproducible.
    """
    config = spec.scheduler
    if config.name == "fifo":
        return FIFOScheduler()
    if config.name == "asha":
        if config.grace_period > max_t:
            raise UsageError(f"grace_period {config.grace_period} exceeds the {max_t} evaluations a trial "
                             "makes; lower it, or evaluate more often (train.eval_every)",
                             key="sweep.scheduler.grace_period")
        return ASHAScheduler(time_attr="training_iteration", metric=spec.metric, mode=spec.mode, max_t=max_t,
                             grace_period=config.grace_period, reduction_factor=config.reduction_factor)
    if config.perturbation_interval >= max_t:
        raise UsageError(f"perturbation_interval {config.perturbation_interval} leaves no evaluation after "
                         f"a perturbation in the {max_t} a trial makes; lower it, or evaluate more often "
                         "(train.eval_every)", key="sweep.scheduler.perturbation_interval")
    ranges = {dim.key: dim.extremes for dim in spec.dimensions if dim.values is None}
    return PopulationBasedTraining(
        time_attr="training_iteration", metric=spec.metric, mode=spec.mode,
        perturbation_interval=config.perturbation_interval, synch=config.synch,
        hyperparam_mutations=_nest({dim.key: _mutation(dim) for dim in spec.dimensions}),
        # A partial of a module function, not a closure: Tune pickles the scheduler
        # into its experiment state.
        custom_explore_fn=functools.partial(_clamp, ranges))


def tune_checkpoints(spec: SweepSpec) -> tune.CheckpointConfig:
    """How many of a trial's checkpoints Tune keeps. Under PBT a trial hands Tune one at
    every evaluation, and Tune copies each into SWEEP_DIR/tune; its default keeps them
    all, which fills the disk in a long sweep of a large model. The checkpoint a better
    trial has at a decision is what worse trials start from until its next decision,
    ``perturbation_interval`` evaluations later; twice that and one more leaves room for
    a clone that starts late (Tune warns that keeping 2 or fewer can delete a checkpoint
    a clone still needs)."""
    if spec.scheduler.name != "pbt":
        return tune.CheckpointConfig()  # the other schedulers are given none
    return tune.CheckpointConfig(num_to_keep=2 * spec.scheduler.perturbation_interval + 1)


def _clamp(ranges: dict[str, tuple[float, float]], config: dict[str, Any]) -> dict[str, Any]:
    """Move each ranged value of a trial config back into its [low, high]: PBT perturbs
    by a factor (x0.8, x1.2) and would otherwise leave the bounds, and with them the
    values that were checked against the recipe schema."""
    for key, (low, high) in ranges.items():
        *sections, name = key.split(".")
        node = functools.reduce(dict.__getitem__, sections, config)
        node[name] = min(max(node[name], low), high)
    return config


def _domain(dim: Dimension, search: str) -> Any:
    if dim.kind == "grid" or (dim.kind == "choice" and search == "grid"):
        return tune.grid_search(list(dim.values))
    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    return _RANGES[dim.kind](dim.low, dim.high)


def _mutation(dim: Dimension) -> Any:
    """PBT's form: a list for listed values (a mutation moves to a neighbour), a domain
    for a range (a mutation scales the value, or resamples it)."""
    return list(dim.values) if dim.values is not None else _RANGES[dim.kind](dim.low, dim.high)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return nested
