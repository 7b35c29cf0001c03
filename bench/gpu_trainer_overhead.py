"""Where dlaunch loses to a hand-written loop on one GPU, all on bench/gpu_throughput.py's
GPT in bf16, one after the other in this script:

- nanoGPT's loop (autocast, fused AdamW), with and without the trainer's per-step
  all_gather and read-back of the loss (between the backward pass and the update);
- the minimal hand-written DeepSpeed loop (bench/loops/deepspeed_loop.py under torchrun)
  at ZeRO 0, 1 and 2: what DeepSpeed's bf16 path costs by itself;
- `dlaunch run` on the same engines and on Accelerate's DDP;
- with --profile DIR, steps 21-23 of the hand-written DeepSpeed loop and of `dlaunch run`
  at ZeRO-2 (or --stage) under torch.profiler (a run each, apart from the timed ones):
  DIR/loop and DIR/dlaunch get each one's operator table and Chrome trace.

    python bench/gpu_trainer_overhead.py [--profile DIR]
    python bench/gpu_trainer_overhead.py --split ROUNDS [--stage STAGE]

Prints tokens/s (the median past the warm-up steps) and MFU, and writes
bench/results/gpu_trainer_overhead.json. Needs a CUDA GPU.

--split runs only one ZeRO stage (--stage, 2 unless told), ROUNDS times over, in
variants that take dlaunch's run apart: the loop as it is, with dlaunch's two parameter
groups, with the reads of the loss and gradient norm the trainer makes every step (each
waits for the GPU) where it makes them and, as it did until 2026-11-29, all after the
update, under torchrun with the rendezvous flags dlaunch's agents get (c10d on
127.0.0.1 rather than --standalone), and launched by `dlaunch run --script` (dlaunch's
process tree, worker and environment around the same loop); `dlaunch run` as it is and
with one parameter group (weight_decay 0).
Each row also reads the rank's host threads from /proc while it trains
(bench/rank_sampler.py). Writes bench/results/gpu_trainer_split.json (ZeRO-2) or
gpu_trainer_split_zeroN.json.
"""

from __future__ import annotations

import argparse
import json
import os
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
from rank_sampler import RankSampler  # noqa: E402

from launcher.flops import peak_flops, training_flops_per_sample  # noqa: E402
from launcher.models.gpt import GPT  # noqa: E402

RESULTS = bench.REPO / "bench" / "results" / "gpu_trainer_overhead.json"
ARGS = argparse.Namespace(layers=24, heads=16, embd=1024, seq=1024, batch=16, steps=40, warmup=10, log_every=10)
STAGES = (2, 1, 0)  # the quickstart's stage first
PROFILED = "21:3"  # steps 21-23: past the warm-up, inside a 30-step run
SPLIT_STEPS = 60
LOOP = launchers.LOOPS / "deepspeed_loop.py"
SHAPE = {"micro_batch": ARGS.batch, "seq_len": ARGS.seq + 1, "vocab": bench.VOCAB, "layers": ARGS.layers,
         "heads": ARGS.heads, "embd": ARGS.embd, "lr": 3e-4}


def loop_rate(stage: int, steps: int, profile: str | None = None) -> float:
    """Tokens/s of the hand-written DeepSpeed loop at ZeRO ``stage``, on one GPU."""
    with tempfile.TemporaryDirectory() as tmp:
        launch = launchers.deepspeed_loop(Path(tmp), "loop", stage, steps, ARGS.log_every, SHAPE,
                                          ranks=1, device="cuda", profile=profile)
        subprocess.run(launch.command, env=launch.env, check=True)
        return launchers.steady_rate(launchers.logged_steps(launch), warmup_steps=ARGS.warmup) * ARGS.seq


def dlaunch_rate(engine: str) -> tuple[float, float]:
    """Tokens/s and the MFU the run reported, of `dlaunch run` on ``engine`` (YAML)."""
    with tempfile.TemporaryDirectory() as tmp:
        records = bench.dlaunch_rates(ARGS, Path(tmp), engine)
    return (statistics.median(r["tokens_per_s"] for r in records), statistics.median(r["mfu"] for r in records))


