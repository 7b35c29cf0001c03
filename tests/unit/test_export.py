"""`dlaunch export`'s pieces on tiny models: the ONNX export and its onnxruntime check
(which must be able to fail), int8 quantization, global pruning, latencies, the report;
and one whole export of a hand-made token-model run directory."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from launcher.data.facts import describe
from launcher.errors import UsageError
from launcher.export import (
    ATOL,
    FP32,
    INT8,
    PRUNED,
    REPORT,
    ExportMismatchError,
    ExportReport,
    VariantReport,
    check_onnx,
    export_onnx,
    export_run,
    format_report,
    median_ms,
    onnx_opset,
    onnx_predict,
    onnx_session,
    prune_weights,
    quantize_int8,
    torch_predict,
)
from launcher.models.build import build_model
from launcher.models.cnn import CNN
from launcher.models.gpt import GPT
from launcher.models.mlp import MLP
from launcher.plan import HostFacts, build_plan
from launcher.recipe import Recipe


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP((32,), 4, hidden=(256, 256, 256)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny MLP, a batch of its inputs and its ONNX export."""
    path = tmp_path_factory.mktemp("onnx") / FP32
    model, inputs = mlp(), torch.randn(50, 32)
    export_onnx(model, inputs, path)
    return model, inputs, path


@pytest.mark.parametrize("model, inputs", [
    (mlp(), torch.randn(50, 32)),
    (CNN((1, 8, 8), 10).eval(), torch.randn(50, 1, 8, 8)),
    (GPT((16,), 64).eval(), torch.randint(0, 64, (50, 16))),
], ids=["mlp", "cnn", "gpt"])
def test_onnx_export_matches_pytorch_at_batch_sizes_it_was_not_traced_on(tmp_path, model, inputs):
    export_onnx(model, inputs, tmp_path / FP32)
    assert check_onnx(tmp_path / FP32, model, inputs) < ATOL  # traced on 2 rows, checked on 50
    one_row = onnx_predict(onnx_session(tmp_path / FP32))(inputs[:1])
    torch.testing.assert_close(one_row, torch_predict(model)(inputs[:1]), atol=ATOL, rtol=1e-3)


def test_the_opset_asked_for_is_the_files_and_one_too_old_for_an_operator_is_a_usage_error(tmp_path):
    export_onnx(mlp(), torch.randn(4, 32), tmp_path / FP32, opset=17)
    assert onnx_opset(tmp_path / FP32) == 17
    with pytest.raises(UsageError) as info:  # scaled_dot_product_attention came with opset 14
        export_onnx(GPT((16,), 64).eval(), torch.randint(0, 64, (4, 16)), tmp_path / "gpt.onnx", opset=13)
    assert info.value.key == "--opset" and "opset version 13 is not supported" in info.value.message


def test_the_check_fails_when_the_onnx_weights_differ(exported, tmp_path):
    model, inputs, path = exported
    graph = onnx.load(str(path))
    weight = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
    values = onnx.numpy_helper.to_array(weight) + 0.01
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(graph, str(tmp_path / "perturbed.onnx"))
    with pytest.raises(ExportMismatchError, match="perturbed.onnx: onnxruntime's outputs differ from PyTorch's"):
        check_onnx(tmp_path / "perturbed.onnx", model, inputs)


def test_int8_quantization_shrinks_the_file_and_keeps_the_predictions(exported, tmp_path):
    model, inputs, path = exported
    quantize_int8(path, tmp_path / INT8)
    assert (tmp_path / INT8).stat().st_size < 0.4 * path.stat().st_size  # ~1/4: int8 for float32
    logits = onnx_predict(onnx_session(tmp_path / INT8))(inputs)
    expected = torch_predict(model)(inputs)
    assert (logits.argmax(1) == expected.argmax(1)).float().mean() >= 0.9


def test_pruning_reaches_the_global_sparsity_asked_and_is_permanent():
    model = mlp()
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert prune_weights(model, 0.5) == pytest.approx(0.5, abs=1e-4)
    assert sum(int((w == 0).sum()) for w in weights) == pytest.approx(0.5 * sum(w.numel() for w in weights), abs=1)
    per_layer = [float((w == 0).float().mean()) for w in weights]
    assert max(per_layer) - min(per_layer) > 0.01  # one threshold for all layers, not 50% of each
    assert not any("_orig" in k or "_mask" in k for k in model.state_dict())


