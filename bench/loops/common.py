"""What the hand-written loops share with the `dlaunch run` they are measured against:
the model (the built-in GPT class, the same nn.Module dlaunch builds), random token data
of the same shape, and a record of each logged step in the shape of dlaunch's
metrics.jsonl, so that one reader serves all three.

Nothing else of dlaunch: each loop is what a user would write by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from launcher.models.gpt import GPT
from launcher.profiling import StepProfiler
from launcher.recipe import ProfileConfig


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="rank 0's JSONL of logged steps")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens a row; the model sees one fewer")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--decay-groups", action="store_true",
                        help="two AdamW groups, as nanoGPT and dlaunch: weight decay on matrices and "
                             "embeddings, none on biases and norm gains (default: one group, all decayed)")
    parser.add_argument("--trainer-reads", nargs="?", const="before-update", choices=["before-update", "end"],
                        help="read back every step what dlaunch's trainer reads, where it reads them: every "
                             "rank's loss and a flag all-gathered between the backward pass and the update "
                             "(Trainer._share_step), the gradient norm after it; 'end': both after the "
                             "update, as dlaunch did until 2026-11-29; default: the loss at logged steps only")
    parser.add_argument("--free-logits", action="store_true",
                        help="free the logits once the loss is computed, as dlaunch's step does (default: "
                             "keep them until the next step's forward replaces them, as nanoGPT's loop does)")
    parser.add_argument("--profile", metavar="START:STEPS:DIR", default=None,
                        help="profile steps START..START+STEPS-1 into DIR, as dlaunch's logging.profile does")
    return parser.parse_args()


def step_profiler(spec: str | None, rank: int, on_gpu: bool) -> StepProfiler:
    """dlaunch's own step profiler, so that the loop's tables read like a run's; it does
    nothing outside the window, and nothing at all without ``spec``."""
    if spec is None:
        return StepProfiler(None, Path("."), rank, on_gpu)
    start, steps, directory = spec.split(":", 2)
    return StepProfiler(ProfileConfig(start_step=int(start), steps=int(steps)), Path(directory), rank, on_gpu)


def optimizer_groups(model: torch.nn.Module, weight_decay: float, split: bool) -> list[dict]:
    """One group of every parameter, or (``split``) dlaunch's two: decay on the >= 2-D
    parameters only (launcher/models/build.py's param_groups)."""
    params = list(model.parameters())
    if not split:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def model_and_batches(args: argparse.Namespace, rank: int) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The GPT and 64 micro-batches of rows (inputs are a row's tokens but the last,
    targets all but the first), different on each rank."""
    torch.manual_seed(0)
    model = GPT((args.seq_len - 1,), args.vocab, n_layer=args.layers, n_head=args.heads, n_embd=args.embd)
    generator = torch.Generator().manual_seed(rank)
    rows = torch.randint(args.vocab, (64, args.micro_batch, args.seq_len), generator=generator)
    return model, list(rows)


class StepLog:
    """Rank 0's logged steps: ``{"kind": "train", "step", "time", "loss", "samples_per_s"}``,
    samples/s over the steps since the last logged one, as dlaunch's trainer counts them."""

    def __init__(self, path: str, global_batch: int, log_every: int, write: bool) -> None:
        self.file = open(path, "w") if write else None  # noqa: SIM115 (closed by close())
        self.global_batch, self.log_every = global_batch, log_every
        self.window_start, self.window_steps = time.perf_counter(), 0

    def step(self, step: int, loss: torch.Tensor) -> None:
        self.window_steps += 1
        if step % self.log_every:
            return
        value = loss.item()  # the one read-back a step that is logged makes
        now = time.perf_counter()
        rate = self.window_steps * self.global_batch / (now - self.window_start)
        # The next window starts now and holds this write, as dlaunch's trainer's holds its
        # logging (launcher/flops.py's RateWindows).
        self.window_start, self.window_steps = now, 0
        if self.file is not None:
            record = {"kind": "train", "step": step, "time": time.time(), "loss": value, "samples_per_s": rate}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def share_step(loss: torch.Tensor, world: int) -> None:
    """The read of dlaunch's Trainer._share_step, made the same way: every rank's loss and
    a flag all-gathered, read back in one .tolist(). On a GPU it waits for the kernels
    queued before it."""
    mine = torch.stack([loss.detach().float(), loss.new_full((), 0.0, dtype=torch.float32)])
    shared = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(shared, mine)
    torch.stack(shared).tolist()


def read_grad_norm(engine) -> None:
    """The read after DeepSpeed's step of launcher/engines/deepspeed.py's train_step: the
    gradient norm, a tensor at ZeRO 1-3."""
    norm = engine.get_global_grad_norm()
    if norm is not None:
        float(norm)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
