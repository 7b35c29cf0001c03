"""Hostile recipes and overrides the fuzzer (test_recipe_fuzz.py) found, each kept here as
the plain example it shrank to: every one ends as one line `error: ...`, fast, never as
a traceback, a hang or a machine out of memory."""

from __future__ import annotations

import time

import pytest
import yaml

from launcher.errors import UsageError
from launcher.recipe import Recipe, load_recipe
from launcher.yamlio import MAX_DEPTH, dump_yaml, parse_override


def error_of(tmp_path, text: str, overrides=()) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_recipe(path, list(overrides))
    return str(info.value)


@pytest.mark.parametrize("text,line", [
    ("[" * 5000 + "]" * 5000, 1),
    ("{a: " * 5000 + "1" + "}" * 5000, 1),
    ("model:\n  kwargs:\n    x: " + "[" * 100_000, 3),
    ("".join(" " * depth + "a:\n" for depth in range(200)) + " " * 200 + "b: 1\n", MAX_DEPTH),
])
def test_a_document_nested_past_the_stack_is_refused_where_it_gets_too_deep(tmp_path, text, line):
    started = time.perf_counter()
    message = error_of(tmp_path, text)
    assert message == f"error: recipe.yaml (line {line}): YAML document refused: nested more than 64 levels deep"
    assert time.perf_counter() - started < 5, "the scanner must not go quadratic on `[[[[...`"


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    lines = ["model:", "  kwargs:", "    l0: &l0 [lol]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_billion_laughs_are_refused_before_they_are_expanded(tmp_path):
    message = error_of(tmp_path, billion_laughs())
    assert message.startswith("error: recipe.yaml (line 8): YAML document refused: more than 100000 values "
                              "once its aliases are followed")


def test_small_aliases_are_still_yaml(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  kwargs: {hidden: &h [8, 8]}\nsweep:\n  space:\n    optim.lr: &lr {choice: [0.1]}\n"
                    "    optim.weight_decay:\n      <<: *lr\n      choice: [0.01]\n")
    recipe, _ = load_recipe(path)
    assert recipe.sweep.space["optim.weight_decay"] == {"choice": [0.01]}  # `<<` merged, then overridden


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "model:\n  kwargs: &k {x: *k}\n", "optim: &o\n  lr: 1\n  <<: *o\n"])
def test_an_alias_inside_what_it_names_is_refused(tmp_path, text):
    assert "YAML document refused: an alias refers to a node that contains it" in error_of(tmp_path, text)


FLOW_LAUGHS = "[&l0 [lol], " + ", ".join(f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)) + "]"


@pytest.mark.parametrize("spec", ["model.kwargs.x=" + "[" * 5000, "model.kwargs.x=&a [*a]",
                                  "model.kwargs.x=" + FLOW_LAUGHS])
def test_a_hostile_override_value_stays_text(spec):
    keys, value = parse_override(spec)
    assert keys == ("model", "kwargs", "x") and value == spec.partition("=")[2]


@pytest.mark.parametrize("text,message", [
    ("train:\n  seed: " + "9" * 5000 + "\n", "error: recipe.yaml (line 2): YAML syntax error: an integer of 5000 digits is too long"),
    ("optim:\n  lr: !!float fast\n", "error: recipe.yaml (line 2): YAML syntax error: cannot read 'fast' as !!float"),
    ("optim: !!float\n", "error: recipe.yaml (line 1): YAML syntax error: cannot read '' as !!float"),
    ("name: !!timestamp soon\n", "error: recipe.yaml (line 1): YAML syntax error: cannot read 'soon' as !!timestamp"),
    ("name: x\ntrain:\n  seed: 1\x00\n", "error: recipe.yaml (line 3): YAML syntax error: character U+0000 is not "
                                         "allowed in YAML"),
])
def test_a_value_python_cannot_build_is_a_syntax_error_at_its_line(tmp_path, text, message):
    assert error_of(tmp_path, text) == message


@pytest.mark.parametrize("text,message", [
    ('"a\\nb": 1\n', "error: a\\nb (line 1): unknown key"),
    ('optim:\n  "l\\u2028r": 1\n', "error: optim.l\\u2028r (line 2): unknown key"),
    ('"\\e[2J": 1\n', "error: \\x1b[2J (line 1): unknown key"),
])
def test_an_error_is_one_line_of_visible_characters_whatever_the_key(tmp_path, text, message):
    assert error_of(tmp_path, text).startswith(message)