def test_pruning_a_tied_weight_prunes_it_once_for_both_uses():
    model = GPT((16,), 64)
    sparsity = prune_weights(model, 0.3)
    assert model.lm_head.weight is model.wte.weight
    assert sparsity == pytest.approx(0.3, abs=1e-3)


def test_latencies_are_positive_for_pytorch_and_onnxruntime(exported):
    model, inputs, path = exported
    for predict in (torch_predict(model), onnx_predict(onnx_session(path))):
        assert median_ms(predict, inputs[:1], runs=3) > 0


def test_report_is_an_aligned_table_and_json():
    variants = tuple(VariantReport(name=name, file=file, size_bytes=size, val_loss=0.5, val_acc=0.875,
                                   ms_batch_1=0.05, ms_batch_n=1.25)
                     for name, file, size in (("pytorch fp32", "model.pt", 303_000),
                                              ("onnx int8", "export/model.int8.onnx", 81_211)))
    report = ExportReport(run_dir="runs/x", opset=20, val_rows=80, latency_batch=64, prune=0.5,
                          sparsity=0.5, max_abs_diff=3e-7, variants=variants)
    lines = format_report(report).splitlines()
    assert lines[0].split() == ["variant", "file", "size", "val_acc", "val_loss", "ms/1", "row",
                                "ms/64", "rows"]
    assert lines[1].index("0.8750") == lines[2].index("0.8750")  # columns line up
    assert lines[1].endswith("1.250") and lines[2].endswith("1.250")
    assert "295.9 KiB" in lines[1] and "79.3 KiB" in lines[2]
    assert "50.0% of the Linear/Conv weights are zero" in lines[-1]
    assert json.loads(report.to_json())["variants"][1]["file"] == "export/model.int8.onnx"


def run_dir(tmp_path, data: dict, *, weights: bool = True, script: str | None = None):
    """A finished run's directory as far as export reads it: plan.json and model.pt."""
    recipe = Recipe.model_validate({"model": {"name": "gpt", "kwargs": {"n_layer": 1, "n_embd": 32}},
                                    "data": {"source": "synthetic", "samples": 200, **data},
                                    "train": {"micro_batch_size": 8, "max_steps": 1,
                                              "early_stopping": {"patience": None}}})
    facts = None if script else describe(recipe.data)
    plan = build_plan(recipe, host=HostFacts(has_cuda=False, cpus=2, hostname="h"), data=facts,
                      run_dir=str(tmp_path), nodes=1, procs_per_node=1, script=script)
    (tmp_path / "plan.json").write_text(plan.to_json())
    if weights:
        torch.save(build_model(recipe.model, facts).state_dict(), tmp_path / "model.pt")
    return tmp_path


def test_a_token_model_run_exports_scored_on_next_token_accuracy(tmp_path):
    report = export_run(run_dir(tmp_path, {"kind": "tokens", "seq_len": 17}), prune=0.3)
    assert [v.name for v in report.variants] == ["pytorch fp32", "onnx fp32", "onnx int8", "onnx pruned"]
    for file in (FP32, INT8, PRUNED, REPORT):
        assert (tmp_path / "export" / file).is_file()
    torch_fp32, onnx_fp32, _, _ = report.variants
    assert onnx_fp32.val_acc == torch_fp32.val_acc and onnx_fp32.val_loss == pytest.approx(torch_fp32.val_loss)
    assert 0 <= torch_fp32.val_acc < 0.1  # untrained: about 1 / vocab_size of next tokens right
    assert report.val_rows == 40 and report.sparsity == pytest.approx(0.3, abs=1e-3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize("make, kwargs, key, words", [
    (lambda d: d, {}, "RUN_DIR", "is not a dlaunch run directory"),
    (lambda d: run_dir(d, {}, script="train.py", weights=False), {}, "RUN_DIR", "ran a --script"),
    (lambda d: run_dir(d, {"kind": "tokens"}, weights=False), {}, "RUN_DIR", "has no final weights"),
    (lambda d: run_dir(d, {"kind": "tokens", "val_fraction": 0.0}), {}, "RUN_DIR", "no validation split"),
    (lambda d: d, {"prune": 1.0}, "--prune", "not a sparsity"),
], ids=["not-a-run", "script", "unfinished", "no-val", "prune"])
def test_bad_input_is_a_usage_error_of_one_line(tmp_path, make, kwargs, key, words):
    with pytest.raises(UsageError) as info:
        export_run(make(tmp_path), **kwargs)
    assert info.value.key == key and words in info.value.message
    assert "\n" not in str(info.value)
    assert not (tmp_path / "export").exists()
