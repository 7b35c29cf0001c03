"""A minimal hand-written DeepSpeed loop: the baseline `dlaunch run` is measured against
in bench/trainer_overhead.py and bench/startup.py. Run under torchrun (or `deepspeed`):

    torchrun --nproc-per-node 2 bench/loops/deepspeed_loop.py --zero-stage 2 --out steps.jsonl

AdamW built by DeepSpeed (torch's, as dlaunch asks for) on one parameter group (or
dlaunch's two, with --decay-groups), bf16, clipping at 1.0, a constant learning rate;
the model in train mode throughout; no evaluation, no checkpoint; the process ends
without the interpreter's teardown, as dlaunch's ranks do.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

import deepspeed  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    StepLog,
    model_and_batches,
    optimizer_groups,
    parse_args,
    read_grad_norm,
    share_step,
    step_profiler,
)

WEIGHT_DECAY = 0.01


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model, batches = model_and_batches(args, rank)
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": args.zero_stage},
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": WEIGHT_DECAY, "torch_adam": True}},
        "steps_per_print": 2**31 - 1,
    }
    groups = optimizer_groups(model, WEIGHT_DECAY, split=args.decay_groups)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    log = StepLog(args.out, args.micro_batch * world, args.log_every, write=rank == 0)
    profiler = step_profiler(args.profile, rank, on_gpu=not on_cpu)
    for step in range(1, args.steps + 1):
        profiler.before_step(step)
        rows = batches[step % len(batches)].to(engine.device)
        logits = engine(rows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())
        if args.free_logits:
            del logits  # the loss holds their float32 copy, not them
        engine.backward(loss)
        if args.trainer_reads == "before-update":
            share_step(loss, world)
        engine.step()
        if args.trainer_reads:
            read_grad_norm(engine)
        if args.trainer_reads == "end":
            share_step(loss, world)
        log.step(step, loss)
        profiler.after_step(step)
    log.close()
    # As dlaunch's ranks end: without the interpreter's teardown, in which ZeRO-3 under
    # gloo now and then aborts ("terminate called without an active exception").
    os._exit(0)


if __name__ == "__main__":
    main()
