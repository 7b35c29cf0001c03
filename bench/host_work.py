"""Host work per training step: the operators a step dispatches and the values it reads
back to the host, for `dlaunch run` and the hand-written DeepSpeed loop at ZeRO 0-2 on
one rank, counted from a torch.profiler trace of ten steps (one of them a logged step).

    .venv/bin/python bench/host_work.py [--stages 0 1 2] [--out bench/results/host_work.json]
    .venv/bin/python bench/host_work.py --time 5 [--stages 0]   # the same rows, timed
    .venv/bin/python bench/host_work.py --time 4 --paired --stages 0   # each beside the loop

Why counts: on a GPU each dispatched operator launches kernels, and each read
(aten::_local_scalar_dense: a tensor's .item(), float(), bool() or .tolist()) makes the
host wait for every kernel queued before it. Where a step reads back often, the GPU
idles while the host works between two reads, and host work becomes step time. The
counts do not depend on the device; the CPU times do, and only compare rows here.

The job: the built-in GPT with GPT-2 medium's 24 layers, and so its 292 parameter
tensors (DeepSpeed's per-tensor work scales with them), at width 64, rows of 63 tokens,
micro-batch 4, bf16, AdamW (torch's, built by DeepSpeed), clipping at 1.0. dlaunch runs
with its defaults (progress bar, TensorBoard, module gradient and weight norms at logged
steps); its `lean` row turns those off.

`--time N` runs the same rows without the profiler, N rounds in alternating order, and
reports each row's samples/s (the median of its 10-step windows past the first, then of
the rounds) and its ratio to the loop with dlaunch's groups and reads, which does the same
work a step by the counts. On the CPU each operator runs where it is dispatched, so this
times the whole step (at width 64 about a third of it is attention), not the host's share
alone as a GPU would. With `--paired` each row runs at the same time as that loop, one
core each, swapped round by round: on a shared VM the speed of one run against the next
moves by 20% and more, while two runs side by side move together (two copies of the loop
within 2% in 4 of 6 rounds, within 4% in 5).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import launchers  # noqa: E402
import trainer_overhead  # noqa: E402
from trainer_overhead import LEAN  # noqa: E402

SHAPE = {"micro_batch": 4, "seq_len": 64, "vocab": 512, "layers": 24, "heads": 4, "embd": 64, "lr": 1e-3}
STEPS, TIMED_STEPS, LOG_EVERY = 30, 60, 10
PAIRED_STEPS = 200  # dlaunch starts seconds after the loop: long runs keep their steady windows side by side
WINDOW = (11, 10)  # steps 11-20: past the warm-up, one logged step (20), no evaluation
READ = "aten::_local_scalar_dense"


LIKE_FOR_LIKE = "the same, + the trainer's reads every step"  # the row the timed ratios divide by


def variants(root: Path, stage: int, steps: int = STEPS, profiled: bool = True) -> dict[str, tuple[launchers.Launch, Path]]:
    """Each row's launch and the directory its rank-0 trace goes to (with ``profiled``)."""
    start, count = WINDOW

    def loop(name: str, *extra: str) -> tuple[launchers.Launch, Path]:
        launch = launchers.deepspeed_loop(root, name, stage, steps, LOG_EVERY, SHAPE, ranks=1,
                                          profile=f"{start}:{count}:{root / name}" if profiled else None)
        return launchers.Launch([*launch.command, *extra], launch.env, launch.steps_log), root / name

    def dlaunch(name: str, logging: str = "") -> tuple[launchers.Launch, Path]:
        profile = f", profile: {{start_step: {start}, steps: {count}}}" if profiled else ""
        launch = launchers.dlaunch(root, name, f"{{name: deepspeed, zero_stage: {stage}}}", steps, LOG_EVERY,
                                   profile + logging, ranks=1, shape=SHAPE)
        return launch, root / name  # the run directory inside, found once it has run
    return {
        "hand-written loop, one parameter group": loop(f"z{stage}-loop"),
        "  the same, dlaunch's two groups": loop(f"z{stage}-groups", "--decay-groups"),
        f"  {LIKE_FOR_LIKE}": loop(f"z{stage}-reads", "--decay-groups", "--trainer-reads"),
        "  the same, logits freed at the loss as dlaunch's step": loop(f"z{stage}-free", "--decay-groups",
                                                                      "--trainer-reads", "--free-logits"),
        "dlaunch run": dlaunch(f"z{stage}-dlaunch"),
        "dlaunch run, lean": dlaunch(f"z{stage}-lean", LEAN),
    }


