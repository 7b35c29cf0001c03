"""Held-out accuracy on digits 5-9 after a few steps: a new head on features pretrained on
digits 0-4 (frozen), against the same head on random frozen features and the whole
model trained from scratch, each for the same steps; over several seeds.

    .venv/bin/python bench/transfer.py [--seeds 1 2 3] [--steps 20] [--out bench/results/transfer.json]

The runs are those of tests/integration/test_transfer.py (which asserts the first beats
the second): the CNN (channels 16, 32), DeepSpeed ZeRO-2, bf16, one process. The seed
is train.seed of every run of a row, the pretraining's included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = """
name: {name}
model: {{name: cnn, kwargs: {{channels: [16, 32]}}{model}}}
data: {{source: digits, classes: {classes}}}
optim: {{lr: {lr}}}
train: {{micro_batch_size: 32, max_steps: {steps}, seed: {seed}, early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, progress: false, report: false}}
"""
FROZEN_FEATURES = ", freeze: [stem.*, blocks.*]"


def run(root: Path, name: str, **values: object) -> tuple[Path, float]:
    """(run dir, final val_acc) of one `dlaunch run`."""
    recipe = root / f"{name}.yaml"
    recipe.write_text(RECIPE.format(name=name, root=root / name, **values))
    subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe)], check=True, capture_output=True)
    [run_dir] = (root / name).iterdir()
    summary = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    return run_dir, summary["val_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--pretrain-steps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20, help="steps of every run on digits 5-9")
    parser.add_argument("--out", default="bench/results/transfer.json")
    args = parser.parse_args()

    names = ["pretrain on 0-4", "head on pretrained features", "head on random features",
             "whole model from scratch"]
    results: dict[str, list[float]] = {name: [] for name in names}
    new = dict(classes=[5, 6, 7, 8, 9], steps=args.steps, lr=0.1)
    with tempfile.TemporaryDirectory(prefix="dlaunch-bench-") as tmp:
        for seed in args.seeds:
            root = Path(tmp) / f"seed-{seed}"
            root.mkdir()
            pretrained, acc = run(root, "pretrain", classes=[0, 1, 2, 3, 4], steps=args.pretrain_steps,
                                  lr=1e-2, seed=seed, model="")
            results[names[0]].append(acc)
            fine_tune = f", init_from: {pretrained}, init_exclude: [head.*]{FROZEN_FEATURES}"
            for name, model in zip(names[1:], (fine_tune, FROZEN_FEATURES, ""), strict=True):
                results[name].append(run(root, name.replace(" ", "-"), seed=seed, model=model, **new)[1])
            last = ", ".join(f"{name} {values[-1]:.3f}" for name, values in results.items())
            print(f"seed {seed}: {last}", flush=True)

    print(f"val_acc on the held-out rows after {args.steps} steps on digits 5-9 "
          f"(median, min-max of seeds {args.seeds}):")
    for name, values in results.items():
        print(f"  {name:30} {statistics.median(values):.3f}  {min(values):.3f}-{max(values):.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seeds": args.seeds, "pretrain_steps": args.pretrain_steps,
                               "steps": args.steps, "val_acc": results}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
