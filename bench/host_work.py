"""Host work per training step: the operators a step dispatches and the values it reads
back to the host, for `dlaunch run` and the hand-written DeepSpeed loop at ZeRO 0-2 on
one rank, counted from a torch.profiler trace of ten steps (one of them a logged step).

    .venv/bin/python bench/host_work.py [--stages 0 1 2] [--out bench/results/host_work.json]

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
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import launchers  # noqa: E402
from trainer_overhead import LEAN  # noqa: E402

SHAPE = {"micro_batch": 4, "seq_len": 64, "vocab": 512, "layers": 24, "heads": 4, "embd": 64, "lr": 1e-3}
STEPS, LOG_EVERY = 30, 10
WINDOW = (11, 10)  # steps 11-20: past the warm-up, one logged step (20), no evaluation
READ = "aten::_local_scalar_dense"


def variants(root: Path, stage: int) -> dict[str, tuple[launchers.Launch, Path]]:
    """Each row's launch and the directory its rank-0 trace goes to."""
    start, steps = WINDOW

    def loop(name: str, *extra: str) -> tuple[launchers.Launch, Path]:
        launch = launchers.deepspeed_loop(root, name, stage, STEPS, LOG_EVERY, SHAPE, ranks=1,
                                          profile=f"{start}:{steps}:{root / name}")
        return launchers.Launch([*launch.command, *extra], launch.env, launch.steps_log), root / name

    def dlaunch(name: str, logging: str = "") -> tuple[launchers.Launch, Path]:
        launch = launchers.dlaunch(root, name, f"{{name: deepspeed, zero_stage: {stage}}}", STEPS, LOG_EVERY,
                                   f", profile: {{start_step: {start}, steps: {steps}}}{logging}", ranks=1,
                                   shape=SHAPE)
        return launch, root / name  # the run directory inside, found once it has run
    return {
        "hand-written loop, one parameter group": loop(f"z{stage}-loop"),
        "  the same, dlaunch's two groups": loop(f"z{stage}-groups", "--decay-groups"),
        "  the same, + the trainer's reads every step": loop(f"z{stage}-reads", "--decay-groups", "--trainer-reads"),
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


def measure(launch: launchers.Launch, where: Path) -> dict[str, float]:
    result = subprocess.run(launch.command, env=launch.env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(launch.command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return host_work(trace_of(where), WINDOW[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2])
    parser.add_argument("--out", default="bench/results/host_work.json")
    args = parser.parse_args()

    rows = []
    print(f"{'ZeRO':<5} {'row':<46} {'ops/step':>9} {'reads/step':>11} {'CPU ms/step':>12}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dlaunch-host-work-") as tmp:
        for stage in args.stages:
            for name, (launch, where) in variants(Path(tmp), stage).items():
                row = {"zero_stage": stage, "row": name.strip(), **measure(launch, where)}
                rows.append(row)
                print(f"{stage:<5} {name:<46} {row['ops']:>9.1f} {row['reads']:>11.1f} {row['step_ms']:>12.1f}",
                      flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "processor": platform.processor() or platform.machine(),
                               "shape": SHAPE, "window": {"start_step": WINDOW[0], "steps": WINDOW[1]},
                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