def trace_of(where: Path) -> Path:
    """rank 0's Chrome trace: in the loop's profile directory, or in the profile folder of
    the one run directory under a dlaunch run root."""
    direct = where / "rank-0.trace.json"
    if direct.exists():
        return direct
    return launchers.only_run_dir(where) / "profile" / "rank-0.trace.json"


def host_work(trace: Path, steps: int) -> dict[str, float]:
    """Per step over the window: operators dispatched from Python (those not inside
    another operator), values read back, and the CPU time of the step spans."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: (e["ts"], -e["dur"]))
    open_until: dict[tuple, float] = defaultdict(float)  # per thread: the end of the outermost open op
    top_level = 0
    for op in ops:
        thread = (op["pid"], op["tid"])
        if op["ts"] >= open_until[thread]:
            top_level += 1
            open_until[thread] = op["ts"] + op["dur"]
    reads = sum(op["name"] == READ for op in ops)
    spans = [e["dur"] for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#")]
    return {"ops": top_level / steps, "reads": reads / steps, "step_ms": sum(spans) / 1e3 / len(spans)}


def run(launch: launchers.Launch) -> None:
    result = subprocess.run(launch.command, env=launch.env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(launch.command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def measure(launch: launchers.Launch, where: Path) -> dict[str, float]:
    run(launch)
    return host_work(trace_of(where), WINDOW[1])


def timed(stages: list[int], rounds: int) -> list[dict]:
    """Each row's samples/s without the profiler, round after round in alternating order
    (so that drift in the machine's speed falls on every row), and its ratio to the loop
    with dlaunch's groups and reads, round by round."""
    rates: dict[tuple[int, str], list[float]] = defaultdict(list)
    for stage in stages:
        for round_ in range(rounds):
            with tempfile.TemporaryDirectory(prefix="dlaunch-host-time-") as tmp:
                launches = list(variants(Path(tmp), stage, TIMED_STEPS, profiled=False).items())
                for name, (launch, _) in launches[::-1] if round_ % 2 else launches:
                    rates[stage, name.strip()].append(trainer_overhead.measure(launch))
    return _rows(rates, {key: [value / base for value, base in zip(values, rates[key[0], LIKE_FOR_LIKE])]
                         for key, values in rates.items()})


def paired(stages: list[int], rounds: int) -> list[dict]:
    """Each row at the same time as the loop with dlaunch's groups and reads, each pinned
    to a core of its own (the two swapped round by round): the machine's drift, which moves
    one run's speed against the next by 20% and more on a shared VM, falls on both alike."""
    rates: dict[tuple[int, str], list[float]] = defaultdict(list)
    ratios: dict[tuple[int, str], list[float]] = defaultdict(list)
    first, second = sorted(os.sched_getaffinity(0))[:2]  # the cores this process may use
    for stage in stages:
        for round_ in range(rounds):
            cores = (first, second) if round_ % 2 == 0 else (second, first)
            with tempfile.TemporaryDirectory(prefix="dlaunch-host-pair-") as tmp:
                launches = {name.strip(): launch
                            for name, (launch, _) in variants(Path(tmp), stage, PAIRED_STEPS, profiled=False).items()}
                for name in launches:  # the table in the rows' order
                    rates.setdefault((stage, name), [])
                base = launches.pop(LIKE_FOR_LIKE)
                for name, launch in launches.items():
                    base_rate, rate = side_by_side([base, launch], cores)
                    rates[stage, LIKE_FOR_LIKE].append(base_rate)
                    rates[stage, name].append(rate)
                    ratios[stage, name].append(rate / base_rate)
                    ratios[stage, LIKE_FOR_LIKE].append(1.0)
    return _rows(rates, ratios)


def side_by_side(launches: list[launchers.Launch], cores: tuple[int, ...]) -> list[float]:
    """Run the launches at once, each with its processes bound to one core; their steady
    samples/s."""
    procs = [subprocess.Popen(launch.command, env=launch.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, preexec_fn=functools.partial(os.sched_setaffinity, 0, {core}))
             for launch, core in zip(launches, cores)]
    errors = [proc.communicate()[1] for proc in procs]  # both ended before either is judged
    for launch, proc, err in zip(launches, procs, errors):
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(launch.command)} failed ({proc.returncode}):\n{err[-3000:]}")
    return [launchers.steady_rate(launchers.logged_steps(launch), warmup_steps=LOG_EVERY) for launch in launches]