@pytest.mark.parametrize("text,message", [
    ("~: 1\n", "error: recipe.yaml: key None is not text; put it in quotes"),
    ("optim:\n  1: 2\n", "error: optim (line 1): key 1 is not text; put it in quotes"),
    ("cluster:\n  slurm:\n    env: {1: a}\n", "error: cluster.slurm.env (line 3): key 1 is not text; put it in quotes"),
])
def test_a_key_that_is_not_text_is_named_with_its_section(tmp_path, text, message):
    assert error_of(tmp_path, text) == message


@pytest.mark.parametrize("text,overrides,message", [
    ("optim:\n  lr: .inf\n", [], "error: optim.lr (line 2): inf is not a finite number"),
    ("optim:\n  lr: 1e999\n", [], "error: optim.lr (line 2): inf is not a finite number"),
    ("model:\n  kwargs:\n    dropout: .nan\n", [], "error: model.kwargs.dropout (line 3): nan is not a finite number"),
    ("sweep:\n  space:\n    optim.lr: {uniform: [0.1, .inf]}\n", [],
     "error: sweep.space.optim.lr.uniform.1 (line 3): inf is not a finite number"),
    ("{}\n", ["data.mean=[0.5, -.inf, 0.5]"], "error: data.mean.1 (--set): -inf is not a finite number"),
    ("train:\n  seed: 9223372036854775808\n", [],
     "error: train.seed (line 2): an integer of 19 digits does not fit in 64 bits"),
    ("engine:\n  deepspeed_config: {steps_per_print: " + "9" * 400 + "}\n", [],
     "error: engine.deepspeed_config.steps_per_print (line 2): an integer of 400 digits does not fit in 64 bits"),
])
def test_a_number_json_or_torch_cannot_carry_is_refused_at_its_key(tmp_path, text, overrides, message):
    """plan.json, which every worker reads, has no Infinity or NaN (pydantic writes null,
    and the worker's read of the plan failed), and torch takes 64-bit integers."""
    assert error_of(tmp_path, text, overrides) == message


def test_the_largest_64_bit_seed_is_a_seed(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"train:\n  seed: {2**63 - 1}\n")
    assert load_recipe(path)[0].train.seed == 2**63 - 1


def test_recipe_yaml_reads_back_as_the_recipe_when_a_text_looks_like_a_number(tmp_path):
    """PyYAML writes `1e3` plain (YAML 1.1 wants a dot in a float), and dlaunch reads it
    as YAML 1.2 does, as 1000.0: a sweep resumed from its recipe.yaml found a number
    for a name."""
    recipe = Recipe.model_validate({"name": "1e3", "data": {"label_column": "2E-5"},
                                    "model": {"kwargs": {"act": "+1e3", "flag": "off"}}})
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_yaml(recipe.model_dump(mode="json")))
    assert load_recipe(path)[0] == recipe
    assert yaml.safe_load(path.read_text())["model"]["kwargs"]["flag"] == "off"  # and YAML 1.1 readers too


LONG = "x" * 300  # past NAME_MAX (255): stat() fails with ENAMETOOLONG, which pathlib lets out


def test_a_data_path_the_os_cannot_look_up_is_a_data_path_error():
    from launcher.data.facts import describe

    recipe = Recipe.model_validate({"data": {"source": "parquet", "path": LONG}})
    with pytest.raises(UsageError) as info:
        describe(recipe.data)
    assert str(info.value) == f"error: data.path: cannot read '{LONG}': File name too long"


@pytest.mark.parametrize("path,problem", [(LONG, f"cannot read '{LONG}': File name too long"),
                                          ("~no-such-user/model.pt", "'~no-such-user/model.pt': no such user's "
                                                                     "home directory")])
def test_initial_weights_the_os_cannot_look_up_are_an_init_from_error(path, problem):
    from launcher.models.weights import resolve

    with pytest.raises(UsageError) as info:
        resolve(path)
    assert str(info.value) == f"error: model.init_from: {problem}"


def test_a_run_root_the_os_cannot_look_up_is_a_run_root_error(tmp_path):
    from launcher.rundir import new_run_dir

    with pytest.raises(UsageError) as info:
        new_run_dir(tmp_path / LONG, "run", "20260101-000000")
    assert str(info.value) == f"error: logging.run_root: cannot use '{tmp_path / LONG}/run-20260101-000000': " \
                              "File name too long"


@pytest.mark.parametrize("text,overrides,message", [
    ('model:\n  kwargs:\n    act: "\\ud800\\udc00"\n', [], "error: model.kwargs.act (line 3): the text holds a lone UTF-16 "
                                                            "surrogate"),
    ("{}\n", ['model.kwargs.x={"\\udc00": 1}'], "error: model.kwargs.x.\\udc00 (--set): the key holds a lone UTF-16 "
                                                 "surrogate"),
])
def test_text_utf8_cannot_encode_is_refused_at_its_key(tmp_path, text, overrides, message):
    """YAML's "\\ud800" escapes give Python a lone surrogate, which passed the free-form
    model.kwargs and then failed plan.json's UTF-8 with a traceback."""
    assert error_of(tmp_path, text, overrides).startswith(message)


