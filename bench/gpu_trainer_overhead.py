"""Where dlaunch loses to a hand-written loop on one GPU: the loop with and without the
trainer's per-step read-back and all_gather, and `dlaunch run` on three engines, all on
bench/gpu_throughput.py's GPT in bf16, one after the other in this script.

    python bench/gpu_trainer_overhead.py

Prints tokens/s (the median past the warm-up steps). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput as bench  # noqa: E402

from launcher.engines.base import loss_fn  # noqa: E402
from launcher.models.gpt import GPT  # noqa: E402

ARGS = argparse.Namespace(layers=24, heads=16, embd=1024, seq=1024, batch=16, steps=40, warmup=10, log_every=10)
ENGINES = {"DeepSpeed ZeRO-1": "{name: deepspeed, zero_stage: 1}",
           "DeepSpeed ZeRO-2": "{name: deepspeed, zero_stage: 2}",
           "Accelerate DDP": "{name: accelerate}"}


def hand_written(sync: str) -> float:
    """nanoGPT's loop; sync "item" reads the loss and norm back every step, "gather" also
    all-gathers them first, as the trainer's _share_step does."""
    torch.manual_seed(0)
    model = GPT([ARGS.seq], bench.VOCAB, n_layer=ARGS.layers, n_head=ARGS.heads, n_embd=ARGS.embd).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokens = torch.randint(0, bench.VOCAB, (ARGS.batch, ARGS.seq + 1), device="cuda")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    for step in range(ARGS.steps):
        if step == ARGS.warmup:
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(inputs), targets)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        shared = torch.stack([loss.detach().float(), norm.float()])
        if sync == "gather":
            gathered = [torch.zeros_like(shared)]
            dist.all_gather(gathered, shared)
            shared = gathered[0]
        if sync != "none":
            shared.tolist()
    torch.cuda.synchronize()
    return (ARGS.steps - ARGS.warmup) * ARGS.batch * ARGS.seq / (time.perf_counter() - started)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/gpu_trainer_overhead.py needs a CUDA GPU", file=sys.stderr)
        return 1
    print(torch.cuda.get_device_name())
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29655", rank=0, world_size=1)
    for sync in ("none", "item", "gather"):
        print(f"hand-written, sync {sync}: {hand_written(sync):.0f} tokens/s", flush=True)
    dist.destroy_process_group()
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
