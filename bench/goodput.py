"""Goodput: the share of wall time spent on training steps that were kept, when a worker
is SIGKILLed every K steps and the job restarts itself (train.max_restarts) from its
latest checkpoint, against the same run without faults.

    .venv/bin/python bench/goodput.py [--every 45 95 145] [--checkpoint-every 10 25] [--steps 300]
                                      [--out bench/results/goodput.json]

A kept step is worth what a step costs in the fault-free run (its training loop's time
over its steps), so goodput = steps x that cost / wall time of the whole command, start-up
included; the fault-free run's own goodput is below 1 by its start-up and checkpoints.
Steps lost are those trained again after each restart: the step a rank was killed after,
less the checkpoint the next attempt resumed from. Rank 1 of 2 (2 emulated nodes, one
process each) is the one killed; DeepSpeed ZeRO-2, fp32, CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """
name: {name}
model: {{name: cnn, kwargs: {{channels: [16, 32]}}}}
data: {{source: digits}}
optim: {{lr: 1.0e-2}}
engine: {{name: deepspeed, zero_stage: 2}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 64, max_steps: {steps}, eval_every: {steps}, checkpoint_every: {checkpoint_every},
        keep_last: 2, max_restarts: 1000, early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, progress: false, report: false}}
"""


def run(root: Path, name: str, steps: int, checkpoint_every: int, every: int | None) -> dict:
    """One `dlaunch run` on 2 nodes: its wall time, loop time and restarts."""
    recipe = root / f"{name}.yaml"
    recipe.write_text(RECIPE.format(name=name, root=root / name, steps=steps, checkpoint_every=checkpoint_every))
    env = {}
    if every is not None:
        env["DLAUNCH_FAULTS"] = json.dumps([{"kind": "kill", "rank": 1, "every": every}])
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe), "--nodes", "2"], check=True,
                   capture_output=True, env={**os.environ, **env})
    wall = time.perf_counter() - started
    [run_dir] = (root / name).iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumes = [r["step"] for r in records if r["kind"] == "resume"]
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["steps"] == steps, summary
    killed_after = [every * (attempt + 1) for attempt in range(len(resumes))] if every else []
    return {"wall_s": wall, "loop_s": summary["seconds"], "restarts": len(resumes),
            "steps_lost": sum(k - r for k, r in zip(killed_after, resumes, strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Fault intervals that are not multiples of the checkpoint intervals: a fault strikes
    # between two checkpoints, as it would in a real run, and the steps since are lost.
    parser.add_argument("--every", type=int, nargs="+", default=[45, 95, 145], help="steps between faults")
    parser.add_argument("--checkpoint-every", type=int, nargs="+", default=[10, 25])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="bench/results/goodput.json")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="dlaunch-goodput-") as tmp:
        for interval in args.checkpoint_every:
            base = run(Path(tmp), f"clean-c{interval}", args.steps, interval, None)
            step_s = base["loop_s"] / args.steps
            rows.append({"every": None, "checkpoint_every": interval, **base,
                         "goodput": args.steps * step_s / base["wall_s"], "vs_fault_free": 1.0})
            for every in args.every:
                faulty = run(Path(tmp), f"every{every}-c{interval}", args.steps, interval, every)
                # What a restart costs beyond the steps it loses: stopping, starting, resuming.
                restart_s = (faulty["wall_s"] - base["wall_s"] - faulty["steps_lost"] * step_s) / faulty["restarts"]
                rows.append({"every": every, "checkpoint_every": interval, **faulty, "restart_s": restart_s,
                             "goodput": args.steps * step_s / faulty["wall_s"],
                             "vs_fault_free": base["wall_s"] / faulty["wall_s"]})

    print(f"{'fault every':>11} {'ckpt every':>10} {'restarts':>8} {'steps lost':>10} {'wall s':>7} "
          f"{'goodput':>7} {'vs no faults':>12} {'s/restart':>9}")
    for row in rows:
        every = "never" if row["every"] is None else f"{row['every']} steps"
        print(f"{every:>11} {row['checkpoint_every']:>10} {row['restarts']:>8} {row['steps_lost']:>10} "
              f"{row['wall_s']:>7.1f} {row['goodput']:>7.1%} {row['vs_fault_free']:>12.2f} "
              f"{row.get('restart_s', 0.0):>9.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "steps": args.steps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
