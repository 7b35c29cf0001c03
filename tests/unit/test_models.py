"""Built-in models, user models by import path, and optimizer parameter groups."""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from launcher.data.facts import DataFacts
from launcher.errors import UsageError
from launcher.models.build import build_model, param_groups
from launcher.models.target import check_target_importable
from launcher.recipe import ModelConfig

DIGITS = DataFacts(num_rows=100, num_train=80, num_val=20, input_shape=(1, 8, 8), num_classes=10)
FEATURES = DataFacts(num_rows=100, num_train=80, num_val=20, input_shape=(32,), num_classes=4)
TOKENS = DataFacts(num_rows=100, num_train=80, num_val=20, input_shape=(15,), num_classes=50)


def _batch(facts: DataFacts, name: str, batch: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "gpt":
        seq = torch.randint(facts.num_classes, (batch, facts.input_shape[0] + 1))
        return seq[:, :-1], seq[:, 1:]
    return torch.randn(batch, *facts.input_shape), torch.randint(facts.num_classes, (batch,))


@pytest.mark.parametrize(("name", "facts", "out_shape"), [
    ("mlp", FEATURES, (5, 4)),
    ("mlp", DIGITS, (5, 10)),  # image-shaped rows are flattened
    ("cnn", DIGITS, (5, 10)),
    ("gpt", TOKENS, (5, 15, 50)),
])
def test_builtin_model_returns_logits_whose_cross_entropy_trains_it(name, facts, out_shape):
    model = build_model(ModelConfig(name=name), facts)
    x, y = _batch(facts, name)
    logits = model(x)
    assert logits.shape == out_shape
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_model_kwargs_reach_the_builtin():
    mlp = build_model(ModelConfig(name="mlp", kwargs={"hidden": [16, 8]}), FEATURES)
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [16, 8, 4]
    cnn = build_model(ModelConfig(name="cnn", kwargs={"channels": [8, 16, 24], "blocks_per_stage": 2}),
                      DIGITS)
    assert len(cnn.blocks) == 6 and cnn.head.in_features == 24
    gpt = build_model(ModelConfig(name="gpt", kwargs={"n_layer": 3, "n_embd": 32}), TOKENS)
    assert len(gpt.blocks) == 3 and gpt.wte.embedding_dim == 32


def test_cnn_downsamples_between_stages_not_within():
    cnn = build_model(ModelConfig(name="cnn", kwargs={"channels": [4, 8], "blocks_per_stage": 2}),
                      DIGITS)
    features = cnn.blocks(cnn.stem(torch.randn(2, 1, 8, 8)))
    assert features.shape == (2, 8, 4, 4)


def test_gpt_is_causal_and_takes_shorter_sequences():
    torch.manual_seed(0)
    gpt = build_model(ModelConfig(name="gpt"), TOKENS).eval()
    idx = torch.randint(50, (2, 15))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 50
    before, after = gpt(idx), gpt(changed)
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])
    assert gpt(idx[:, :4]).shape == (2, 4, 50)
    with pytest.raises(ValueError, match="block size"):
        gpt(torch.zeros(1, 16, dtype=torch.long))


def test_unknown_kwarg_is_a_usage_error_naming_the_accepted_ones():
    with pytest.raises(UsageError) as info:
        build_model(ModelConfig(name="mlp", kwargs={"hiden": [8]}), FEATURES)
    assert info.value.key == "model.kwargs"
    assert "'hiden'" in info.value.message
    assert "hidden, dropout" in info.value.message


def test_kwargs_cannot_override_what_the_data_decides():
    with pytest.raises(UsageError, match="num_classes") as info:
        build_model(ModelConfig(name="mlp", kwargs={"num_classes": 3}), FEATURES)
    assert info.value.key == "model.kwargs"


def test_bad_kwarg_values_are_usage_errors():
    with pytest.raises(UsageError, match="multiple of n_head") as info:
        build_model(ModelConfig(name="gpt", kwargs={"n_embd": 30, "n_head": 4}), TOKENS)
    assert info.value.key == "model.kwargs"
    with pytest.raises(UsageError, match="image-shaped"):
        build_model(ModelConfig(name="cnn"), FEATURES)


