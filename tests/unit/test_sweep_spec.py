"""A recipe's sweep: section is checked whole, each problem reported at its YAML line."""

from __future__ import annotations

import sys
import textwrap

import pytest

from launcher.errors import UsageError
from launcher.recipe import load_recipe
from launcher.sweep import Dimension, overrides_for, parse_sweep
from launcher.yamlio import apply_override, load_yaml, parse_override

EXAMPLE = """\
name: demo
sweep:
  metric: val_acc
  num_samples: 6
  max_concurrent: 2
  scheduler: {name: asha, grace_period: 1}
  space:
    optim.lr: {loguniform: [1.0e-4, 1.0e-1]}
    train.micro_batch_size: {choice: [16, 32]}
    model.kwargs.hidden: {randint: [32, 128]}
    optim.weight_decay: {grid: [0.0, 0.01]}
    schedule.warmup_fraction: {uniform: [0.0, 0.2]}
"""


def spec_of(tmp_path, text: str, overrides=()):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    recipe, source = load_recipe(path, list(overrides))
    data, _ = load_yaml(text)
    for override in overrides:
        apply_override(data, *parse_override(override))
    return parse_sweep(recipe, source, data)


def error_of(tmp_path, text: str, overrides=()) -> str:
    with pytest.raises(UsageError) as info:
        spec_of(tmp_path, text, overrides)
    return str(info.value)


def sweep(space: str, settings: str = "", before: str = "") -> str:
    """A recipe: the sections in `before`, then a sweep: with `settings` and `space`
    (one `key: distribution` per line)."""
    def block(text: str, indent: str) -> list[str]:
        return [indent + line for line in textwrap.dedent(text).strip().splitlines()]

    return "\n".join([*block(before, ""), "sweep:", *block(settings, "  "), "  space:",
                      *block(space, "    ")]) + "\n"


def line_of(text: str, start: str) -> int:
    """The line of `text` whose content starts with `start`."""
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.strip().startswith(start))


def test_the_example_becomes_a_spec(tmp_path):
    spec = spec_of(tmp_path, EXAMPLE)
    assert spec.dimensions == (
        Dimension("optim.lr", "loguniform", low=1e-4, high=1e-1),
        Dimension("train.micro_batch_size", "choice", values=(16, 32)),
        Dimension("model.kwargs.hidden", "randint", low=32, high=128),
        Dimension("optim.weight_decay", "grid", values=(0.0, 0.01)),
        Dimension("schedule.warmup_fraction", "uniform", low=0.0, high=0.2),
    )
    assert (spec.metric, spec.mode, spec.num_samples, spec.max_concurrent) == ("val_acc", "max", 6, 2)
    assert (spec.search, spec.seed, spec.scheduler.name, spec.scheduler.grace_period) == ("random", 0, "asha", 1)