def test_synthetic_data_of_two_billion_classes_is_described_without_counting_each():
    """Planning built a dict of every label's row count: 2**31 entries, MemoryError (or
    all the machine's memory) before the plan was made."""
    from launcher.data.facts import describe

    recipe = Recipe.model_validate({"data": {"source": "synthetic", "num_classes": 2**31}})
    assert describe(recipe.data).num_classes == 2**31
    listed = Recipe.model_validate({"data": {"source": "synthetic", "num_classes": 2**31, "samples": 100,
                                             "classes": [1, 200]}})
    with pytest.raises(UsageError, match="class 200 has no rows; the data's labels are 0..99"):
        describe(listed.data)


def test_a_run_of_a_trillion_snapshot_cycles_is_refused_not_listed(tmp_path):
    """The planner listed every cycle's end for schedule.snapshots: max_steps 10**12 in
    one-step cycles never finished planning."""
    from launcher.data.facts import describe
    from launcher.plan import HostFacts, build_plan

    path = tmp_path / "recipe.yaml"
    path.write_text("data: {source: synthetic, samples: 64}\nprecision: {dtype: fp32}\n"
                    "schedule: {name: cosine_restarts, snapshots: true, restart_period: 1, min_lr_ratio: 0}\n"
                    "train: {max_steps: 1000000000000, early_stopping: {patience: null}}\n")
    recipe, _ = load_recipe(path)
    with pytest.raises(UsageError) as info:
        build_plan(recipe, host=HostFacts(has_cuda=False, cpus=2, hostname="h"), data=describe(recipe.data),
                   run_dir=str(tmp_path / "run"))
    assert str(info.value) == ("error: schedule.restart_period: 950000000000 warm-restart cycles would save "
                               "950000000000 snapshots, each a copy of the weights; set a longer restart_period "
                               "(or a restart_mult above 1) for at most 1000")


def test_cycles_are_counted_as_listed():
    from launcher.schedules import ScheduleShape, cycle_count, cycle_ends

    for total in range(2, 40):
        for warmup in range(0, min(total, 4)):
            for period in (None, 1, 2, 5):
                for mult in (1, 2, 3):
                    shape = ScheduleShape(name="cosine_restarts", total_steps=total, warmup_steps=warmup,
                                          min_lr_ratio=0.0, restart_period=period, restart_mult=mult)
                    assert cycle_count(shape) == len(cycle_ends(shape)), shape


def test_an_override_key_path_deeper_than_a_document_may_nest_is_refused():
    """`--set model.kwargs.a.a.a...` built a mapping 5000 deep, past the stack of every walk."""
    with pytest.raises(UsageError) as info:
        parse_override("model.kwargs" + ".a" * 5000 + "=1")
    assert str(info.value) == "error: --set: a key path of 5002 parts; a recipe nests at most 64 levels deep"
    assert parse_override("model.kwargs" + ".a" * 62 + "=1")[0] == ("model", "kwargs", *["a"] * 62)


def test_model_kwargs_torch_cannot_build_are_a_model_kwargs_error(tmp_path):
    """Planning a transfer-learning recipe builds its model (on the meta device); torch's
    RuntimeError for a negative layer size came out as a traceback."""
    import argparse

    from launcher import cli

    path = tmp_path / "recipe.yaml"
    path.write_text("data: {source: synthetic, samples: 64}\nmodel: {freeze: ['*'], kwargs: {hidden: [-1]}}\n")
    args = argparse.Namespace(recipe=str(path), overrides=[], address=None, script=None, cluster=None, nodes=None,
                              procs_per_node=None)
    with pytest.raises(UsageError) as info:
        cli._make_plan(args, [], "20260101-000000")
    assert str(info.value).startswith("error: model.kwargs (line 2): mlp with {'hidden': [-1]}: Trying to create "
                                      "tensor with negative dimension -1")


def test_a_key_that_is_not_text_deep_in_a_free_form_value_is_refused_where_it_is(tmp_path):
    """`[?]` is a list holding the mapping {null: null}: plan.json would carry the key as
    "null", and the workers would build another model than the one planned."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {name: mlp, kwargs: {hidden: [?]}}\n")
    with pytest.raises(UsageError, match=r"^error: model.kwargs.hidden.0 \(line 1\): key None is not text; put it in quotes$"):
        load_recipe(str(recipe), [])
