"""`dlaunch export RUN_DIR`: a finished run's final weights as ONNX files for serving,
each variant scored and timed on the run's own validation rows.

RUN_DIR/export/
  model.onnx         the eval-mode model, float32, dynamic batch axis
  model.int8.onnx    the same, weights quantized to int8 (onnxruntime's dynamic quantization)
  model.pruned.onnx  the Linear and Conv weights pruned by global L1 magnitude, float32
  report.json        per variant: val_loss, val_acc, file size, CPU latency

The ONNX files are scored by onnxruntime, not by PyTorch, so the numbers are the ones a
server running those files would get. An export whose outputs differ from PyTorch's is
refused rather than written: the directory is assembled under a hidden name and renamed
into place, so a failure leaves no export behind.

The exporter is torch's TorchScript-based one (``dynamo=False``): it needs no onnxscript,
exports the built-in models in a fraction of a second (the dynamo exporter takes seconds)
and gives the same outputs. torch marks it deprecated; the onnxruntime check below is
what would catch it going wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from launcher.data.datasets import load_split
from launcher.data.loaders import eval_batches
from launcher.errors import UsageError
from launcher.evaluate import WEIGHTS, finished_plan, score
from launcher.models.build import build_model

if TYPE_CHECKING:
    import onnxruntime

EXPORT_DIR = "export"
FP32, INT8, PRUNED, REPORT = "model.onnx", "model.int8.onnx", "model.pruned.onnx", "report.json"
INPUT, OUTPUT = "input", "logits"
ATOL, RTOL = 1e-4, 1e-3
"""How far onnxruntime's float32 outputs may stray from PyTorch's: kernels sum in a
different order, so equal to the last bit is not to be expected."""
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
LATENCY_BATCH = 64
WARMUP, RUNS_1, RUNS_BATCH = 3, 20, 5
"""Enough to get past first-call allocation and read a stable median, cheap enough to
run on every export."""

Predict = Callable[[torch.Tensor], torch.Tensor]


class ExportMismatchError(RuntimeError):
    """onnxruntime's outputs for an exported file are not PyTorch's: the exporter
    mistranslated the model, which no flag of the user's caused."""


@dataclass(frozen=True)
class VariantReport:
    name: str
    file: str
    """Relative to the run directory."""
    size_bytes: int
    val_loss: float
    val_acc: float
    """Next-token accuracy for a token model."""
    ms_batch_1: float
    """Median wall time of one forward pass of one row, on one CPU thread."""
    ms_batch_n: float
    """The same for a batch of ``ExportReport.latency_batch`` rows."""


@dataclass(frozen=True)
class ExportReport:
    run_dir: str
    opset: int
    val_rows: int
    latency_batch: int
    prune: float
    """The sparsity asked for."""
    sparsity: float
    """The share of the pruned model's Linear and Conv weights that are zero."""
    max_abs_diff: float
    """Largest |onnxruntime - PyTorch| of the float32 export on the check batch."""
    variants: tuple[VariantReport, ...]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def export_run(run_dir: Path, *, opset: int | None = None, prune: float = 0.5,
               batch_size: int = 256) -> ExportReport:
    """Export ``run_dir``'s final weights to RUN_DIR/export/ (replacing an older export)
    and report each variant; ``batch_size`` is the scoring batch, ``opset`` None takes
    torch's default."""
    if not 0 <= prune < 1:
        raise UsageError(f"{prune} is not a sparsity; give a share of the weights in [0, 1)", key="--prune")
    if batch_size < 1:
        raise UsageError("the batch size must be at least 1", key="--batch-size")
    plan = finished_plan(run_dir)
    facts, data = plan.training.data, plan.recipe.data
    if facts.num_val == 0:
        raise UsageError(f"{str(run_dir)!r} has no validation split to score the export on; "
                         "its recipe keeps data.val_fraction at 0", key="RUN_DIR")
    model = build_model(plan.recipe.model, facts)
    model.load_state_dict(torch.load(run_dir / WEIGHTS, map_location="cpu"))
    model.eval()
    val = load_split(data, facts).val
    sample, _, _ = next(iter(eval_batches(val, data, rank=0, world_size=1, batch=batch_size)))
    pruned = copy.deepcopy(model)
    sparsity = prune_weights(pruned, prune)

    staging = Path(tempfile.mkdtemp(prefix=f".{EXPORT_DIR}-", dir=run_dir))
    try:
        export_onnx(model, sample, staging / FP32, opset)
        max_diff = check_onnx(staging / FP32, model, sample)
        quantize_int8(staging / FP32, staging / INT8)
        export_onnx(pruned, sample, staging / PRUNED, opset)
        check_onnx(staging / PRUNED, pruned, sample)
        timed = sample[:LATENCY_BATCH]

        def measure(name: str, path: Path, shown: str, predict: Predict) -> VariantReport:
            loss, acc = score(predict, val, data, batch_size)
            return VariantReport(name=name, file=shown, size_bytes=path.stat().st_size, val_loss=loss,
                                 val_acc=acc, ms_batch_1=median_ms(predict, timed[:1], RUNS_1),
                                 ms_batch_n=median_ms(predict, timed, RUNS_BATCH))

        variants = (measure("pytorch fp32", run_dir / WEIGHTS, WEIGHTS, torch_predict(model)),
                    *(measure(name, staging / file, f"{EXPORT_DIR}/{file}",
                              onnx_predict(onnx_session(staging / file)))
                      for name, file in (("onnx fp32", FP32), ("onnx int8", INT8), ("onnx pruned", PRUNED))))
        report = ExportReport(run_dir=str(run_dir), opset=onnx_opset(staging / FP32), val_rows=len(val),
                              latency_batch=len(timed), prune=prune, sparsity=sparsity,
                              max_abs_diff=max_diff, variants=variants)
        (staging / REPORT).write_text(report.to_json())
        final = run_dir / EXPORT_DIR
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when renamed


