"""A minimal hand-written Accelerate loop: the baseline `dlaunch run` with engine
accelerate is measured against in bench/trainer_overhead.py and bench/startup.py. Run
under `accelerate launch`:

    accelerate launch --multi_gpu --num_processes 2 bench/loops/accelerate_loop.py --out steps.jsonl

(On a machine without GPUs `--multi_gpu` still starts the processes under torchrun, and
`Accelerator(cpu=True)` makes them MULTI_CPU; `--cpu` would start one process.)

torch's AdamW, bf16 autocast (Accelerate's mixed precision), clipping at 1.0, a constant
learning rate, DDP; no evaluation, no checkpoint; the process ends without the
interpreter's teardown, as dlaunch's ranks do.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from common import StepLog, model_and_batches, parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16")
    model, batches = model_and_batches(args, accelerator.process_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    log = StepLog(args.out, args.micro_batch * accelerator.num_processes, args.log_every,
                  write=accelerator.is_main_process)
    model.train()
    for step in range(1, args.steps + 1):
        rows = batches[step % len(batches)].to(accelerator.device)
        logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.step(step, loss)
    log.close()
    os._exit(0)  # as dlaunch's ranks end: without the interpreter's teardown


if __name__ == "__main__":
    main()
