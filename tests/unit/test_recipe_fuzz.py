"""Hostile input, generated: whatever the recipe file and the `--set` overrides hold, the
CLI's planning path (launcher.cli._make_plan: read, override, validate, describe the data,
plan) ends with a plan or with one line `error: ...` (a UsageError: exit 2), never
another exception. A plan it does make must survive what happens to it next: plan.json
read back by every worker, recipe.yaml read back by the same loader, the table `dlaunch
plan` prints, the sbatch script `--dry-run` prints.

Hypothesis generates 10,000 documents and overrides in all, from fixed seeds
(derandomize) so that CI sees the same ones every time; `-m "not slow"` leaves them out
of a quick loop. A failure prints the smallest example hypothesis found.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from launcher import cli, yamlio
from launcher.errors import UsageError
from launcher.plan import LaunchPlan, format_plan
from launcher.recipe import Recipe, recipe_from_data
from launcher.yamlio import dump_yaml, load_yaml

pytestmark = pytest.mark.slow


def fuzzed(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------- the harness

@pytest.fixture(scope="module", autouse=True)
def workspace(tmp_path_factory):
    """A working directory with a little of everything a recipe may name: a Parquet file,
    an image folder, a file where a folder is expected. Generated paths are relative, so
    they land here and never walk the machine's own file system."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    root = tmp_path_factory.mktemp("fuzz")
    rows = 64
    pq.write_table(pa.table({"f0": np.arange(rows, dtype=np.float32), "f1": np.ones(rows, np.float32),
                             "label": np.arange(rows) % 2, "tokens": [[1, 2, 3, 4]] * rows}),
                   root / "data.parquet")
    for name in ("cat", "dog"):
        (root / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (4, 4)).save(root / "images" / name / f"{i}.png")
    (root / "a-file").write_text("not a folder\n")
    before = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(before)


def plan_or_refuse(document: str | bytes, overrides: list[str] = ()) -> LaunchPlan | None:
    """What `dlaunch validate / plan / run` does with the recipe before any process starts."""
    path = Path("recipe.yaml")
    path.write_bytes(document if isinstance(document, bytes) else document.encode("utf-8", "surrogatepass"))
    args = argparse.Namespace(recipe=str(path), overrides=list(overrides), address=None, script=None,
                              cluster=None, nodes=None, procs_per_node=None)
    try:
        plan, _ = cli._make_plan(args, [], "fuzz")
    except UsageError as err:
        message = str(err)
        # One line the terminal shows as it is: a control character in a key or value
        # would break the line or drive the terminal.
        assert message.startswith("error: ") and message.isprintable(), message
        return None
    # Every worker reads plan.json back, and recipe.yaml is the recipe (written as the run
    # dir writes it; its default values, the same in every recipe, are left out here).
    assert LaunchPlan.from_json(plan.to_json()) == plan
    written = dump_yaml(plan.recipe.model_dump(mode="json", exclude_defaults=True))
    assert recipe_from_data(*load_yaml(written)) == plan.recipe
    format_plan(plan)
    if plan.topology.backend == "slurm":
        from cluster.slurm import render

        render(plan, python="python", cwd="/work")
    return plan


# ----------------------------------------------------------------------------- values

HOSTILE_TEXT = ["", " ", "\t", "\n", "a\nb", "\r", "\x00", "\x1b[2J", "\u2028", "\ufeff", "é", "🙂", "~",
                "null", "true", "off", "no", "1e3", "0x10", "0o7", "1_000", ".inf", "-.inf", ".nan",
                "NaN", "1:2", "12:30:00", "2001-12-14", "<<", "*", "&a", "!!str", "x" * 5000,
                "{{job_title}}", "$(touch pwned)", "`id`", "'; rm -rf ~ #", "a\\", "%s%n", "../..",
                "a:b", ":x", "x:", "a.b.c:f"]
