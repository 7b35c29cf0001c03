"""Start-up: wall time from the command to the first optimizer step, and to its exit, of
a 10-step job started by `dlaunch run`, by torchrun (a hand-written DeepSpeed loop) and by
`accelerate launch` (a hand-written Accelerate loop); and how long `dlaunch --help` and
`dlaunch plan` take against `torchrun --help`.

    .venv/bin/python bench/startup.py [--repeats 5] [--out bench/results/startup.json]

The job is bench/trainer_overhead.py's (bench/launchers.py) on 2 ranks, with every step
logged: the first optimizer step ends when rank 0 logs step 1 (dlaunch's metrics.jsonl,
the loops' JSONL in the same shape). dlaunch also evaluates, checkpoints and writes its
report after the last step; the loops do none of that, so "exit" is measured twice for
dlaunch: with its defaults, and with `logging.report: false`. Medians of the repeats,
the jobs interleaved so that drift in the machine's speed falls on all of them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import launchers  # noqa: E402

STEPS = 10
ROOT = Path(__file__).resolve().parents[1]


DEEPSPEED = "{name: deepspeed, zero_stage: 2}"
JOBS = {
    "dlaunch run, DeepSpeed ZeRO-2": lambda root, name: launchers.dlaunch(root, name, DEEPSPEED, STEPS, 1),
    "dlaunch run, DeepSpeed ZeRO-2, no report": lambda root, name: launchers.dlaunch(
        root, name, DEEPSPEED, STEPS, 1, ", report: false"),
    "torchrun, hand-written DeepSpeed ZeRO-2": lambda root, name: launchers.deepspeed_loop(root, name, 2, STEPS, 1),
    "dlaunch run, Accelerate DDP": lambda root, name: launchers.dlaunch(root, name, "{name: accelerate}", STEPS, 1),
    "accelerate launch, hand-written DDP": lambda root, name: launchers.accelerate_loop(root, name, STEPS, 1),
}


def jobs(root: Path, repeat: int) -> dict[str, launchers.Launch]:
    """Every job of one repeat, in the opposite order to the repeat before."""
    kinds = list(JOBS) if repeat % 2 == 0 else list(reversed(JOBS))
    return {kind: JOBS[kind](root, f"job{list(JOBS).index(kind)}-{repeat}") for kind in kinds}


def time_job(launch: launchers.Launch) -> dict[str, float]:
    started = time.time()
    result = subprocess.run(launch.command, env=launch.env, capture_output=True, text=True)
    exited = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(launch.command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    steps = launchers.logged_steps(launch)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), steps
    return {"first_step_s": steps[0]["time"] - started, "last_step_s": steps[-1]["time"] - started,
            "exit_s": exited}


def time_command(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT, env=launchers.env())
    return time.perf_counter() - started


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/startup.json")
    args = parser.parse_args()

    bin_ = launchers.BIN
    commands = {"torchrun --help": [str(bin_ / "torchrun"), "--help"],
                "dlaunch --help": [str(bin_ / "dlaunch"), "--help"],
                "dlaunch plan recipes/quickstart.yaml": [str(bin_ / "dlaunch"), "plan", "recipes/quickstart.yaml"],
                "dlaunch plan recipes/tiny-gpt.yaml": [str(bin_ / "dlaunch"), "plan", "recipes/tiny-gpt.yaml"]}
    # Interleaved, one of each in turn, for the same reason as the jobs.
    timings: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(3 * args.repeats):
        for name, command in commands.items():
            timings[name].append(time_command(command))
    cli = {name: spread(values) for name, values in timings.items()}

    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="dlaunch-startup-") as tmp:
        for repeat in range(args.repeats):
            for kind, launch in jobs(Path(tmp), repeat).items():
                runs.setdefault(kind, []).append(time_job(launch))
    job_rows = {kind: {key: spread([r[key] for r in results]) for key in results[0]} for kind, results in runs.items()}

    base = cli["torchrun --help"]["median"]
    print(f"{'command':<40} {'seconds':>8} {'spread':>13} {'torchrun --help / it':>21}")
    for name, row in cli.items():
        print(f"{name:<40} {row['median']:>8.3f} {row['min']:>6.3f}-{row['max']:<6.3f} {base / row['median']:>20.1f}x")
    print(f"\n{'10-step job':<42} {'first step s':>12} {'last step s':>11} {'exit s':>7} {'exit spread':>12}")
    for kind, row in job_rows.items():
        print(f"{kind:<42} {row['first_step_s']['median']:>12.2f} {row['last_step_s']['median']:>11.2f} "
              f"{row['exit_s']['median']:>7.2f} {row['exit_s']['min']:>5.2f}-{row['exit_s']['max']:<5.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "repeats": args.repeats, "commands": cli,
                               "jobs": job_rows, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
