"""Ψ without torch: the closed-form parameter counts of the built-in models
(launcher/models/counts.py) equal the parameters of the models build_model makes, over
generated kwargs and data shapes; a model.target model is counted on the meta device."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.data.facts import DataFacts
from launcher.models.build import build_model
from launcher.models.counts import builtin_params, count_on_meta
from launcher.recipe import ModelConfig

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)


def facts(input_shape: tuple[int, ...], classes: int) -> DataFacts:
    return DataFacts(num_rows=100, num_train=80, num_val=20, input_shape=input_shape, num_classes=classes)


def built(cfg: ModelConfig, data: DataFacts) -> int:
    with torch.device("meta"):  # shapes without storage: fast for any size
        return sum(p.numel() for p in build_model(cfg, data).parameters())


def assert_counts(name: str, kwargs: dict, data: DataFacts) -> None:
    cfg = ModelConfig(name=name, kwargs=kwargs)
    assert builtin_params(cfg, data) == built(cfg, data), (name, kwargs, data)


small = st.integers(1, 48)


@FAST
@given(kwargs=st.fixed_dictionaries({}, optional={"hidden": st.lists(st.integers(1, 300), max_size=4),
                                                  "dropout": st.just(0.1)}),
       shape=st.lists(small, min_size=1, max_size=3), classes=st.integers(1, 50))
def test_mlp(kwargs, shape, classes):
    assert_counts("mlp", kwargs, facts(tuple(shape), classes))


# GroupNorm(min(8, c), c): a width of 8 or more is a multiple of 8.
widths = st.one_of(st.integers(1, 7), st.integers(1, 12).map(lambda k: 8 * k))


@FAST
@given(kwargs=st.fixed_dictionaries({}, optional={"channels": st.lists(widths, min_size=1, max_size=3),
                                                  "blocks_per_stage": st.integers(1, 3)}),
       shape=st.tuples(st.integers(1, 4), small, small), classes=st.integers(1, 50))
def test_cnn(kwargs, shape, classes):
    assert_counts("cnn", kwargs, facts(shape, classes))


@FAST
@given(n_head=st.integers(1, 4), head_dim=st.integers(1, 24), n_layer=st.integers(0, 4),
       block=st.integers(1, 300), vocab=st.integers(1, 2000), defaults=st.booleans())
def test_gpt(n_head, head_dim, n_layer, block, vocab, defaults):
    kwargs = {} if defaults else {"n_layer": n_layer, "n_head": n_head, "n_embd": n_head * head_dim}
    assert_counts("gpt", kwargs, facts((block,), vocab))


def test_the_defaults_of_each_builtin():
    digits = facts((1, 8, 8), 10)
    for name, data in (("mlp", digits), ("cnn", digits), ("gpt", facts((64,), 256))):
        assert_counts(name, {}, data)


def test_kwargs_the_model_refuses_are_not_counted():
    digits = facts((1, 8, 8), 10)
    for name, kwargs in (("mlp", {"width": 3}), ("mlp", {"hidden": "wide"}), ("mlp", {"hidden": [-1]}),
                         ("mlp", {"hidden": [True]}), ("cnn", {"channels": []}), ("cnn", {"channels": [12]}),
                         ("gpt", {"n_embd": 10, "n_head": 3})):
        assert builtin_params(ModelConfig(name=name, kwargs=kwargs), digits) is None, (name, kwargs)


def test_a_target_model_is_counted_on_the_meta_device(tmp_path, monkeypatch):
    (tmp_path / "wide_models.py").write_text(
        "import torch\n"
        "def make(width):\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(1000, width), torch.nn.Linear(width, 10))\n"
        "    assert all(p.is_meta for p in model.parameters())  # nothing allocated, nothing initialised\n"
        "    return model\n")
    monkeypatch.chdir(tmp_path)
    width = 100_000  # 0.4 GB of fp32 weights were it built for real
    cfg = ModelConfig(target="wide_models:make", kwargs={"width": width})
    assert count_on_meta(cfg, facts((1000,), 10)) == 1000 * width + width + width * 10 + 10