# Texts a field may well hold, some of which YAML could take for something else.
WORDS = ["val_loss", "val_acc", "x", "run-1", "label", "f0", "--mail-type=END", "1e3", "2E-5", "+1e3", "0x1F",
         "1_000", "12:30", "off", "no", "null", "true", "2001-12-14", ".inf", "a: b", "- x", "#x", "'q'",
         "http://[::1:5000", "https://user@host", "sqlite:///x.db"]
HUGE_INTS = [2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400]  # more digits: in TOKENS

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE_INTS),
    st.floats(), st.floats(min_value=-2, max_value=2), st.text(max_size=12), st.sampled_from(HOSTILE_TEXT),
)
yaml_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=8)

# Strings that name files, folders and modules: relative (see `workspace`), or hostile.
FILE_NAMES = st.one_of(
    st.sampled_from(["data.parquet", "images", "images/cat", "a-file", "a-file/below", "missing", ".",
                     "runs", "a\x00b", "x" * 300, "y/" * 3000, "~", "~nobody/x", "~no-such-user/x", "data.parquet/x",
                     "fuzz_no_such_module:build", "json:loads", "json.decoder:JSONDecoder", ":build",
                     "pkg.:f", "a b:c"]),
    st.text(st.characters(blacklist_characters="/\\", blacklist_categories=("Cs",)), max_size=10),
)
NAMED_FILES = {("data", "path"), ("model", "init_from"), ("model", "target"), ("logging", "run_root"),
               ("cluster", "ray", "storage")}


def section_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def bounds(metadata: list, low: float, high: float) -> tuple[float, float, bool, bool]:
    """(low, high, low excluded, high excluded) from a field's gt/ge/lt/le, the defaults
    where it has none."""
    low_out = high_out = False
    for item in metadata:
        if getattr(item, "gt", None) is not None:
            low, low_out = item.gt, True
        if getattr(item, "ge", None) is not None:
            low = item.ge
        if getattr(item, "lt", None) is not None:
            high, high_out = item.lt, True
        if getattr(item, "le", None) is not None:
            high = item.le
    return low, max(high, low + 1), low_out, high_out


