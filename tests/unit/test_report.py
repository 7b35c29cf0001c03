"""`dlaunch report`: plots, legends and the summary table, from synthetic run directories."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launcher.errors import UsageError
from launcher.report import ema, format_table, legend_labels, load_run, summary_table, write_report

PLOTS = ("loss.png", "eval.png", "lr.png", "grad_norm.png", "throughput.png")


def recipe(lr: float) -> dict:
    return {"name": "quick", "optim": {"name": "adamw", "lr": lr, "betas": [0.9, 0.95]},
            "engine": {"name": "deepspeed"}, "train": {"monitor": "val_loss", "monitor_mode": "auto"}}


def write_run(root: Path, name: str, records: list[dict], plan: dict | None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"time": 1.8e9 + i, **r}) for i, r in enumerate(records)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if plan is not None:
        (run_dir / "plan.json").write_text(json.dumps(plan))
    return run_dir


def train(step: int, lr: float, grad_norm: float | None) -> dict:
    loss = 2 / (1 + step / 50) + 0.05 * math.sin(step)
    return {"kind": "train", "step": step, "epoch": step // 100, "loss": loss,
            "lr": lr * min(1.0, step / 20), "grad_norm": grad_norm, "samples_per_s": 1000.0 + step % 7}


def resumed_run(root: Path) -> Path:
    """lr 3e-3, 240 logged steps (enough to smooth), a NaN loss at step 60 (logged as
    null) and one at 61 (an older log's NaN), preempted at 120 and resumed there, stopped
    early at 240; its best val_loss 0.5 at step 200."""
    records = [train(s, 3e-3, 1.0 + 1 / s) for s in range(1, 121)]
    records[59]["loss"], records[60]["loss"] = None, math.nan
    records += [{"kind": "eval", "step": 50, "val_loss": 0.9, "val_acc": 0.6},
                {"kind": "eval", "step": 100, "val_loss": 0.7, "val_acc": 0.7},
                {"kind": "preempted", "step": 120, "slurm_job_id": "7", "restart_count": "0"},
                {"kind": "resume", "step": 120, "checkpoint": "step-00000120"}]
    records += [train(s, 3e-3, 1.0) for s in range(121, 241)]
    records += [{"kind": "eval", "step": 150, "val_loss": 0.6, "val_acc": 0.75},
                {"kind": "eval", "step": 200, "val_loss": 0.5, "val_acc": 0.8},
                {"kind": "eval", "step": 240, "val_loss": 0.55, "val_acc": 0.81},
                {"kind": "early_stop", "step": 240, "monitor": "val_loss", "best": 0.5},
                {"kind": "summary", "step": 240, "steps": 240, "seconds": 61.5, "samples_per_s": 1003.2,
                 "val_loss": 0.55, "val_acc": 0.81, "best": 0.5, "best_step": 200, "stopped_early": True}]
    return write_run(root, "quick-a", records, {"name": "quick", "recipe": recipe(3e-3), "topology": {}})


def plain_run(root: Path) -> Path:
    """lr 3e-4, no grad norms (an engine that cannot give them), ran to its end."""
    records = [train(s, 3e-4, None) for s in range(10, 301, 10)]
    records += [{"kind": "eval", "step": s, "val_loss": 1.0 - s / 1000, "val_acc": 0.5 + s / 1000}
                for s in (100, 200, 300)]
    records.append({"kind": "summary", "step": 300, "steps": 300, "seconds": 80.0, "samples_per_s": 990.0,
                    "val_loss": 0.7, "val_acc": 0.8, "best": 0.7, "best_step": 300, "stopped_early": False})
    return write_run(root, "quick-b", records, {"name": "quick", "recipe": recipe(3e-4), "topology": {}})


def assert_nonblank_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 300 and image.height > 200
        assert np.asarray(image.convert("L")).var() > 0


def test_report_of_two_runs_writes_every_plot_and_the_summary(tmp_path):
    runs = [resumed_run(tmp_path), plain_run(tmp_path)]
    written = write_report(runs, tmp_path / "report")
    assert written == [tmp_path / "report" / name for name in (*PLOTS, "summary.md")]
    for name in PLOTS:
        assert_nonblank_png(tmp_path / "report" / name)


def test_grad_norm_plot_is_left_out_when_no_run_has_grad_norms_and_a_stale_one_removed(tmp_path):
    out = tmp_path / "report"
    write_report([resumed_run(tmp_path), plain_run(tmp_path)], out)
    assert (out / "grad_norm.png").exists()
    written = write_report([tmp_path / "quick-b"], out)
    assert out / "grad_norm.png" not in written
    assert not (out / "grad_norm.png").exists()
    assert (out / "loss.png").exists()


def test_legend_labels_carry_only_the_recipe_keys_that_differ():
    assert legend_labels(["a", "b"], [recipe(3e-3), recipe(3e-4)]) == ["a (lr=0.003)", "b (lr=0.0003)"]


def test_legend_keys_are_shortened_only_as_far_as_they_stay_unambiguous():
    other = recipe(3e-3) | {"optim": {"name": "sgd", "lr": 3e-3, "betas": [0.9, 0.95]},
                            "engine": {"name": "accelerate"}}
    assert legend_labels(["a", "b"], [recipe(3e-3), other]) == [
        "a (optim.name=adamw, engine.name=deepspeed)", "b (optim.name=sgd, engine.name=accelerate)"]


def test_legend_counts_the_differences_it_has_no_room_for_and_leaves_runs_without_a_recipe_alone():
    many = {"name": "x", "a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    fewer = {"name": "x", "a": 0}
    assert legend_labels(["m", "f", "script-run"], [many, fewer, {}]) == [
        "m (a=1, b=2, c=3, +2 more)", "f (a=0)", "script-run"]


def test_summary_table_reads_each_runs_summary_record(tmp_path):
    rows = summary_table([resumed_run(tmp_path), plain_run(tmp_path)])
    assert rows[0] == {"run": "quick-a", "steps": 240, "monitor": "val_loss", "best": 0.5, "best_step": 200,
                       "val_loss": 0.55, "val_acc": 0.81, "samples_per_s": 1003.2, "seconds": 61.5,
                       "end": "stopped early"}
    assert [rows[1][k] for k in ("steps", "best", "best_step", "end")] == [300, 0.7, 300, "done"]


def test_summary_table_of_a_preempted_run_comes_from_its_last_records(tmp_path):
    plan = {"name": "quick", "recipe": {"train": {"monitor": "val_acc", "monitor_mode": "auto"}}}
    # Windows of 5 steps: the first holds the warm-up, the one to step 15 an evaluation.
    windows = [train(step, 1e-3, 1.0) | {"samples_per_s": rate}
               for step, rate in ((5, 300.0), (10, 1000.0), (15, 400.0), (20, 1010.0))]
    run = write_run(tmp_path, "cut", [*windows[:2], {"kind": "eval", "step": 10, "val_loss": 0.8, "val_acc": 0.7},
                                      *windows[2:], {"kind": "eval", "step": 20, "val_loss": 0.9, "val_acc": 0.6},
                                      {"kind": "preempted", "step": 20}], plan)
    [row] = summary_table([run])
    assert (row["steps"], row["monitor"], row["best"], row["best_step"]) == (20, "val_acc", 0.7, 10)
    assert (row["val_loss"], row["val_acc"], row["seconds"], row["end"]) == (0.9, 0.6, None, "preempted")
    assert row["samples_per_s"] == 1000.0  # the median past the first window, as the trainer's summary reads


def test_steps_a_resume_trained_again_count_once_as_they_stand(tmp_path):
    # Killed after step 12's records, resumed from the checkpoint at step 8: steps 9-12
    # and the evaluation at 10 were made again, and only the second ones are the run's.
    plan = {"name": "quick", "recipe": {"train": {"monitor": "val_loss", "monitor_mode": "auto"}}}
    records = [train(s, 1e-3, 1.0) for s in range(1, 13)]
    records += [{"kind": "eval", "step": 10, "val_loss": 0.4, "val_acc": 0.9},
                {"kind": "resume", "step": 8, "checkpoint": "step-00000008"}]
    records += [train(s, 1e-3, 2.0) for s in range(9, 17)]
    records += [{"kind": "eval", "step": 10, "val_loss": 0.8, "val_acc": 0.7}]
    run = load_run(write_run(tmp_path, "again", records, plan))
    assert [r["step"] for r in run.train] == list(range(1, 17))
    assert [r["grad_norm"] for r in run.train if r["step"] > 8] == [2.0] * 8
    [row] = summary_table([tmp_path / "again"])
    assert (row["best"], row["best_step"], row["val_loss"]) == (0.8, 10, 0.8)


def test_format_table_aligns_text_left_and_numbers_right(tmp_path):
    text = format_table(summary_table([resumed_run(tmp_path), plain_run(tmp_path)]))
    header, rule, *rows = text.splitlines()
    spans, start = [], 0
    for dashes in rule.split("  "):
        spans.append((start, start + len(dashes)))
        start += len(dashes) + 2
    cells = [[line.ljust(len(rule))[a:b] for a, b in spans] for line in (header, *rows)]
    assert [c.strip() for c in cells[0]] == ["run", "steps", "monitor", "best", "best step", "val_loss",
                                             "val_acc", "samples/s", "seconds", "end"]
    assert [c.strip() for c in cells[1]] == ["quick-a", "240", "val_loss", "0.5000", "200", "0.5500",
                                             "0.8100", "1,003", "61.5", "stopped early"]
    for line in cells[1:]:
        assert line[0] == line[0].lstrip() and line[-1] == line[-1].lstrip()  # text: left
        assert all(c == c.rstrip() for c in line[1:2] + line[3:-1])  # numbers: right


def test_summary_md_holds_the_table_and_links_the_plots(tmp_path):
    write_report([resumed_run(tmp_path)], tmp_path / "report")
    markdown = (tmp_path / "report" / "summary.md").read_text()
    assert "| run | steps | monitor | best |" in markdown
    assert "| quick-a | 240 | val_loss | 0.5000 | 200 |" in markdown
    assert "![loss](loss.png)" in markdown


def test_a_run_without_plan_json_is_named_by_its_directory(tmp_path):
    run = write_run(tmp_path, "script-run", [train(s, 1e-3, None) for s in range(1, 5)], plan=None)
    assert write_report([run], tmp_path / "report")[-1].name == "summary.md"
    assert summary_table([run])[0]["run"] == "script-run"


@pytest.mark.parametrize("make", [lambda d: d.mkdir(), lambda d: None])
def test_a_directory_that_is_not_a_run_is_one_clear_usage_error(tmp_path, make):
    make(tmp_path / "nope")
    with pytest.raises(UsageError) as err:
        write_report([tmp_path / "nope"], tmp_path / "report")
    assert str(err.value).startswith(f"error: RUN_DIR: '{tmp_path / 'nope'}' ")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "report").exists()


def test_ema_is_debiased_and_steps_over_nan():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([1.0, math.nan, 3.0], 0.5) == pytest.approx([1.0, 1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, launcher.report; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0