# --- user models by import path --------------------------------------------------------

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write ``<name>.py`` into a fresh working directory; forget the module afterwards."""
    monkeypatch.chdir(tmp_path)
    written: list[str] = []

    def write(name: str, source: str) -> Path:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        written.append(name.split(".")[0])
        return path

    yield write
    for name in list(sys.modules):
        if name.split(".")[0] in written:
            del sys.modules[name]


def test_target_factory_is_imported_from_the_working_directory_and_called_with_kwargs(user_module):
    user_module("my_models_a", """
        import torch.nn as nn

        def make(width, depth=1):
            return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    """)
    model = build_model(ModelConfig(target="my_models_a:make", kwargs={"width": 3, "depth": 2}),
                        FEATURES)
    assert [m.in_features for m in model] == [3, 3]


@pytest.mark.parametrize(("target", "message"), [
    ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
    ("my_models_b:absent", "has no attribute 'absent'"),
    ("my_models_b:NOT_CALLABLE", "not a callable"),
    ("my_models_b:not_a_module", "returned a dict, not a torch.nn.Module"),
])
def test_bad_target_is_a_usage_error(user_module, target, message):
    user_module("my_models_b", """
        NOT_CALLABLE = 3

        def not_a_module():
            return {}
    """)
    with pytest.raises(UsageError, match=message) as info:
        build_model(ModelConfig(target=target), FEATURES)
    assert info.value.key == "model.target"


def test_target_with_a_syntax_error_is_a_usage_error(user_module):
    user_module("my_models_c", "def make(:\n")
    with pytest.raises(UsageError, match="cannot import 'my_models_c'") as info:
        build_model(ModelConfig(target="my_models_c:make"), FEATURES)
    assert info.value.key == "model.target"


def test_target_kwargs_are_checked_against_the_factory(user_module):
    user_module("my_models_d", """
        import torch.nn as nn

        def make(width):
            return nn.Linear(width, 1)
    """)
    with pytest.raises(UsageError, match="takes no argument 'height'; it accepts width") as info:
        build_model(ModelConfig(target="my_models_d:make", kwargs={"width": 2, "height": 1}), FEATURES)
    assert info.value.key == "model.kwargs"
    with pytest.raises(UsageError, match="needs argument 'width'"):
        build_model(ModelConfig(target="my_models_d:make"), FEATURES)


def test_check_target_importable_finds_the_module_without_running_it(user_module, tmp_path):
    user_module("my_models_e", """
        open("ran.txt", "w").close()
    """)
    check_target_importable("my_models_e:make")
    assert not (tmp_path / "ran.txt").exists()
    assert "my_models_e" not in sys.modules


@pytest.mark.parametrize("target", ["no_such_module_xyz:make", "no_such_pkg_xyz.models:make",
                                    "json.no_such_submodule:make", "missing_factory"])
def test_check_target_importable_rejects_what_cannot_be_found(user_module, target):
    with pytest.raises(UsageError) as info:
        check_target_importable(target)
    assert info.value.key == "model.target"


def test_working_directory_does_not_stay_on_sys_path(user_module, tmp_path):
    user_module("my_models_f", "")
    check_target_importable("my_models_f:make")
    assert str(tmp_path) not in sys.path


def _launcher_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_target_checking_imports_no_torch():
    """The planner calls check_target_importable on machines without torch: no module
    it imports, transitively within launcher/, may import torch."""
    root = Path(__file__).resolve().parents[2]
    seen: set[str] = set()
    pending = ["launcher.models", "launcher.models.target"]
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = root / module.replace(".", "/")
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        imports = _launcher_imports(path)
        assert not any(name.split(".")[0] == "torch" for name in imports), module
        pending += [name for name in imports if name.startswith("launcher")]
    assert "launcher.models.build" not in seen


# --- optimizer parameter groups ----------------------------------------------------------

def _ids(params: list[torch.Tensor]) -> set[int]:
    return {id(p) for p in params}


def test_param_groups_decay_weights_but_not_biases_or_norms():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert _ids(decay["params"]) == _ids([model[0].weight, model[2].weight])
    assert _ids(no_decay["params"]) == _ids([model[0].bias, model[1].weight, model[1].bias,
                                             model[2].bias])


def test_param_groups_are_one_group_without_weight_decay():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    [group] = param_groups(model, weight_decay=0.0)
    assert group["weight_decay"] == 0.0 and _ids(group["params"]) == _ids(model.parameters())


def test_param_groups_hold_every_trainable_parameter_once():
    gpt = build_model(ModelConfig(name="gpt"), TOKENS)  # lm_head shares wte's weight
    gpt.wpe.weight.requires_grad_(False)
    groups = param_groups(gpt, weight_decay=0.1)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in gpt.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)
    torch.optim.AdamW(groups, lr=1e-3)  # the optimizer accepts them as they are


def test_param_groups_drop_an_empty_group():
    groups = param_groups(nn.Linear(3, 3, bias=False), weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1]
