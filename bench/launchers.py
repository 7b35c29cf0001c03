"""The three ways the benchmarks (trainer_overhead, startup, scaling, gpu_trainer_overhead)
start the same training job: `dlaunch run` on a recipe, the hand-written DeepSpeed loop
under torchrun, and the hand-written Accelerate loop under `accelerate launch`. Each
returns the command and where rank 0's logged steps will be (dlaunch's metrics.jsonl, or
the loop's JSONL in the same shape), so one reader serves all three.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

LOOPS = Path(__file__).resolve().parent / "loops"
BIN = Path(sys.executable).parent

# The job: bench/loops/common.py's defaults, which the recipe repeats.
SHAPE = {"micro_batch": 16, "seq_len": 64, "vocab": 512, "layers": 4, "heads": 4, "embd": 128, "lr": 1e-3}
RANKS = 2

RECIPE = """\
name: {name}
model: {{name: gpt, kwargs: {{n_layer: {layers}, n_head: {heads}, n_embd: {embd}}}}}
data: {{source: synthetic, kind: tokens, samples: 4096, seq_len: {seq_len}, vocab_size: {vocab}}}
optim: {{lr: {lr}}}
engine: {engine}
precision: {{dtype: bf16}}
train: {{micro_batch_size: {micro_batch}, max_steps: {steps}, eval_every: {steps}, early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, log_every: {log_every}{logging}}}
cluster: {{procs_per_node: {ranks}}}
"""


@dataclass(frozen=True)
class Launch:
    command: list[str]
    env: dict[str, str]
    steps_log: Path | None
    """Rank 0's logged steps; None for dlaunch, whose metrics.jsonl is in a run directory
    named when it starts (`logged_steps` finds it)."""
    run_root: Path | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env(device: str = "cpu") -> dict[str, str]:
    if device == "cuda":
        return dict(os.environ)
    # One intra-op thread a rank, as dlaunch's planner gives each of the 2 ranks of a
    # 2-core node and torchrun defaults to with several processes.
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def dlaunch(root: Path, name: str, engine: str, steps: int, log_every: int, logging: str = "",
            ranks: int = RANKS, shape: dict[str, float] = SHAPE) -> Launch:
    """``logging``: extra keys of the recipe's logging section, e.g. ", report: false"."""
    recipe = root / f"{name}.yaml"
    recipe.write_text(RECIPE.format(name=name, engine=engine, steps=steps, log_every=log_every, logging=logging,
                                    root=root / name, ranks=ranks, **shape))
    return Launch([str(BIN / "dlaunch"), "run", str(recipe)], env(), None, root / name)


def _loop_args(out: Path, steps: int, log_every: int, zero_stage: int = 0,
               shape: dict[str, float] = SHAPE) -> list[str]:
    args = ["--out", str(out), "--steps", str(steps), "--log-every", str(log_every), "--zero-stage", str(zero_stage)]
    return args + [f"--{key.replace('_', '-')}={value}" for key, value in shape.items()]


def torchrun() -> list[str]:
    """The torchrun script beside this interpreter, or the module it runs where torch was
    installed without its scripts on that path (as on a machine with torch preinstalled)."""
    script = BIN / "torchrun"
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def deepspeed_loop(root: Path, name: str, zero_stage: int, steps: int, log_every: int,
                   shape: dict[str, float] = SHAPE, ranks: int = RANKS, device: str = "cpu",
                   profile: str | None = None) -> Launch:
    """``profile``: START:STEPS:DIR, steps of the loop to profile (bench/loops/common.py)."""
    out = root / f"{name}.jsonl"
    command = [*torchrun(), "--standalone", f"--nproc-per-node={ranks}",
               str(LOOPS / "deepspeed_loop.py"), *_loop_args(out, steps, log_every, zero_stage, shape)]
    return Launch(command + ([f"--profile={profile}"] if profile else []), env(device), out)


def accelerate_loop(root: Path, name: str, steps: int, log_every: int) -> Launch:
    out = root / f"{name}.jsonl"
    command = [str(BIN / "accelerate"), "launch", "--multi_gpu", f"--num_processes={RANKS}", "--num_machines=1",
               "--mixed_precision=bf16", "--dynamo_backend=no", f"--main_process_port={free_port()}",
               str(LOOPS / "accelerate_loop.py"), *_loop_args(out, steps, log_every)]
    return Launch(command, env(), out)


def only_run_dir(run_root: Path) -> Path:
    """The one run directory `dlaunch run` made under ``run_root``."""
    [run_dir] = [p for p in run_root.iterdir() if p.is_dir()]
    return run_dir


def logged_steps(launch: Launch) -> list[dict]:
    """Rank 0's `train` records, oldest first."""
    path = launch.steps_log
    if path is None:
        path = only_run_dir(launch.run_root) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def steady_rate(records: list[dict], warmup_steps: int) -> float:
    """The median samples/s of the logged windows past the warm-up steps."""
    return statistics.median(r["samples_per_s"] for r in records if r["step"] > warmup_steps)
