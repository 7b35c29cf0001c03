"""Where dlaunch loses to a hand-written loop on one GPU: the loop with and without the
trainer's per-step read-back and all_gather, the minimal hand-written DeepSpeed loop
(bench/loops/deepspeed_loop.py under torchrun) at ZeRO-1 and ZeRO-2, and `dlaunch run`
on three engines, all on bench/gpu_throughput.py's GPT in bf16, one after the other in
this script.

    python bench/gpu_trainer_overhead.py

Prints tokens/s (the median past the warm-up steps). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput as bench  # noqa: E402
import launchers  # noqa: E402

ARGS = argparse.Namespace(layers=24, heads=16, embd=1024, seq=1024, batch=16, steps=40, warmup=10, log_every=10)
ENGINES = {"DeepSpeed ZeRO-1": "{name: deepspeed, zero_stage: 1}",
           "DeepSpeed ZeRO-2": "{name: deepspeed, zero_stage: 2}",
           "Accelerate DDP": "{name: accelerate}"}


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/gpu_trainer_overhead.py needs a CUDA GPU", file=sys.stderr)
        return 1
    print(torch.cuda.get_device_name())
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29655", rank=0, world_size=1)
    for sync in ("none", "item", "gather"):
        print(f"hand-written, sync {sync}: {bench.hand_written(ARGS, sync)['tokens_per_s']:.0f} tokens/s", flush=True)
    dist.destroy_process_group()
    shape = {"micro_batch": ARGS.batch, "seq_len": ARGS.seq + 1, "vocab": bench.VOCAB, "layers": ARGS.layers,
             "heads": ARGS.heads, "embd": ARGS.embd, "lr": 3e-4}
    for stage in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            launch = launchers.deepspeed_loop(Path(tmp), "loop", stage, ARGS.steps, ARGS.log_every, shape,
                                              ranks=1, device="cuda")
            subprocess.run(launch.command, env=launch.env, check=True)
            rate = launchers.steady_rate(launchers.logged_steps(launch), warmup_steps=ARGS.warmup)
        print(f"hand-written DeepSpeed ZeRO-{stage}: {rate * ARGS.seq:.0f} tokens/s", flush=True)
    recipe = bench.RECIPE
    for name, engine in ENGINES.items():
        bench.RECIPE = recipe.replace("engine: {{name: deepspeed, zero_stage: 2}}",
                                      "engine: " + engine.replace("{", "{{").replace("}", "}}"))
        with tempfile.TemporaryDirectory() as tmp:
            records = bench.dlaunch_rates(ARGS, Path(tmp))
        print(f"dlaunch, {name}: {statistics.median(r['tokens_per_s'] for r in records):.0f} tokens/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
