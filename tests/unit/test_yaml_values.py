"""yamlio.with_values: a recipe with keys set, its comments and layout kept where it can."""

from __future__ import annotations

from launcher.yamlio import load_yaml, with_values

RECIPE = """\
# tuned on 2 GPUs
name: quick

optim:
  name: adamw
  lr: 3.0e-3   # the default
  weight_decay: 0.05

train:
  micro_batch_size: 32
"""


def test_a_scalar_is_replaced_on_its_line_and_its_comment_stays():
    edited = with_values(RECIPE, [(("optim", "lr"), 0.0138)])
    assert edited == RECIPE.replace("lr: 3.0e-3 ", "lr: 0.0138 ")


def test_missing_keys_join_their_section_and_missing_sections_come_last():
    edited = with_values(RECIPE, [(("optim", "reference_batch"), 64), (("logging", "run_root"), "/tmp/a b"),
                                  (("engine", "name"), "accelerate")])
    assert edited.startswith("# tuned on 2 GPUs\n")
    assert "  weight_decay: 0.05\n  reference_batch: 64\n" in edited
    assert edited.endswith('\nlogging:\n  run_root: "/tmp/a b"\n\nengine:\n  name: accelerate\n')
    data, _ = load_yaml(edited)
    assert data["optim"]["reference_batch"] == 64 and data["logging"]["run_root"] == "/tmp/a b"


def test_a_flow_style_section_is_written_anew_with_the_same_data():
    text = "name: quick\noptim: {name: sgd, lr: 0.1}\n"
    edited = with_values(text, [(("optim", "lr"), 0.02)])
    assert load_yaml(edited)[0] == {"name": "quick", "optim": {"name": "sgd", "lr": 0.02}}


def test_a_value_that_reads_as_another_type_is_quoted():
    edited = with_values(RECIPE, [(("name",), "true"), (("optim", "name"), "sgd")])
    assert load_yaml(edited)[0]["name"] == "true"
    assert "  name: sgd\n" in edited