def typed(annotation: Any, metadata: list = (), *, hostile: bool) -> st.SearchStrategy:
    """Values of the type a field declares: within its bounds, or (hostile) anywhere."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return typed(args[0], [*metadata, *getattr(args[1], "metadata", [])], hostile=hostile)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(typed(a, metadata, hostile=hostile) for a in args))
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if origin is list:
        sizes = {"min_size": 0, "max_size": 4}
        for item in metadata:
            sizes["min_size"] = getattr(item, "min_length", None) or sizes["min_size"]
            sizes["max_size"] = getattr(item, "max_length", None) or sizes["max_size"]
        return st.lists(typed(args[0], hostile=hostile), **({"max_size": 4} if hostile else sizes))
    if origin is dict:
        keys = st.one_of(st.text(max_size=8), st.sampled_from(HOSTILE_TEXT)) if hostile else \
            st.sampled_from(["A", "hidden", "x_1", "*", "blocks.*"])
        return st.dictionaries(keys, typed(args[1], hostile=hostile), max_size=3)
    if annotation is int:
        low, high, low_out, high_out = bounds(metadata, 0, 64)
        inside = st.integers(int(low) + low_out, int(high) - high_out)
        return st.one_of(inside, st.integers(), st.sampled_from(HUGE_INTS)) if hostile else inside
    if annotation is float:
        low, high, low_out, high_out = bounds(metadata, 0.0, 2.0)
        inside = st.floats(low, high, exclude_min=low_out, exclude_max=high_out)
        return st.one_of(inside, st.floats(), st.sampled_from([1e-300, 1e300])) if hostile else inside
    if annotation is str:
        pattern = next((item.pattern for item in metadata if getattr(item, "pattern", None)), None)
        words = [text for text in WORDS if pattern is None or re.fullmatch(pattern, text)]
        fitting = st.one_of(*([st.sampled_from(words)] if words else []),
                            *([st.from_regex(pattern, fullmatch=True)] if pattern else []))
        return st.one_of(fitting, st.text(max_size=12), st.sampled_from(HOSTILE_TEXT)) if hostile else fitting
    section = section_of(annotation)
    if section is not None:  # an item of a list of sections (model.unfreeze)
        return st.fixed_dictionaries({}, optional={name: typed(field.annotation, field.metadata, hostile=hostile)
                                                   for name, field in section.model_fields.items()})
    return yaml_values


@st.composite
def sweep_spaces(draw) -> dict:
    """A search space over real keys, each with one distribution."""
    space = {}
    for key in draw(st.lists(st.sampled_from(KEY_PATHS), max_size=3)):
        kind = draw(st.sampled_from(["choice", "grid", "uniform", "loguniform", "randint"]))
        values = draw(st.lists(st.one_of(st.integers(0, 8), st.floats(1e-4, 1.0), scalars), min_size=1, max_size=3))
        space[key] = {kind: values}
    return space


def schema_fields(model: type[BaseModel] = Recipe, prefix: tuple[str, ...] = ()):
    """(key path, values of its type, any values) of every key of the schema, sections
    included (a value where a section belongs is hostile input too)."""
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        section = section_of(field.annotation)
        if path == ("sweep", "space"):
            yield path, sweep_spaces(), yaml_values
        elif section is not None and typing.get_origin(field.annotation) is not list:
            yield path, st.just({}), yaml_values
            yield from schema_fields(section, path)
        elif path in NAMED_FILES:
            yield path, FILE_NAMES, FILE_NAMES
        else:
            yield path, typed(field.annotation, field.metadata, hostile=False), \
                typed(field.annotation, field.metadata, hostile=True)


FIELDS = list(schema_fields())
KEY_PATHS = [".".join(path) for path, _, _ in FIELDS if not path[0] == "sweep"]
PICKS = st.lists(st.sampled_from(FIELDS), max_size=8)
ROLLS = st.integers(0, 9)
SWEEP_SPACES = sweep_spaces()


TYPOS = st.tuples(st.sampled_from(["drop", "double", "swap", "change", "case"]), st.integers(0, 99),
                  st.characters(blacklist_categories=("Cs",)))


def typo(word: str, edit: tuple[str, int, str]) -> str:
    """``word`` with one edit: a letter dropped, doubled, swapped or changed, or its case."""
    kind, at, letter = edit
    at %= max(len(word), 1)
    if kind == "drop":
        return word[:at] + word[at + 1:]
    if kind == "double":
        return word[:at] + word[at:at + 1] + word[at:]
    if kind == "swap" and at + 1 < len(word):
        return word[:at] + word[at + 1] + word[at] + word[at + 2:]
    if kind == "case":
        return word.swapcase()
    return word[:at] + letter + word[at + 1:]


def put(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """``tree[path] = value``, unless a value already sits where a section would go."""
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            return
    tree[path[-1]] = value


@st.composite
def plausible_recipes(draw) -> dict:
    """Real keys of the schema with values of their type: half the recipes keep to each
    field's bounds (and so reach the rules across fields and the planner), half also
    take values of any type and size, and misspelt keys."""
    hostile = draw(st.booleans())
    recipe: dict = {}
    if draw(st.booleans()):  # tiny data, so that many of them get as far as the plan
        recipe["data"] = {"source": "synthetic", "samples": 64}
    for path, fitting, anything in draw(PICKS):
        roll = draw(ROLLS) if hostile else 9
        value = draw(yaml_values if roll == 0 else anything if roll < 5 else fitting)
        if roll == 1:
            path = (*path[:-1], typo(path[-1], draw(TYPOS)))
        put(recipe, path, value)
    if not hostile:  # the keys a section cannot do without
        if isinstance(recipe.get("sweep"), dict):
            recipe["sweep"].setdefault("space", draw(SWEEP_SPACES))
        container = recipe.get("cluster", {}).get("slurm", {}).get("container")
        if isinstance(container, dict):
            container.setdefault("image", "registry#image:tag")
    return recipe


class Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):
    """libyaml's emitter (fast), with the resolvers of yamlio.dump_yaml: a generated text
    that YAML 1.2 reads as a number (`1e3`) is quoted, so the document holds the text."""

    yaml_implicit_resolvers = yamlio._Dumper.yaml_implicit_resolvers


@st.composite
def recipe_documents(draw) -> str:
    return yaml.dump(draw(plausible_recipes()), Dumper=Dumper, sort_keys=False, allow_unicode=draw(st.booleans()),
                     default_flow_style=draw(st.sampled_from([False, None, True])))


# ----------------------------------------------------------------------------- documents

TOKENS = ["name", "optim", "lr", "data", "train", "model", "kwargs", "cluster", "slurm", "env", ":", ": ",
          "-", "- ", "[", "]", "{", "}", ",", "\n", "\n  ", "\n    ", "\t", " ", "&a ", "*a", "&b ", "*b",
          "<<: ", "? ", "|", ">", "'", '"', "#", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "---\n", "...\n",
          "!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!binary ", "!!set ",
          "!!omap ", "!!float ", "!!int ", "!!str ", "!local ", ".nan", ".inf", "-.inf", "1e999",
          "9" * 5000, "~", "null", "true", "0x1F", "2001-12-14", "\x00", "\ufeff", "\x85", "\u2028", "é",
          "\\", "@", "`", "%"]

VALID = """name: fuzz
model: {name: mlp, kwargs: {hidden: [8]}}
data:
  source: synthetic
  samples: 64
  num_features: 4