def profile_both(out: Path, stage: int) -> None:
    """The operator tables and traces of the loop and `dlaunch run` at ZeRO ``stage``,
    steps 21-23."""
    loop_rate(stage, 30, profile=f"{PROFILED}:{out / 'loop'}")
    start, steps = PROFILED.split(":")
    args = argparse.Namespace(**{**vars(ARGS), "steps": 30})
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = bench.dlaunch_run(args, Path(tmp), f"{{name: deepspeed, zero_stage: {stage}}}",
                                    profile=f"{{start_step: {start}, steps: {steps}}}")
        shutil.copytree(run_dir / "profile", out / "dlaunch")


def split_results(stage: int) -> Path:
    """Where --split writes its rows for ZeRO ``stage``."""
    return bench.REPO / "bench" / "results" / ("gpu_trainer_split.json" if stage == 2
                                               else f"gpu_trainer_split_zero{stage}.json")


def split_variants(root: Path, stage: int) -> dict[str, tuple[list[str], Path]]:
    """--split's launches in ``root`` at ZeRO ``stage``: each one's command and the file
    of its logged steps."""
    args = argparse.Namespace(**{**vars(ARGS), "steps": SPLIT_STEPS})
    recipe = str(bench.write_recipe(args, root, f"{{name: deepspeed, zero_stage: {stage}}}"))
    dlaunch = [sys.executable, "-m", "launcher", "run", recipe]

    def loop(name: str, *extra: str, launch: str = "torchrun") -> tuple[list[str], Path]:
        out = root / f"{name}.jsonl"
        loop_args = [*launchers._loop_args(out, SPLIT_STEPS, ARGS.log_every, stage, SHAPE), *extra]
        if launch == "dlaunch":
            return [*dlaunch, "--script", str(LOOP), "--", *loop_args], out
        if launch == "agent flags":  # cluster/local.py's _agent_command, with the loop for launcher.worker
            rendezvous = ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                          f"127.0.0.1:{launchers.free_port()}", "--rdzv-id", name, "--local-addr", "127.0.0.1",
                          "--max-restarts", "0"]
            return [*launchers.torchrun(), *rendezvous, "--nproc-per-node=1", str(LOOP), *loop_args], out
        return [*launchers.torchrun(), "--standalone", "--nproc-per-node=1", str(LOOP), *loop_args], out

    def trainer(name: str, *sets: str) -> tuple[list[str], Path]:
        runs = root / name  # a run root of its own: its one run directory is this run's
        command = [*dlaunch, "--set", f"logging.run_root={runs}", *(a for s in sets for a in ("--set", s))]
        return command, runs
    return {
        f"hand-written DeepSpeed ZeRO-{stage}": loop("loop"),
        "  the same, dlaunch's two parameter groups": loop("groups", "--decay-groups"),
        "  the same, the trainer's host reads every step": loop("reads", "--trainer-reads"),
        "  the same, those reads after the update (dlaunch until 2026-11-29)": loop("reads-end",
                                                                                    "--trainer-reads=end"),
        "  the same, torchrun with dlaunch's agent flags": loop("agent", launch="agent flags"),
        "  the same, under `dlaunch run --script`": loop("script", launch="dlaunch"),
        f"dlaunch, DeepSpeed ZeRO-{stage}": trainer("dlaunch"),
        "  the same, one parameter group (weight_decay 0)": trainer("one-group", "optim.weight_decay=0"),
    }


def train_records(steps: Path) -> list[dict]:
    """The logged steps of a loop's JSONL, or of the one run under a dlaunch run root."""
    if steps.is_dir():
        steps = launchers.only_run_dir(steps) / "metrics.jsonl"
    return [r for r in map(json.loads, steps.read_text().splitlines()) if r["kind"] == "train"]


def print_split_row(round_: int, name: str, row: dict) -> None:
    host = row["host"]
    print(f"round {round_} {name:50} {row['tokens_per_s']:9.0f} tokens/s; host per step: "
          f"{host.get('cpu_s_per_step', 0) * 1e3:.0f} ms CPU ({host.get('main_cpu_s_per_step', 0) * 1e3:.0f} main), "
          f"{host.get('minor_faults_per_step', 0):.0f} faults, main thread's switches "
          f"{host.get('main_switches_per_step')}; busy threads {host.get('threads_busy')}", flush=True)