def test_the_recipe_dump_checks_the_same_as_its_yaml(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(EXAMPLE)
    recipe, source = load_recipe(path)
    assert parse_sweep(recipe, source, recipe.model_dump(mode="json")) == spec_of(tmp_path, EXAMPLE)


@pytest.mark.parametrize("metric, mode, expected", [
    ("val_acc", "auto", "max"), ("val_loss", "auto", "min"), ("val_loss", "max", "max")])
def test_mode_auto_maximises_accuracy_only(tmp_path, metric, mode, expected):
    text = sweep("optim.lr: {choice: [0.1]}", f"metric: {metric}\nmode: {mode}")
    assert spec_of(tmp_path, text).mode == expected


def test_a_range_of_ints_on_a_float_key_is_kept_as_floats(tmp_path):
    (dim,) = spec_of(tmp_path, sweep("optim.lr: {uniform: [1, 2]}")).dimensions
    assert (dim.low, dim.high) == (1.0, 2.0) and isinstance(dim.low, float)


def test_keys_below_a_dict_field_are_the_users(tmp_path):
    text = sweep("""
        model.kwargs.hidden: {choice: [32, 64]}
        model.kwargs.block.depth: {randint: [1, 4]}
        engine.deepspeed_config.gradient_predivide_factor: {uniform: [1.0, 2.0]}
    """)
    assert [dim.key for dim in spec_of(tmp_path, text).dimensions] == [
        "model.kwargs.hidden", "model.kwargs.block.depth", "engine.deepspeed_config.gradient_predivide_factor"]


def test_a_list_valued_key_takes_lists(tmp_path):
    (dim,) = spec_of(tmp_path, sweep("optim.betas: {choice: [[0.9, 0.99], [0.9, 0.999]]}")).dimensions
    assert dim.values == ([0.9, 0.99], [0.9, 0.999])


def test_a_recipe_without_sweep_section(tmp_path):
    assert error_of(tmp_path, "name: a\n").startswith(
        "error: sweep: the recipe has no sweep: section; add one with the recipe keys to search")


def test_an_empty_space(tmp_path):
    message = error_of(tmp_path, "sweep:\n  metric: val_loss\n  space: {}\n")
    assert message.startswith("error: sweep.space (line 3): the search space is empty; add a recipe key")


@pytest.mark.parametrize("distribution, message", [
    ("{uniform: [0.1, 0.2], choice: [0.1]}", "give exactly one distribution, e.g. {loguniform: "
     "[1.0e-4, 1.0e-1]}; got uniform, choice"),
    ("{}", "give exactly one distribution, e.g. {loguniform: [1.0e-4, 1.0e-1]}; got none"),
    ("{logunifrom: [0.1, 0.2]}", "unknown distribution 'logunifrom'; did you mean 'loguniform'?"),
    ("{gauss: [0.1, 0.2]}", "unknown distribution 'gauss'; use one of choice, grid, uniform, "
     "loguniform, randint"),
    ("{choice: 0.1}", "choice needs a non-empty list of values, e.g. choice: [16, 32]"),
    ("{grid: []}", "grid needs a non-empty list of values, e.g. grid: [16, 32]"),
    ("{uniform: [0.1]}", "uniform needs a list of two numbers [low, high], e.g. uniform: [1.0e-4, 1.0e-1]"),
    ("{uniform: [0.1, 0.2, 0.3]}", "uniform needs a list of two numbers [low, high]"),
    ("{uniform: [0.1, '0.2']}", "uniform needs a list of two numbers [low, high]"),
    ("{uniform: [false, true]}", "uniform needs a list of two numbers [low, high]"),
    ("{uniform: [0.1, 0.01]}", "low 0.1 > high 0.01; write uniform: [low, high] with low below high"),
    ("{loguniform: [0.1, 0.1]}", "low 0.1 = high 0.1; write loguniform: [low, high] with low below high"),
    ("{loguniform: [0.0, 0.1]}", "loguniform needs low > 0, got 0.0; e.g. loguniform: [1.0e-4, 1.0e-1]"),
    ("{randint: [1.0, 4]}", "randint needs integer bounds, got [1.0, 4]; use uniform for floats"),
    ("{choice: [0.1, 0]}", "value 0: input should be greater than 0"),
    ("{choice: [0.1, fast]}", "value 'fast': input should be a valid number, got 'fast'"),
    ("{uniform: [-0.1, 0.1]}", "value -0.1: input should be greater than 0"),
])
def test_a_bad_distribution_is_reported_at_its_key_and_line(tmp_path, distribution, message):
    text = sweep(f"train.epochs: {{choice: [1.0]}}\noptim.lr: {distribution}")
    line = line_of(text, "optim.lr:")
    assert error_of(tmp_path, text).startswith(f"error: sweep.space.optim.lr (line {line}): {message}")


@pytest.mark.parametrize("key, message", [
    ("optim.lrr", "no such recipe key; did you mean 'optim.lr'?"),
    ("optm.lr", "no such recipe key; did you mean 'optim.lr'?"),
    ("model.kwarg.hidden", "no such recipe key; did you mean 'model.kwargs.hidden'?"),
    ("xyz", "no such recipe key; known keys here: name, model, data, optim"),
    ("optim", "optim is a section; sweep one of its keys (`dlaunch explain optim` lists them)"),
    ("train.early_stopping", "train.early_stopping is a section; sweep one of its keys"),
    ("optim.lr.peak", "optim.lr is a value, not a section; it has no key 'peak'"),
    ("optim..lr", "'optim..lr' is not a key path; write section.key, e.g. optim.lr"),
    ("name", "name cannot be swept: the sweep names each trial's run itself"),
    ("logging.run_root", "logging.run_root cannot be swept: the sweep puts each trial's run directory"),
    ("cluster.nodes", "cluster.nodes cannot be swept: a trial's placement is not a hyperparameter"),
    ("cluster.slurm.env.OMP_NUM_THREADS", "cluster.slurm.env.OMP_NUM_THREADS cannot be swept"),
    ("sweep.num_samples", "sweep.num_samples cannot be swept: the sweep cannot sweep its own settings"),
])
def test_a_key_that_names_no_hyperparameter(tmp_path, key, message):
    text = sweep(f"train.epochs: {{choice: [1.0]}}\n{key}: {{choice: [1]}}")
    line = line_of(text, f"{key}:")
    assert error_of(tmp_path, text).startswith(f"error: sweep.space.{key} (line {line}): {message}")


@pytest.mark.parametrize("key, distribution, message", [
    ("train.micro_batch_size", "{choice: [16, 0]}", "value 0: input should be greater than 0"),
    ("train.micro_batch_size", "{uniform: [16, 64]}",
     "train.micro_batch_size is an integer and uniform samples floats; use randint: [low, high]"),
    ("train.max_steps", "{loguniform: [10, 1000]}",
     "train.max_steps is an integer and loguniform samples floats; use randint: [low, high]"),
    ("schedule.warmup_fraction", "{uniform: [0.0, 1.0]}", "value 1.0: input should be less than 1"),
    # randint excludes high: [0, 4] reaches stage 3 only, [0, 5] reaches the impossible 4.
    ("engine.zero_stage", "{randint: [0, 5]}", "value 4: input should be less than or equal to 3"),
    ("optim.name", "{choice: [adamw, lamb]}", "value 'lamb': got 'lamb'; expected one of 'adamw', 'adam' or 'sgd'"),
    ("data.source", "{choice: [digits, parquet]}",
     "value 'parquet': data.path: data.source is parquet; set data.path to a .parquet file or folder"),
    ("model.kwargs", "{grid: [{hidden: 32}]}", "grid value {'hidden': 32} is a mapping; sweep its keys one "
     "by one, e.g. model.kwargs.KEY: {grid: [...]}"),
    ("data.val_fraction", "{choice: [0.2, 0.0]}",
     "value 0.0 leaves no validation split, so val_loss is never reported"),
])
def test_every_value_of_a_dimension_must_pass_the_schema(tmp_path, key, distribution, message):
    text = sweep(f"train.epochs: {{choice: [1.0]}}\n{key}: {distribution}")
    assert error_of(tmp_path, text) == f"error: sweep.space.{key} (line {line_of(text, key)}): {message}"


def test_a_valid_range_at_the_schemas_limits(tmp_path):
    text = sweep("engine.zero_stage: {randint: [0, 4]}\nschedule.warmup_fraction: {uniform: [0.0, 0.9]}")
    assert len(spec_of(tmp_path, text).dimensions) == 2


def test_a_metric_the_trainer_never_reports(tmp_path):
    text = sweep("optim.lr: {choice: [0.1]}", "metric: val_f1")
    assert error_of(tmp_path, text) == (f"error: sweep.metric (line {line_of(text, 'metric')}): 'val_f1' is "
                                        "never reported; the trainer reports val_loss and val_acc at each "
                                        "evaluation")


def test_a_metric_set_on_the_command_line_is_reported_as_such(tmp_path):
    message = error_of(tmp_path, sweep("optim.lr: {choice: [0.1]}"), ["sweep.metric=val_f1"])
    assert message.startswith("error: sweep.metric (--set): 'val_f1' is never reported")


def test_no_validation_split_means_no_metric(tmp_path):
    text = sweep("optim.lr: {choice: [0.1]}", "metric: val_acc", before="data: {val_fraction: 0.0}")
    assert error_of(tmp_path, text) == (
        f"error: sweep.metric (line {line_of(text, 'metric')}): data.val_fraction is 0, so there is no "
        "evaluation and val_acc is never reported; set data.val_fraction above 0, e.g. 0.2")


def test_a_swept_validation_split_replaces_the_recipes(tmp_path):
    text = sweep("data.val_fraction: {choice: [0.1, 0.2]}", before="data: {val_fraction: 0.0}")
    assert spec_of(tmp_path, text).dimensions[0].values == (0.1, 0.2)


def test_grid_search_takes_listed_values_only(tmp_path):
    text = sweep("optim.lr: {choice: [0.1, 0.2]}\noptim.weight_decay: {uniform: [0.0, 0.1]}", "search: grid")
    assert error_of(tmp_path, text) == (
        f"error: sweep.space.optim.weight_decay (line {line_of(text, 'optim.weight_decay')}): search grid tries listed values only, and uniform "
        "samples a range; list the values (grid: [...]) or use search: random")


def test_grid_search_takes_choice_as_grid(tmp_path):
    text = sweep("optim.lr: {choice: [0.1, 0.2]}\noptim.weight_decay: {grid: [0.0, 0.1]}", "search: grid")
    assert spec_of(tmp_path, text).search == "grid"


def test_optuna_samples_instead_of_enumerating_a_grid(tmp_path):
    text = sweep("optim.lr: {loguniform: [0.001, 0.1]}\noptim.weight_decay: {grid: [0.0, 0.1]}", "search: optuna")
    assert error_of(tmp_path, text) == (
        f"error: sweep.space.optim.weight_decay (line {line_of(text, 'optim.weight_decay')}): search optuna samples values, it does not enumerate "
        "a grid; write choice: [...] instead of grid: [...]")


def test_optuna_must_be_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what `import optuna` sees when it is not installed
    text = sweep("optim.lr: {loguniform: [0.001, 0.1]}", "search: optuna")
    assert error_of(tmp_path, text) == (f"error: sweep.search (line {line_of(text, 'search')}): search optuna "
                                        "needs Optuna; pip install optuna")


@pytest.mark.parametrize("search", ["optuna", "grid"])
def test_pbt_takes_random_search_only(tmp_path, search):
    text = sweep("optim.lr: {choice: [0.1, 0.2]}", f"search: {search}\nscheduler: {{name: pbt}}")
    assert error_of(tmp_path, text) == (f"error: sweep.search (line {line_of(text, 'search')}): scheduler pbt "
                                        f"mutates the trials' values itself; use search: random with it, "
                                        f"not {search}")


def test_pbt_refuses_a_population_run_a_few_at_a_time(tmp_path):
    text = sweep("optim.lr: {choice: [0.1, 0.2]}", "num_samples: 4\nmax_concurrent: 2\nscheduler: {name: pbt}")
    assert error_of(tmp_path, text) == (f"error: sweep.max_concurrent (line {line_of(text, 'max_concurrent')}): "
                                        "scheduler pbt trains its population of 4 side by side; set "
                                        "max_concurrent to 4 or leave it unset")


def test_pbt_refuses_weight_decay_values_both_zero_and_not(tmp_path):
    text = sweep("optim.weight_decay: {choice: [0.0, 0.1]}", "scheduler: {name: pbt}")
    assert error_of(tmp_path, text) == (
        f"error: sweep.space.optim.weight_decay (line {line_of(text, 'optim.weight_decay')}): scheduler pbt "
        "copies checkpoints between trials, and the optimizer of a trial without weight decay has one "
        "parameter group where the others have two; list values above 0 only (e.g. 1.0e-6 for hardly any)")
    assert spec_of(tmp_path, sweep("optim.weight_decay: {choice: [0.01, 0.1]}", "scheduler: {name: pbt}"))
    assert spec_of(tmp_path, sweep("optim.weight_decay: {choice: [0.0, 0.1]}", "scheduler: {name: asha}"))


def test_pbt_mutates_every_kind_of_dimension(tmp_path):
    text = sweep("optim.lr: {loguniform: [0.001, 0.1]}\ntrain.micro_batch_size: {grid: [16, 32]}",
                 "scheduler: {name: pbt}")
    assert spec_of(tmp_path, text).scheduler.name == "pbt"


def test_overrides_are_sorted_set_strings():
    config = {"optim": {"lr": 0.003, "betas": [0.9, 0.99]}, "model": {"kwargs": {"hidden": 64}}}
    assert overrides_for(config) == ["model.kwargs.hidden=64", "optim.betas=[0.9, 0.99]", "optim.lr=0.003"]


@pytest.mark.parametrize("value", [
    0.003, 1e-05, 3.0e-4, 1e16, 0.1 + 0.2, 2.0, -0.5, 64, 0, -3, True, False, None,
    "adamw", "3e-4", "true", "null", "off", "a: b", "", "ünïcode", [0.9, 0.999], [16, "x", True], [],
])
def test_overrides_round_trip_with_their_types(value):
    (override,) = overrides_for({"model": {"kwargs": {"v": value}}})
    keys, parsed = parse_override(override)
    assert keys == ("model", "kwargs", "v")
    assert parsed == value and type(parsed) is type(value)
    if isinstance(value, list):
        assert [type(item) for item in parsed] == [type(item) for item in value]