def export_onnx(model: nn.Module, sample: torch.Tensor, path: Path, opset: int | None = None) -> None:
    """``model`` (in eval mode) as an ONNX file whose input and output have a dynamic
    batch axis. It is traced on two rows of ``sample``, so that ``check_onnx`` on the
    whole batch also proves the batch size was not baked into the graph."""
    with warnings.catch_warnings():
        # The tracer warns about every Python bool/int taken from a tensor (GroupNorm and
        # GPT's sequence length do); a shape it froze shows up in check_onnx instead.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # That this exporter is deprecated is known and chosen (see the module docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(model, (sample[:2],), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        except RuntimeError as exc:  # torch.onnx.OnnxExporterError among them
            if opset is None:
                raise
            raise UsageError(f"cannot export at opset {opset}: {str(exc).splitlines()[0]}",
                             key="--opset") from None


def check_onnx(path: Path, model: nn.Module, inputs: torch.Tensor) -> float:
    """The largest |onnxruntime - PyTorch| over ``inputs``; ``ExportMismatchError`` when
    it is beyond ATOL + RTOL * |PyTorch|."""
    expected = torch_predict(model)(inputs)
    got = onnx_predict(onnx_session(path))(inputs)
    if got.shape != expected.shape:
        raise ExportMismatchError(f"{path.name}: onnxruntime returned shape {list(got.shape)} "
                                  f"where PyTorch returns {list(expected.shape)}")
    diff = float((got - expected).abs().max())
    if not torch.allclose(got, expected, atol=ATOL, rtol=RTOL):
        raise ExportMismatchError(
            f"{path.name}: onnxruntime's outputs differ from PyTorch's by up to {diff:.3g} on "
            f"{len(inputs)} validation rows (allowed: atol {ATOL}, rtol {RTOL}); the exporter "
            "mistranslated the model; try another --opset")
    return diff


def quantize_int8(source: Path, target: Path) -> None:
    """``source`` with its MatMul/Gemm/Conv/Gather weights stored as int8 and activations
    quantized on the fly (no calibration data needed)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        # onnxruntime's documented first step (shape inference, graph clean-up); skipped,
        # quantize_dynamic warns through logging.warning, which configures the root logger.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        quantize_dynamic(prepared, target, weight_type=QuantType.QInt8)


def prune_weights(model: nn.Module, amount: float) -> float:
    """Zero the ``amount`` share of ``model``'s Linear and Conv weights with the smallest
    magnitude, taken over all of them together (a layer with more small weights loses
    more), permanently; the share of those weights that are zero afterwards."""
    from torch.nn.utils import prune

    targets = [(module, "weight") for module in model.modules() if isinstance(module, PRUNABLE)]
    if not targets:
        raise UsageError("the model has no Linear or Conv weights to prune", key="--prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in targets:
        prune.remove(module, name)
    # A tied weight (GPT's lm_head is its token embedding) counts once.
    weights = {id(module.weight): module.weight for module, _ in targets}.values()
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def onnx_session(path: Path) -> onnxruntime.InferenceSession:
    """A CPU session on one thread: its latencies compare with PyTorch's on one thread,
    and with each other, whatever the machine's core count."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_predict(session: onnxruntime.InferenceSession) -> Predict:
    return lambda inputs: torch.from_numpy(session.run([OUTPUT], {INPUT: inputs.numpy()})[0])


def torch_predict(model: nn.Module) -> Predict:
    def predict(inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(inputs)

    return predict


def onnx_opset(path: Path) -> int:
    """The default-domain opset ``path`` was written for (torch's default when not asked)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def median_ms(predict: Predict, inputs: torch.Tensor, runs: int) -> float:
    """Median milliseconds of ``predict(inputs)`` after WARMUP untimed calls, with
    PyTorch held to one thread as the onnxruntime sessions are."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(WARMUP):
            predict(inputs)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            predict(inputs)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 1000 * statistics.median(times)


def format_report(report: ExportReport) -> str:
    """The variants as an aligned table, then what the table cannot show."""
    n = report.latency_batch
    rows = [("variant", "file", "size", "val_acc", "val_loss", "ms/1 row", f"ms/{n} rows")]
    rows += [(v.name, v.file, _size(v.size_bytes), f"{v.val_acc:.4f}", f"{v.val_loss:.4f}",
              f"{v.ms_batch_1:.3f}", f"{v.ms_batch_n:.3f}") for v in report.variants]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    lines += [f"{report.val_rows} validation rows; onnx fp32 (opset {report.opset}) is within "
              f"{report.max_abs_diff:.2g} of PyTorch; latencies on one CPU thread",
              f"pruned: {report.sparsity:.1%} of the Linear/Conv weights are zero; a dense ONNX "
              "file stores the zeros, so it is no smaller"]
    return "\n".join(lines)


def _size(size_bytes: int) -> str:
    if size_bytes < 1024:
        return f"{size_bytes} B"
    return f"{size_bytes / 1024:.1f} KiB" if size_bytes < 1024**2 else f"{size_bytes / 1024**2:.1f} MiB"