def _rows(rates: dict[tuple[int, str], list[float]], ratios: dict[tuple[int, str], list[float]]) -> list[dict]:
    rows = []
    print(f"{'ZeRO':<5} {'row':<56} {'samples/s':>10} {'vs like for like':>17}  (spread)", flush=True)
    for (stage, name), values in rates.items():
        row_ratios = ratios[stage, name]
        row = {"zero_stage": stage, "row": name, "samples_per_s": statistics.median(values), "runs": values,
               "ratio": statistics.median(row_ratios), "ratio_spread": [min(row_ratios), max(row_ratios)]}
        rows.append(row)
        print(f"{stage:<5} {name:<56} {row['samples_per_s']:>10.1f} {row['ratio']:>17.3f}  "
              f"({min(row_ratios):.3f}-{max(row_ratios):.3f})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2])
    parser.add_argument("--time", type=int, default=0, metavar="ROUNDS",
                        help="time the rows without the profiler over ROUNDS alternating rounds, in place of counting")
    parser.add_argument("--paired", action="store_true",
                        help="with --time: run each row at the same time as the like-for-like loop, the two "
                             f"on a core each, for {PAIRED_STEPS} steps (needs 2 cores)")
    parser.add_argument("--out", default=None,
                        help="default: bench/results/host_work.json, or host_time.json (host_pair.json "
                             "--paired) with --time")
    args = parser.parse_args()
    if args.paired and not args.time:
        parser.error("--paired times the rows: give --time ROUNDS")
    if args.time:
        rows = (paired if args.paired else timed)(args.stages, args.time)
        default = "bench/results/host_pair.json" if args.paired else "bench/results/host_time.json"
        write(Path(args.out or default), rows, timed_rounds=args.time,
              steps=PAIRED_STEPS if args.paired else TIMED_STEPS, side_by_side=args.paired)
        return

    rows = []
    print(f"{'ZeRO':<5} {'row':<56} {'ops/step':>9} {'reads/step':>11} {'CPU ms/step':>12}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dlaunch-host-work-") as tmp:
        for stage in args.stages:
            for name, (launch, where) in variants(Path(tmp), stage).items():
                row = {"zero_stage": stage, "row": name.strip(), **measure(launch, where)}
                rows.append(row)
                print(f"{stage:<5} {name:<56} {row['ops']:>9.1f} {row['reads']:>11.1f} {row['step_ms']:>12.1f}",
                      flush=True)
    write(Path(args.out or "bench/results/host_work.json"), rows, window={"start_step": WINDOW[0], "steps": WINDOW[1]})


def write(out: Path, rows: list[dict], **setup: object) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "processor": platform.processor() or platform.machine(),
                               "shape": SHAPE, **setup, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
