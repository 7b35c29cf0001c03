"""`dlaunch lr-find`: the LR range test on the quickstart recipe suggests an LR, and the
recipe it writes with that LR trains to 95% held-out accuracy."""

from __future__ import annotations

import json
import statistics

import pytest
from PIL import Image

from tests.conftest import dlaunch, metrics, only_run_dir

pytestmark = pytest.mark.integration


def quiet(root) -> list[str]:
    return ["--set", f"logging.run_root={root}", "--set", "logging.progress=false", "--set", "logging.report=false"]


def test_lr_find_suggests_an_lr_that_trains_the_quickstart_to_95_percent(tmp_path):
    tuned = tmp_path / "tuned.yaml"
    found = dlaunch("lr-find", "recipes/quickstart.yaml", *quiet(tmp_path / "lr"), "--apply", str(tuned))
    assert found.returncode == 0, found.stderr[-4000:]
    lr_dir = only_run_dir(tmp_path / "lr")
    assert lr_dir.name.startswith("quickstart-lr-find-")
    assert sorted(p.name for p in lr_dir.iterdir()) == ["lr_find.json", "lr_find.png", "recipe.yaml"]
    [line] = [line for line in found.stdout.splitlines() if line.startswith("dlaunch: lr-find: suggested LR")]
    assert str(lr_dir / "lr_find.png") in line and str(lr_dir / "lr_find.json") in line and str(tuned) in line

    with Image.open(lr_dir / "lr_find.png") as image:
        assert image.format == "PNG"
        assert 600 <= image.width <= 2000 and 400 <= image.height <= 1500
        image.verify()

    curve = json.loads((lr_dir / "lr_find.json").read_text())
    lrs, losses, smoothed = curve["lrs"], curve["losses"], curve["smoothed"]
    assert len(lrs) == len(losses) == len(smoothed) == curve["steps_run"] > 50
    # The model learned during the sweep: the loss of single steps fell far, the smoothed
    # one (which lags it) clearly below its level over the first quarter of the sweep,
    # where the LR is too small to learn. (Not below its first value: that is one batch's
    # loss, and how far under it the curve gets varied with the CPU's float kernels; an
    # AVX-512 machine gave 0.975 of it.)
    assert min(losses) < 0.85 * losses[0]
    assert min(smoothed) < 0.97 * statistics.median(smoothed[:len(smoothed) // 4])
    suggestion = curve["suggestion"]
    assert curve["min_lr"] < suggestion < curve["max_lr"]
    assert suggestion == pytest.approx(lrs[smoothed.index(min(smoothed))] / 10)
    # One process, the recipe's global batch (2 ranks x 32) made up by accumulation.
    assert (curve["micro_batch"], curve["grad_accum"], curve["global_batch"]) == (32, 2, 64)

    text = tuned.read_text()
    assert text.startswith("# The first recipe:")  # the recipe as written, comments and all
    trained = dlaunch("run", str(tuned), "--set", f"logging.run_root={tmp_path / 'train'}")
    assert trained.returncode == 0, trained.stderr[-4000:]
    run_dir = only_run_dir(tmp_path / "train")
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["training"]["lr"]["scaled"] == pytest.approx(suggestion, rel=1e-2)  # written to 3 digits
    [summary] = metrics(run_dir, "summary")
    assert summary["val_acc"] >= 0.95


@pytest.mark.parametrize("args", [["--min-lr", "1e-2", "--max-lr", "1e-3"], ["--steps", "9"],
                                  ["--set", "optim.lrr=1e-3"]])
def test_bad_lr_find_input_is_one_error_line_and_nothing_written(tmp_path, args):
    result = dlaunch("lr-find", "recipes/quickstart.yaml", *quiet(tmp_path / "runs"), *args)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_lr_find_refuses_to_overwrite_the_recipe_it_measures(write_recipe, tmp_path):
    recipe = write_recipe("name: quick\n")
    before = recipe.read_text()
    result = dlaunch("lr-find", str(recipe), *quiet(tmp_path / "runs"), "--apply", str(recipe))
    assert result.returncode == 2
    assert result.stderr.startswith("error: --apply: ") and len(result.stderr.splitlines()) == 1
    assert recipe.read_text() == before


def test_lr_find_runs_on_a_recipe_with_frozen_layers(tmp_path):
    # The range test re-plans the recipe for one process; the plan of a transfer-learning
    # recipe needs the model's facts (frozen parameters), which it once lost on the way.
    result = dlaunch("lr-find", "recipes/quickstart.yaml", *quiet(tmp_path / "runs"), "--steps", "60",
                     "--set", "model.freeze=[stem.*]")
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = list((tmp_path / "runs").iterdir())
    curve = json.loads((run_dir / "lr_find.json").read_text())
    assert len(curve["lrs"]) == 60
