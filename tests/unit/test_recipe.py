"""The recipe loader: YAML 1.2 numbers, strict types, errors with key path and line."""

from __future__ import annotations

import pytest

from launcher.errors import UsageError
from launcher.recipe import Recipe, explain, load_recipe


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(UsageError) as info:
        load_recipe(path, list(overrides))
    return str(info.value)


def test_defaults_are_best_practice():
    recipe = Recipe()
    assert recipe.optim.name == "adamw"
    assert recipe.schedule.name == "cosine" and recipe.schedule.warmup_fraction > 0
    assert recipe.train.clip_grad_norm == 1.0
    assert recipe.precision.dtype == "bf16"


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    recipe, _ = load_recipe(write(tmp_path, "optim:\n  lr: 3e-4\n"))
    assert recipe.optim.lr == pytest.approx(3e-4)


def test_only_true_and_false_are_booleans(tmp_path):
    recipe, _ = load_recipe(write(tmp_path, "name: off\nlogging:\n  tensorboard: false\n"))
    assert recipe.name == "off"
    assert recipe.logging.tensorboard is False


@pytest.mark.parametrize("text,expected", [
    ("optim:\n  lr: 1.0\n  lr: 2.0\n", "error: optim.lr (line 3): duplicate key; it was already set on line 2"),
    ("data: {source: digits, source: parquet}\n", "error: data.source (line 1): duplicate key"),
    ("optim: {lr: 1.0}\ntrain: {seed: 1}\noptim: {lr: 2.0}\n", "error: optim (line 3): duplicate key"),
])
def test_a_key_written_twice_is_refused_not_silently_overwritten(tmp_path, text, expected):
    assert error_of(write(tmp_path, text)).startswith(expected)


def test_unknown_key_names_path_line_and_suggestion(tmp_path):
    message = error_of(write(tmp_path, "name: a\noptim:\n  lr: 0.1\n  wieght_decay: 0.1\n"))
    assert message == "error: optim.wieght_decay (line 4): unknown key; did you mean 'weight_decay'?"


def test_unknown_section_suggests_the_section(tmp_path):
    message = error_of(write(tmp_path, "optimizer:\n  lr: 0.1\n"))
    assert message.startswith("error: optimizer (line 1): unknown key; did you mean 'optim'?")


def test_wrong_type_is_not_coerced(tmp_path):
    message = error_of(write(tmp_path, "train:\n  micro_batch_size: '8'\n"))
    assert message == "error: train.micro_batch_size (line 2): input should be a valid integer, got '8'"


def test_bad_choice_lists_the_choices(tmp_path):
    message = error_of(write(tmp_path, "engine:\n  name: deepspeeed\n"))
    assert "engine.name (line 2)" in message and "'deepspeed' or 'accelerate'" in message


def test_yaml_syntax_error_names_the_line(tmp_path):
    message = error_of(write(tmp_path, "optim:\n  lr: [0.1\ntrain: {}\n"))
    assert message.startswith("error: recipe.yaml (line ")
    assert "YAML syntax error" in message


def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    message = error_of(write(tmp_path, "name: !!python/object/apply:os.system ['true']\n"))
    assert "YAML syntax error" in message or "could not determine a constructor" in message


def test_overrides_are_typed_and_applied_before_validation(tmp_path):
    recipe, source = load_recipe(write(tmp_path, "optim:\n  lr: 0.1\n"),
                                 ["optim.lr=3e-4", "train.max_steps=7", "engine.name=accelerate"])
    assert recipe.optim.lr == pytest.approx(3e-4)
    assert recipe.train.max_steps == 7
    assert recipe.engine.name == "accelerate"
    assert ("optim", "lr") in source.overridden


def test_override_errors_say_they_came_from_set(tmp_path):
    message = error_of(write(tmp_path, "{}\n"), ["optim.lrr=1"])
    assert message == "error: optim.lrr (--set): unknown key; did you mean 'lr'?"


def test_malformed_override_is_explained(tmp_path):
    message = error_of(write(tmp_path, "{}\n"), ["optim.lr"])
    assert "key.path=value" in message


def test_parquet_source_needs_a_path(tmp_path):
    # A rule across fields names the line of the nearest key the recipe has: data.
    message = error_of(write(tmp_path, "name: x\ndata:\n  source: parquet\n"))
    assert message.startswith("error: data.path (line 2):")


def test_missing_recipe_file():
    assert "does not exist" in error_of("/nonexistent/recipe.yaml")


def test_explain_reads_the_schema_docstrings():
    text = explain("optim.scaling")
    assert "sqrt" in text and "default: 'auto'" in text
    with pytest.raises(UsageError, match="did you mean 'optim.lr'"):
        explain("optim.lrr")


def test_a_list_of_sections_is_explained_with_its_items_keys(tmp_path):
    text = explain("model.unfreeze")
    assert text.startswith("model.unfreeze: a list; each item has the keys below\n  Gradual unfreezing")
    assert "\n  at_step: Optimizer step from which the parameters train" in text
    recipe = "model:\n  freeze: [a.*]\n  unfreeze:\n    - {at_step: 3, patterns: [a.*], until: 9}\n"
    message = error_of(write(tmp_path, recipe))
    assert message == "error: model.unfreeze.0.until (line 4): unknown key; known keys: at_step, patterns"
