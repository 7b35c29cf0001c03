"""Where dlaunch loses to a hand-written loop on one GPU, all on bench/gpu_throughput.py's
GPT in bf16, one after the other in this script:

- nanoGPT's loop (autocast, fused AdamW), with and without the trainer's per-step
  all_gather and read-back of the loss;
- the minimal hand-written DeepSpeed loop (bench/loops/deepspeed_loop.py under torchrun)
  at ZeRO 0, 1 and 2: what DeepSpeed's bf16 path costs by itself;
- `dlaunch run` on the same engines and on Accelerate's DDP;
- with --profile DIR, steps 21-23 of the hand-written DeepSpeed loop and of `dlaunch run`
  at ZeRO-2 under torch.profiler (a run each, apart from the timed ones): DIR/loop and
  DIR/dlaunch get each one's operator table and Chrome trace.

    python bench/gpu_trainer_overhead.py [--profile DIR]

Prints tokens/s (the median past the warm-up steps) and MFU, and writes
bench/results/gpu_trainer_overhead.json. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
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

from launcher.flops import peak_flops, training_flops_per_sample  # noqa: E402
from launcher.models.gpt import GPT  # noqa: E402

RESULTS = bench.REPO / "bench" / "results" / "gpu_trainer_overhead.json"
ARGS = argparse.Namespace(layers=24, heads=16, embd=1024, seq=1024, batch=16, steps=40, warmup=10, log_every=10)
STAGES = (2, 1, 0)  # the quickstart's stage first
PROFILED = "21:3"  # steps 21-23: past the warm-up, inside a 30-step run


def loop_rate(stage: int, steps: int, profile: str | None = None) -> float:
    """Tokens/s of the hand-written DeepSpeed loop at ZeRO ``stage``, on one GPU."""
    shape = {"micro_batch": ARGS.batch, "seq_len": ARGS.seq + 1, "vocab": bench.VOCAB, "layers": ARGS.layers,
             "heads": ARGS.heads, "embd": ARGS.embd, "lr": 3e-4}
    with tempfile.TemporaryDirectory() as tmp:
        launch = launchers.deepspeed_loop(Path(tmp), "loop", stage, steps, ARGS.log_every, shape,
                                          ranks=1, device="cuda", profile=profile)
        subprocess.run(launch.command, env=launch.env, check=True)
        return launchers.steady_rate(launchers.logged_steps(launch), warmup_steps=ARGS.warmup) * ARGS.seq


def dlaunch_rate(engine: str) -> tuple[float, float]:
    """Tokens/s and the MFU the run reported, of `dlaunch run` on ``engine`` (YAML)."""
    with tempfile.TemporaryDirectory() as tmp:
        records = bench.dlaunch_rates(ARGS, Path(tmp), engine)
    return (statistics.median(r["tokens_per_s"] for r in records), statistics.median(r["mfu"] for r in records))


def profile_both(out: Path) -> None:
    """The operator tables and traces of the ZeRO-2 loop and `dlaunch run`, steps 21-23."""
    loop_rate(2, 30, profile=f"{PROFILED}:{out / 'loop'}")
    start, steps = PROFILED.split(":")
    args = argparse.Namespace(**{**vars(ARGS), "steps": 30})
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = bench.dlaunch_run(args, Path(tmp), profile=f"{{start_step: {start}, steps: {steps}}}")
        shutil.copytree(run_dir / "profile", out / "dlaunch")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, help="also profile the ZeRO-2 loop and dlaunch into this directory")
    options = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_trainer_overhead.py needs a CUDA GPU", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name()
    model = GPT([ARGS.seq], bench.VOCAB, n_layer=ARGS.layers, n_head=ARGS.heads, n_embd=ARGS.embd)
    flops_per_token = training_flops_per_sample(model, torch.zeros(1, ARGS.seq, dtype=torch.long)) / ARGS.seq
    del model
    peak = peak_flops(device, "bf16", None)
    print(f"{device}, torch {torch.__version__}; GPT {ARGS.layers}x{ARGS.embd}, seq {ARGS.seq}, "
          f"micro-batch {ARGS.batch}, bf16; median of steps {ARGS.warmup + 1}-{ARGS.steps}", flush=True)
    rows: dict[str, dict[str, float]] = {}
    RESULTS.parent.mkdir(exist_ok=True)

    def report(name: str, tokens_per_s: float, reported_mfu: float | None = None) -> None:
        rows[name] = {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak if peak else None,
                      "mfu_reported": reported_mfu}
        mfu = f"{rows[name]['mfu']:.1%}" if peak else "-"
        print(f"{name:48} {tokens_per_s:9.0f} tokens/s  MFU {mfu}", flush=True)
        RESULTS.write_text(json.dumps({"device": device, "torch": torch.__version__, "args": vars(ARGS),
                                       "flops_per_token": flops_per_token, "peak_flops": peak, "rows": rows},
                                      indent=2) + "\n")  # row by row: a run cut short keeps what it measured

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{launchers.free_port()}", rank=0, world_size=1)
    for sync, name in (("none", "hand-written (autocast, fused AdamW)"),
                       ("gather", "hand-written, plus the trainer's all_gather")):
        report(name, bench.hand_written(ARGS, sync)["tokens_per_s"])
    dist.destroy_process_group()
    torch.cuda.empty_cache()
    for stage in STAGES:  # each pair back to back
        report(f"hand-written DeepSpeed ZeRO-{stage}", loop_rate(stage, ARGS.steps))
        report(f"dlaunch, DeepSpeed ZeRO-{stage}", *dlaunch_rate(f"{{name: deepspeed, zero_stage: {stage}}}"))
    if options.profile is not None:
        profile_both(options.profile)
    report("dlaunch, Accelerate DDP", *dlaunch_rate("{name: accelerate}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
