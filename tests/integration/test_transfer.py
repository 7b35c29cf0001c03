"""Transfer learning end to end, on real runs: pretrain the CNN on digits 0-4, fine-tune
its head on 5-9 with the features frozen, and compare with the same head trained for the
same steps on the same, but randomly initialised, frozen features. Then gradual
unfreezing under DeepSpeed ZeRO-3 and Accelerate DDP, read back from the checkpoints of
every step, and the one-line errors of patterns that match nothing."""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import dlaunch, kill_after, metrics, only_run_dir, resume_to_identical_weights

pytestmark = pytest.mark.integration

RECIPE = """
name: {name}
model: {{name: cnn, kwargs: {{channels: [16, 32]}}{model}}}
data: {{source: digits, classes: {classes}}}
optim: {{lr: {lr}{optim}}}
train: {{micro_batch_size: 32, max_steps: {steps}, early_stopping: {{patience: null}}{train}}}
logging: {{run_root: {root}, progress: false, report: false{logging}}}
{extra}"""
OLD, NEW = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
FINE_TUNE_STEPS = 20
FROZEN_FEATURES = ", freeze: [stem.*, blocks.*]"


def train(root: Path, name: str, *args: str, classes: list[int] = NEW, steps: int = FINE_TUNE_STEPS,
          lr: float = 0.1, model: str = "", optim: str = "", train: str = "", logging: str = "",
          extra: str = "") -> Path:
    """One `dlaunch run` of RECIPE; its run directory."""
    recipe = root / f"{name}.yaml"
    recipe.write_text(RECIPE.format(name=name, classes=classes, steps=steps, lr=lr, model=model, optim=optim,
                                    train=train, logging=logging, extra=extra, root=root / name))
    result = dlaunch("run", str(recipe), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run_dir(root / name)


def final_acc(run_dir: Path) -> float:
    return metrics(run_dir, "summary")[-1]["val_acc"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """(a) the CNN trained on digits 0-4 (DeepSpeed ZeRO-2, bf16: the defaults)."""
    return train(tmp_path_factory.mktemp("pretrain"), "pretrain", classes=OLD, steps=60, lr=1e-2)


@pytest.fixture(scope="module")
def fine_tuned(pretrained, tmp_path_factory) -> Path:
    """(b) a new head on 5-9 over the pretrained, frozen features."""
    return train(tmp_path_factory.mktemp("fine-tune"), "fine-tune",
                 model=f", init_from: {pretrained}, init_exclude: [head.*]{FROZEN_FEATURES}")


def test_fine_tuned_head_beats_the_same_head_on_random_frozen_features(pretrained, fine_tuned, tmp_path):
    scratch_head = train(tmp_path, "scratch-head", model=FROZEN_FEATURES)  # (c) no init_from
    figures = {"pretrain on 0-4": final_acc(pretrained), "head on pretrained features": final_acc(fine_tuned),
               "head on random features": final_acc(scratch_head)}
    print(", ".join(f"{k}: val_acc {v:.3f}" for k, v in figures.items()))
    assert figures["head on pretrained features"] >= figures["head on random features"] + 0.1


def test_frozen_parameters_end_bit_identical_and_the_head_trains(pretrained, fine_tuned):
    init, final = torch.load(pretrained / "model.pt"), torch.load(fine_tuned / "model.pt")
    assert init.keys() == final.keys()
    for name in init:
        if name.startswith("head."):
            assert not torch.equal(init[name], final[name]), f"{name} did not train"
        else:
            assert torch.equal(init[name], final[name]), f"frozen {name} changed"


def zero_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """A DeepSpeed checkpoint's fp32 weights, as DeepSpeed's own zero_to_fp32 reads them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {name: t.detach() for name, t in state.items()}


UNFREEZE_AT = 3
LR = 1e-2


@dataclass(frozen=True)
class Unfrozen:
    recipe: Path
    run_dir: Path
    init_from: Path
    init: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def unfrozen(pretrained, tmp_path_factory) -> dict[str, Unfrozen]:
    """Fine-tuning runs in which blocks.1 is frozen until step 3, with half the LR from
    then on, and stem and blocks.0 stay frozen: under DeepSpeed ZeRO-3 from a ZeRO-2
    checkpoint of the pretraining (its fp32 master weights, copied), and under Accelerate
    DDP from the pretrained weights as a .safetensors file; two ranks, fp32."""
    checkpoint = pretrained / "checkpoints" / (pretrained / "checkpoints" / "latest").read_text().strip()
    runs = {}
    for engine, stage in (("deepspeed", 3), ("accelerate", 0)):
        root = tmp_path_factory.mktemp(f"unfreeze-{engine}")
        if engine == "deepspeed":
            init_from = root / "checkpoints" / checkpoint.name
            shutil.copytree(checkpoint, init_from)
            init = zero_weights(init_from / "engine" / "deepspeed")
        else:
            init_from = root / "pretrained.safetensors"
            save_file(torch.load(pretrained / "model.pt"), init_from)
            init = load_file(init_from)
        run_dir = train(root, "unfreeze", "--procs-per-node", "2", steps=5, lr=LR,
                        model=f", init_from: {init_from}, init_exclude: [head.*]{FROZEN_FEATURES}, "
                              f"unfreeze: [{{at_step: {UNFREEZE_AT}, patterns: [blocks.1.*]}}]",
                        optim=", lr_multipliers: {blocks.*: 0.5}", train=", checkpoint_every: 1, keep_last: 5",
                        logging=", log_every: 1",
                        extra=f"engine: {{name: {engine}, zero_stage: {stage}}}\nprecision: {{dtype: fp32}}\n"
                              "schedule: {name: constant, warmup_steps: 0}\n")
        runs[engine] = Unfrozen(root / "unfreeze.yaml", run_dir, init_from, init)
    return runs


@pytest.mark.parametrize("engine", ["deepspeed", "accelerate"])
def test_parameters_unfrozen_later_hold_until_their_step_then_train(unfrozen, engine):
    run = unfrozen[engine]

    def weights(step: int) -> dict[str, torch.Tensor]:
        engine_dir = run.run_dir / "checkpoints" / f"step-{step:08d}" / "engine"
        return zero_weights(engine_dir / "deepspeed") if engine == "deepspeed" else load_file(
            engine_dir / "model.safetensors")

    def same(state: dict[str, torch.Tensor], prefix: str) -> bool:
        names = [n for n in state if n.startswith(prefix)]
        assert names
        return all(torch.equal(state[n], run.init[n]) for n in names)

    for step in range(1, UNFREEZE_AT + 1):
        state = weights(step)
        assert same(state, "stem.") and same(state, "blocks.0.") and same(state, "blocks.1."), step
        assert not same(state, "head.")
    for step in (UNFREEZE_AT + 1, 5):
        state = weights(step)
        assert same(state, "stem.") and same(state, "blocks.0."), step
        assert not same(state, "blocks.1."), step

    # The LR each group steps with next: the base LR, and blocks.1's half of it from step 3.
    lrs = {r["step"]: (r["lr"], r["lr/x1"], r["lr/x0.5@3"]) for r in metrics(run.run_dir, "train")}
    assert lrs == {step: (LR, LR, 0.0 if step < UNFREEZE_AT else LR / 2) for step in range(1, 6)}


def test_a_run_killed_at_its_unfreeze_step_resumes_to_the_same_weights_without_its_initial_ones(
        unfrozen, tmp_path):
    """The checkpoint of step 3 precedes blocks.1's first update and the fresh optimizer
    state it starts with; the resumed run reads its own checkpoint, not init_from."""
    run = unfrozen["deepspeed"]
    killed_root = tmp_path / "killed"
    recipe = run.recipe.read_text().replace(str(run.run_dir.parent), str(killed_root))
    (tmp_path / "killed.yaml").write_text(recipe)
    killed = dlaunch("run", str(tmp_path / "killed.yaml"), "--procs-per-node", "2",
                     env=kill_after(UNFREEZE_AT))
    assert killed.returncode != 0
    shutil.rmtree(run.init_from)
    resume_to_identical_weights(only_run_dir(killed_root), run.run_dir, UNFREEZE_AT)


@pytest.mark.parametrize("model,optim,error", [
    (", freeze: [stme.*]", "", "error: model.freeze (line 3): 'stme.*' matches no parameter; the "
     "parameters are named like stem.0.0.weight, blocks.0.conv1.0.weight, head.weight (20 in all)"),
    (", freeze: [stem.*], unfreeze: [{at_step: 2, patterns: [head.*]}]", "",
     "error: model.unfreeze.0.patterns (line 3): 'head.*' matches no frozen parameter"),
    ("", ", lr_multipliers: {blocks.*: 0.5, blocks.0.*: 0.1}",
     "error: optim.lr_multipliers (line 5): 'blocks.0.*' sets no parameter's LR: an earlier pattern, "
     "'blocks.*', matches all of its"),
])
def test_a_pattern_that_changes_nothing_is_one_error_line(tmp_path, model, optim, error):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(name="bad", classes=NEW, steps=5, lr=LR, model=model, optim=optim,
                                    train="", logging="", extra="", root=tmp_path / "runs"))
    result = dlaunch("run", str(recipe))
    assert result.returncode == 2
    assert result.stderr.startswith(error) and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "runs").exists()


def test_initial_weights_that_do_not_fit_are_one_error_line(pretrained, tmp_path):
    """All ten digits need a ten-class head; the pretrained one has five."""
    result = dlaunch("plan", "recipes/quickstart.yaml", "--set", "model.kwargs.channels=[16, 32]",
                     "--set", f"model.init_from={pretrained}")
    assert result.returncode == 2
    assert result.stderr == (
        f"error: model.init_from (--set): {pretrained} does not fit the model: 2 of another shape "
        "(head.weight: [5, 32] there, [10, 32] here, head.bias: [5] there, [10] here); list what should "
        "keep its new initialisation in model.init_exclude\n")