optim:
  lr: 3.0e-3
train:
  micro_batch_size: 8
  max_steps: 4
logging:
  run_root: runs
cluster:
  procs_per_node: 2
  slurm: {env: {A: b}}
"""


@st.composite
def alias_bombs(draw) -> str:
    """Billion laughs: each level a list of `width` aliases of the one before. Small ones
    (a few hundred values once expanded: valid YAML that the schema judges) and huge ones
    (millions and more: refused before they are expanded); the loader's cost of those in
    between grows with their size, not with the number of laughs."""
    levels, width = draw(st.one_of(st.tuples(st.integers(1, 4), st.integers(2, 5)),
                                   st.tuples(st.integers(7, 12), st.integers(8, 10))))
    lines = ["l0: &l0 [lol]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    where = draw(st.sampled_from(["root", "kwargs", "space"]))
    if where == "root":
        return "\n".join(lines) + "\n"
    indented = "\n".join("    " + line for line in lines)
    if where == "kwargs":
        return f"model:\n  kwargs:\n{indented}\n"
    return f"sweep:\n  space:\n    optim.lr:\n{indented}\n"


@st.composite
def deep_nesting(draw) -> str:
    depth = draw(st.integers(1, 5000))
    style = draw(st.sampled_from(["flow-list", "flow-map", "block", "under-kwargs"]))
    if style == "flow-list":
        return "[" * depth + "]" * depth
    if style == "flow-map":
        return "{a: " * depth + "1" + "}" * depth
    if style == "block":
        return "".join(" " * i + "a:\n" for i in range(min(depth, 200))) + " " * min(depth, 200) + "b: 1\n"
    return "model:\n  kwargs:\n    x: " + "[" * depth + "]" * depth + "\n"


@st.composite
def recursive_anchors(draw) -> str:
    return draw(st.sampled_from([
        "&a [*a]", "a: &a [*a]", "&r {model: *r}", "model:\n  kwargs: &k {x: *k}\n",
        "sweep:\n  space: &s {optim.lr: *s}\n", "data: &d\n  classes: [*d]\n",
        "optim: &o\n  lr: 1\n  <<: *o\n",
    ]))


@st.composite
def duplicate_keys(draw) -> str:
    path, _, _ = draw(st.sampled_from(FIELDS))
    recipe = {}
    put(recipe, path, 1)
    text = yaml.safe_dump(recipe, sort_keys=False)
    last = text.splitlines()[-1]
    return text + last + "\n"


@st.composite
def mutated(draw) -> str:
    """The valid recipe with a few characters inserted, deleted or replaced."""
    text = VALID
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        piece = draw(st.one_of(st.sampled_from(TOKENS), st.text(max_size=3)))
        cut = draw(st.integers(0, 3))
        text = text[:at] + piece + text[at + cut:]
    return text


documents = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    st.lists(st.sampled_from(TOKENS), max_size=40).map("".join),
    mutated(),
    alias_bombs(),
    deep_nesting(),
    recursive_anchors(),
    duplicate_keys(),
    yaml_values.map(lambda value: yaml.safe_dump(value)),  # non-mapping roots too
)


@fuzzed(4000)
@given(documents)
def test_any_document_plans_or_is_refused_in_one_line(document):
    plan_or_refuse(document)


@fuzzed(3000)
@given(recipe_documents())
def test_any_recipe_of_real_keys_plans_or_is_refused_in_one_line(document):
    plan_or_refuse(document)


# ----------------------------------------------------------------------------- overrides

KEY_PATH = st.sampled_from(KEY_PATHS)
override_keys = st.one_of(
    KEY_PATH, KEY_PATH, KEY_PATH,
    st.tuples(KEY_PATH, TYPOS).map(lambda drawn: typo(drawn[0], drawn[1])),
    st.sampled_from([  # into lists, scalars and free-form mappings
        "data.classes.0", "optim.betas.1", "optim.lr.x", "name.x", "model.unfreeze.0.at_step",
        "model.kwargs.hidden", "model.kwargs.a.b.c", "cluster.slurm.env.WANDB_API_KEY",
        "cluster.slurm.env.A B", "cluster.slurm.env.1A", "sweep.space.optim.lr.uniform",
        "engine.deepspeed_config.zero_optimization.stage", "logging.mlflow.tracking_uri",
        "model.kwargs" + ".a" * 5000, "sweep.space" + ".x" * 100]),
    st.sampled_from(["", ".", "..", "a..b", ".lr", "lr.", " ", "optim .lr", "=", "optim=lr"]),
    st.text(max_size=15),
)
override_values = st.one_of(
    yaml_values.map(lambda value: json.dumps(value)),  # JSON is YAML's flow style ... mostly: NaN
    yaml_values.map(lambda value: yaml.safe_dump(value, default_flow_style=True).strip()),
    st.text(max_size=20),
    st.sampled_from(["", "!!python/object/apply:os.system ['true']", "&a [*a]", "*a", "[" * 3000,
                     "[&a [1, 1, 1, 1], &b [*a, *a, *a, *a], [*b, *b, *b, *b]]", "{", "- x", "a: b: c", "|",
                     "'open", "1e999", "-.inf", ".nan", "9" * 5000, "sqlite:///x.db",
                     "http://user:secret@host:5000", "https://t0ken@host", "http://[::1:5000", "x\ny", "%YAML 1.1",
                     "---", "a\n---\nb"]),
    alias_bombs(), deep_nesting(),
)


overrides = st.one_of(
    st.tuples(override_keys, st.sampled_from(["=", "=", "=", "", "==", " = ", ":"]), override_values).map("".join),
    # a real key with a value of its own type, as YAML's flow style writes it
    st.sampled_from(FIELDS).flatmap(lambda field: st.one_of(field[1], field[2]).map(
        lambda value, path=field[0]: f"{'.'.join(path)}={yaml.dump(value, Dumper=Dumper, default_flow_style=True)}"
        .rstrip("\n").removesuffix("\n..."))),
)


@fuzzed(3000)
@given(st.one_of(st.just(VALID), recipe_documents()), st.lists(overrides, min_size=1, max_size=4))
def test_any_override_plans_or_is_refused_in_one_line(document, specs):
    plan_or_refuse(document, specs)