def split(rounds: int, stage: int) -> int:
    """--split: the variants at ZeRO ``stage``, one after the other, ``rounds`` times."""
    rows: dict[str, list[dict]] = {}
    for round_ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            variants = list(split_variants(Path(tmp), stage).items())
            # Every other round in reverse: no row always runs first, or just after the loop.
            for name, (command, steps) in variants[::-1] if round_ % 2 else variants:
                process = subprocess.Popen(command, cwd=bench.REPO)
                with RankSampler(process.pid) as sampler:
                    code = process.wait()
                if code:
                    raise subprocess.CalledProcessError(code, command)
                records = train_records(steps)
                start = next(r["time"] for r in records if r["step"] == ARGS.warmup)
                steady = [r for r in records if r["step"] > ARGS.warmup]
                row = {"round": round_,
                       "tokens_per_s": statistics.median(r["samples_per_s"] for r in steady) * ARGS.seq,
                       "host": sampler.window(start, steady[-1]["time"], steady[-1]["step"] - ARGS.warmup),
                       "env_names": sampler.env_names}
                rows.setdefault(name, []).append(row)
                print_split_row(round_, name, row)
                split_results(stage).write_text(json.dumps(
                    {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "zero_stage": stage,
                     "steps": SPLIT_STEPS, "warmup": ARGS.warmup, "cpus": os.cpu_count(), "rows": rows},
                    indent=2) + "\n")
    baseline = [r["tokens_per_s"] for r in rows[f"hand-written DeepSpeed ZeRO-{stage}"]]
    for name, runs in rows.items():
        ratios = [r["tokens_per_s"] / base for r, base in zip(runs, baseline)]
        print(f"{name:50} {statistics.median(r['tokens_per_s'] for r in runs):9.0f} tokens/s, "
              f"{min(ratios):.3f}-{max(ratios):.3f} of the loop")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, help="also profile the loop and dlaunch at --stage into this directory")
    parser.add_argument("--split", type=int, metavar="ROUNDS", help="only the variants of one stage, ROUNDS times")
    parser.add_argument("--stage", type=int, choices=(0, 1, 2), default=2,
                        help="the ZeRO stage --split runs and --profile profiles (default 2)")
    options = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_trainer_overhead.py needs a CUDA GPU", file=sys.stderr)
        return 1
    RESULTS.parent.mkdir(exist_ok=True)
    if options.split:
        return split(options.split, options.stage)
    device = torch.cuda.get_device_name()
    model = GPT([ARGS.seq], bench.VOCAB, n_layer=ARGS.layers, n_head=ARGS.heads, n_embd=ARGS.embd)
    flops_per_token = training_flops_per_sample(model, torch.zeros(1, ARGS.seq, dtype=torch.long)) / ARGS.seq
    del model
    peak = peak_flops(device, "bf16", None)
    print(f"{device}, torch {torch.__version__}; GPT {ARGS.layers}x{ARGS.embd}, seq {ARGS.seq}, "
          f"micro-batch {ARGS.batch}, bf16; median of steps {ARGS.warmup + 1}-{ARGS.steps}", flush=True)
    rows: dict[str, dict[str, float]] = {}

    def report(name: str, tokens_per_s: float, reported_mfu: float | None = None) -> None:
        rows[name] = {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak if peak else None,
                      "mfu_reported": reported_mfu}
        mfu = f"{rows[name]['mfu']:.1%}" if peak else "-"
        print(f"{name:48} {tokens_per_s:9.0f} tokens/s  MFU {mfu}", flush=True)
        RESULTS.write_text(json.dumps({"device": device, "torch": torch.__version__, "args": vars(ARGS),
                                       "flops_per_token": flops_per_token, "peak_flops": peak, "rows": rows},
                                      indent=2) + "\n")  # row by row: a run cut short keeps what it measured

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{launchers.free_port()}", rank=0, world_size=1)
    for gather, name in ((False, "hand-written (autocast, fused AdamW)"),
                         (True, "hand-written, plus the trainer's all_gather")):
        report(name, bench.hand_written(ARGS, gather)["tokens_per_s"])
    dist.destroy_process_group()
    torch.cuda.empty_cache()
    for stage in STAGES:  # each pair back to back
        report(f"hand-written DeepSpeed ZeRO-{stage}", loop_rate(stage, ARGS.steps))
        report(f"dlaunch, DeepSpeed ZeRO-{stage}", *dlaunch_rate(f"{{name: deepspeed, zero_stage: {stage}}}"))
    if options.profile is not None:
        profile_both(options.profile, options.stage)
    report("dlaunch, Accelerate DDP", *dlaunch_rate("{name: accelerate}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
