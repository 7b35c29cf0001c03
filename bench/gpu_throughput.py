"""GPT training throughput and MFU on one GPU: `dlaunch run` against a hand-written loop.

    python bench/gpu_throughput.py [--layers 24 --embd 1024 --heads 16 --seq 1024 --batch 16]

The built-in GPT (GPT-2 medium's shape by default, 50,304-token vocabulary) trains on
synthetic token sequences in bf16 for the same steps, with the same micro-batch, twice,
one after the other in this script:

- dlaunch: `dlaunch run` on one GPU, DeepSpeed ZeRO-2 (the quickstart's engine), read
  back from the run's own live throughput records (launcher/flops.py);
- hand-written: the nanoGPT loop: autocast bf16, fused AdamW, clipping, no launcher.

Steady state only: the first `--warmup` steps of each are left out. MFU is counted the
same way for both (FLOPs of a forward pass measured with FlopCounterMode, x3, over the
device's dense bf16 peak from launcher/flops.py's table). Prints a table and writes
bench/results/gpu_throughput.json. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from launcher.engines.base import loss_fn
from launcher.flops import peak_flops, training_flops_per_sample
from launcher.models.gpt import GPT

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "gpu_throughput.json"
VOCAB = 50304  # GPT-2's 50,257 padded to a multiple of 64, as nanoGPT does
ENGINE = "{name: deepspeed, zero_stage: 2}"  # the quickstart's

RECIPE = """\
name: gpt-throughput
model:
  name: gpt
  kwargs: {{n_layer: {layers}, n_head: {heads}, n_embd: {embd}}}
data:
  source: synthetic
  kind: tokens
  samples: {samples}
  seq_len: {seq}
  vocab_size: {vocab}
  val_fraction: 0.05
optim: {{lr: 3.0e-4, betas: [0.9, 0.95], weight_decay: 0.1}}
precision: {{dtype: bf16}}
engine: {engine}
train:
  micro_batch_size: {batch}
  max_steps: {steps}
  eval_every: {steps}
  checkpoint_every: {steps}
  early_stopping: {{patience: null}}
logging:
  run_root: {root}
  log_every: {log_every}
  progress: false
  report: false
  profile: {profile}
cluster: {{device: cuda, procs_per_node: 1}}
"""


def write_recipe(args: argparse.Namespace, root: Path, engine: str = ENGINE, profile: str = "null") -> Path:
    """The job's recipe in ``root``, its runs under ``root``/runs. ``engine`` and
    ``profile`` are the recipe's sections, in YAML."""
    recipe = root / "recipe.yaml"
    samples = int((args.steps * args.batch + args.batch) / 0.95) + 1
    recipe.write_text(RECIPE.format(layers=args.layers, heads=args.heads, embd=args.embd, seq=args.seq,
                                    vocab=VOCAB, batch=args.batch, steps=args.steps, samples=samples,
                                    root=root / "runs", log_every=args.log_every, engine=engine, profile=profile))
    return recipe


def dlaunch_run(args: argparse.Namespace, root: Path, engine: str = ENGINE,
                profile: str = "null") -> Path:
    """Run the job with `dlaunch run` under ``root``; its run directory."""
    recipe = write_recipe(args, root, engine, profile)
    subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe)], check=True, cwd=REPO)
    [run_dir] = (root / "runs").iterdir()
    return run_dir


def dlaunch_rates(args: argparse.Namespace, root: Path, engine: str = ENGINE) -> list[dict]:
    """The train records of a `dlaunch run` past the warm-up steps."""
    run_dir = dlaunch_run(args, root, engine)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train" and r["step"] > args.warmup]


def hand_written(args: argparse.Namespace, gather: bool = False) -> dict[str, float]:
    """nanoGPT's loop on the same model and batch: steady-state samples/s. ``gather``
    all-gathers the loss and gradient norm every step and reads them back (a process
    group must exist), where dlaunch's trainer does (Trainer._share_step): between the
    backward pass and the update."""
    torch.manual_seed(0)
    model = GPT([args.seq], VOCAB, n_layer=args.layers, n_head=args.heads, n_embd=args.embd).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq + 1), device="cuda")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    for step in range(args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(inputs), targets)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if gather:
            gathered = [torch.zeros(2, device="cuda")]
            torch.distributed.all_gather(gathered, torch.stack([loss.detach().float(), norm.float()]))
            gathered[0].tolist()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    samples_per_s = (args.steps - args.warmup) * args.batch / (time.perf_counter() - started)
    return {"samples_per_s": samples_per_s, "tokens_per_s": samples_per_s * args.seq}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--embd", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_throughput.py needs a CUDA GPU", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name()
    peak = peak_flops(device, "bf16", None)
    cpu_model = GPT([args.seq], VOCAB, n_layer=args.layers, n_head=args.heads, n_embd=args.embd)
    params = sum(p.numel() for p in cpu_model.parameters())
    flops = training_flops_per_sample(cpu_model, torch.zeros(1, args.seq, dtype=torch.long))
    del cpu_model

    with tempfile.TemporaryDirectory() as tmp:
        records = dlaunch_rates(args, Path(tmp))
    ours = {key: statistics.median(r[key] for r in records) for key in ("samples_per_s", "tokens_per_s")}
    ours["mfu_reported"] = statistics.median(r["mfu"] for r in records)
    baseline = hand_written(args)
    rows = {"dlaunch (DeepSpeed ZeRO-2)": ours, "hand-written (autocast, fused AdamW)": baseline}
    for row in rows.values():
        row["mfu"] = row["samples_per_s"] * flops / peak if peak else None

    print(f"{device}; GPT {params / 1e6:.0f}M parameters, seq {args.seq}, micro-batch {args.batch}, bf16; "
          f"median of steps {args.warmup + 1}-{args.steps}")
    print(f"{'':40} {'tokens/s':>10} {'MFU':>7} {'vs hand-written':>16}")
    for name, row in rows.items():
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        print(f"{name:40} {row['tokens_per_s']:10.0f} {mfu:>7} "
              f"{row['tokens_per_s'] / baseline['tokens_per_s']:15.2f}x")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"device": device, "torch": torch.__version__, "params": params,
                                   "flops_per_sample": flops, "peak_flops": peak, "args": vars(args),
                                   "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
