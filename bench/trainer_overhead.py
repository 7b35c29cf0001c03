"""Trainer overhead: `dlaunch run` against a hand-written loop on the same model, batch,
precision and steps: DeepSpeed ZeRO 0-3 against a minimal DeepSpeed loop under torchrun,
and Accelerate (DDP) against a minimal Accelerate loop under `accelerate launch`.

    .venv/bin/python bench/trainer_overhead.py [--repeats 3] [--steps 60]
                                               [--out bench/results/trainer_overhead.json]

The job (bench/launchers.py): the built-in GPT (4 layers, width 128, 0.87M parameters
with its 512-token vocabulary), rows of 63 tokens, micro-batch 16 on each of 2 ranks,
bf16, AdamW, clipping at 1.0. Throughput is samples/s over each window of 10 steps, as
dlaunch's trainer logs it and the loops log it the same way; a run's figure is the
median of its windows past the first, a case's the median over its repeats. The two runs
of a pair go one after the other, in alternating order, so that drift in the machine's
speed falls on both.

dlaunch runs with its defaults (progress bar, TensorBoard, module gradient and weight
norms at logged steps); the `lean` row of each engine turns its per-logged-step
diagnostics off, to tell their cost from the loop's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import launchers  # noqa: E402

LEAN = ", module_grad_norms: false, weight_norms: false, tensorboard: false, progress: false"
LOG_EVERY = 10


def cases() -> list[dict]:
    rows = [{"case": f"DeepSpeed ZeRO-{stage}", "engine": f"{{name: deepspeed, zero_stage: {stage}}}",
             "baseline": "deepspeed", "zero_stage": stage} for stage in range(4)]
    rows.append({"case": "Accelerate DDP", "engine": "{name: accelerate}", "baseline": "accelerate", "zero_stage": 0})
    return rows


def measure(launch: launchers.Launch) -> float:
    result = subprocess.run(launch.command, env=launch.env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(launch.command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return launchers.steady_rate(launchers.logged_steps(launch), warmup_steps=LOG_EVERY)


def run_case(root: Path, case: dict, repeat: int, steps: int, lean: bool) -> dict[str, float]:
    name = f"{case['baseline']}-z{case['zero_stage']}-r{repeat}"
    runs = {
        "dlaunch": lambda: measure(launchers.dlaunch(root, f"dlaunch-{name}", case["engine"], steps, LOG_EVERY)),
        "baseline": lambda: measure(
            launchers.deepspeed_loop(root, f"loop-{name}", case["zero_stage"], steps, LOG_EVERY)
            if case["baseline"] == "deepspeed" else launchers.accelerate_loop(root, f"loop-{name}", steps, LOG_EVERY)),
    }
    if lean:
        runs["lean"] = lambda: measure(launchers.dlaunch(root, f"lean-{name}", case["engine"], steps, LOG_EVERY, LEAN))
    order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
    return {kind: runs[kind]() for kind in order}


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--no-lean", dest="lean", action="store_false", help="skip the lean dlaunch runs")
    parser.add_argument("--out", default="bench/results/trainer_overhead.json")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="dlaunch-overhead-") as tmp:
        for case in cases():
            runs = [run_case(Path(tmp), case, repeat, args.steps, args.lean) for repeat in range(args.repeats)]
            row = {"case": case["case"], "runs": runs}
            for kind in runs[0]:
                row[kind] = summary([run[kind] for run in runs])
                # Each repeat's own ratio: its spread says how far one pair can be trusted.
                row[f"{kind}_ratio"] = summary([run[kind] / run["baseline"] for run in runs])
            results.append(row)
            print(f"{case['case']}: " + ", ".join(f"{k} {row[k]['median']:.1f}" for k in runs[0]), flush=True)

    kinds = [k for k in ("dlaunch", "lean") if k in results[0]]
    print(f"\n{'case':<18} {'hand-written':>14} " + " ".join(f"{k + ' samples/s':>18} {'ratio (spread)':>20}"
                                                           for k in kinds))
    for row in results:
        base = row["baseline"]
        cells = [f"{row[k]['median']:>18.1f} {row[k + '_ratio']['median']:>8.3f} "
                 f"({row[k + '_ratio']['min']:.3f}-{row[k + '_ratio']['max']:.3f})" for k in kinds]
        print(f"{row['case']:<18} {base['median']:>14.1f} " + " ".join(cells))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "processor": platform.processor() or platform.machine(),
                               "steps": args.steps, "repeats": args.repeats, "shape": launchers.SHAPE,
                               "ranks": launchers.RANKS, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
