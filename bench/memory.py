"""Per-rank memory of the model states (parameters, gradients, optimizer states) of the
real DeepSpeed engine, as dlaunch configures it, for ZeRO stages 0-3 on 1, 2 and 4 ranks,
against the estimate `dlaunch plan` prints (launcher/memory.py: the ZeRO paper's
(2 + 2 + K)·Ψ/N) and DeepSpeed's own estimators.

    .venv/bin/python bench/memory.py [--world 1 2 4] [--stages 0 1 2 3] [--hidden 1024 1024 1024]
                                     [--steps 3] [--precision bf16] [--out bench/results/memory.json]

Each (stage, world size) is one `torchrun --standalone` job of the built-in MLP (AdamW;
planned by the planner, built by build_model, wrapped by DeepSpeedEngine) that trains
`--steps` steps on random batches made before anything is measured.

On CPU (gloo) a rank's figure is the bytes of its live tensor storages (every tensor the
garbage collector knows, and their gradients, each storage once), less those alive before
the model was built, sampled between the phases of each step: after the forward pass,
as each gradient arrives (last step), at the end of the backward pass (weights, every
gradient and, from the second step on, the optimizer states: the moment the paper's
formula describes) and after the optimizer step. The largest sample ("peak smp")
includes the activations; it is a sampled peak, not the allocator's. "maxrss +" is the
growth of the process's peak resident set over the same span (allocator and library
pages included). On CUDA the figures come from torch.cuda.memory_allocated instead, and
the allocator's own peak (max_memory_allocated) is added.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 2**20
RECIPE = {
    "name": "memory-bench",
    "model": {"name": "mlp"},
    "data": {"source": "synthetic", "num_features": 512, "num_classes": 10, "samples": 4096},
    "optim": {"name": "adamw"},
    "train": {"micro_batch_size": 16, "max_steps": 10, "early_stopping": {"patience": None}},
    "logging": {"progress": False, "report": False},
}


def plan_for(stage: int, world: int, hidden: list[int], run_dir: str, precision: str = "bf16"):
    """The plan `dlaunch run` would make for the bench recipe on one node of ``world`` ranks."""
    from launcher.data.facts import describe
    from launcher.host import detect_host
    from launcher.plan import build_plan
    from launcher.recipe import Recipe

    recipe = Recipe.model_validate({**RECIPE, "model": {"name": "mlp", "kwargs": {"hidden": hidden}},
                                    "engine": {"name": "deepspeed", "zero_stage": stage},
                                    "precision": {"dtype": precision}})
    return build_plan(recipe, host=detect_host(), data=describe(recipe.data), run_dir=run_dir,
                      backend="local", nodes=1, procs_per_node=world)


# -- in each rank ------------------------------------------------------------------------


def live_tensor_bytes(collect: bool) -> int:
    """Bytes of the live CPU tensor storages, each storage once however many views share it.
    A gradient only C++ holds has no Python object of its own: asked for through its tensor.
    ``collect``: first free what only reference cycles hold (slow, so not inside a backward)."""
    import torch

    if collect:
        gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        for tensor in (obj, obj.grad):
            if tensor is None or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def bucket_bytes(optimizer) -> int:
    """The bytes of the gradient buckets a ZeRO optimizer holds now (its `ipg_buckets`)."""
    total = 0
    for bucket in getattr(optimizer, "ipg_buckets", {}).values():
        buffers = bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]
        total += sum(t.untyped_storage().nbytes() for t in buffers if t is not None)
    return total


def worker(args: argparse.Namespace) -> None:
    import torch

    from launcher.engines.base import loss_fn
    from launcher.engines.imports import import_engine
    from launcher.models.build import build_model
    from launcher.models.transfer import Transfer
    from launcher.trainer import create_engine, seed_everything

    rank = int(os.environ["RANK"])
    plan = plan_for(args.stage, int(os.environ["WORLD_SIZE"]), args.hidden, args.run_dir, args.precision)
    cuda = plan.topology.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    seed_everything(plan.recipe.train.seed)
    data = plan.training.data
    device = torch.device("cuda") if cuda else torch.device("cpu")
    batches = [(torch.randn(plan.training.batch.micro, *data.input_shape, device=device),
                torch.randint(data.num_classes, (plan.training.batch.micro,), device=device))
               for _ in range(args.steps)]
    import_engine(plan)  # as create_engine does; its start-up tensors before the baseline

    def allocated(collect: bool = True) -> int:
        return torch.cuda.memory_allocated() if cuda else live_tensor_bytes(collect)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline, rss0 = allocated(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_model(plan.recipe.model, data)
    transfer = Transfer.of(model, plan.recipe)
    engine = create_engine(plan, model, transfer.param_groups(model, plan.recipe.optim.weight_decay))
    del model
    ds = engine.engine
    phases = ("built", "forward", "in_backward", "backward", "step")
    samples: dict[str, list[tuple[int, int]]] = {phase: [] for phase in phases}  # (live bytes, bucket bytes)

    def sample(phase: str, collect: bool = True) -> None:
        samples[phase].append((allocated(collect) - baseline, bucket_bytes(ds.optimizer)))

    sample("built")
    last_step = False
    for param in ds.module.parameters():  # as each gradient arrives, while buckets fill (the last step only)
        param.register_hook(lambda grad: sample("in_backward", collect=False) if last_step else None)
    ds.train()
    for index, (inputs, targets) in enumerate(batches):
        # DeepSpeedEngine.train_step on one micro-batch, with samples between its phases.
        last_step = index == len(batches) - 1
        loss = loss_fn(ds(inputs.to(engine.compute_dtype)), targets)
        sample("forward", collect=False)
        ds.backward(loss)
        if index:  # from the second step on, the optimizer states exist as a backward pass ends
            sample("backward")
        ds.step()
        del loss
        sample("step")
    peak = max((s for phase in samples.values() for s in phase), key=lambda s: s[0])
    result = {
        "rank": rank, "built": samples["built"][0][0],
        "in_backward": max(s[0] for s in samples["in_backward"]),
        "bucket": max(s[1] for phase in samples.values() for s in phase),
        "backward": max(s[0] for s in samples["backward"]),
        "states": max(live - bucket for live, bucket in samples["backward"]),
        "step": samples["step"][-1][0],
        "peak_sampled": peak[0],
        "peak_allocator": torch.cuda.max_memory_allocated() - baseline if cuda else None,
        "maxrss_growth": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024,
        "optimizer": type(ds.optimizer).__name__,
    }
    Path(args.out, f"rank-{rank}.json").write_text(json.dumps(result))


# -- the driver ---------------------------------------------------------------------------

COLUMNS = {"states": "states", "built": "built", "in_backward": "in bwd", "bucket": "of it bkt",
           "backward": "bwd end", "step": "step", "peak_sampled": "peak smp", "maxrss_growth": "maxrss +"}
NOTE = """\
formula   launcher/memory.py, what `dlaunch plan` prints: the ZeRO paper's (2 + 2 + K) x Ψ split by the stage
DS est.   DeepSpeed's estimate_zero2/zero3_model_states_mem_needs, no offload (it has none for stages 0-1)
states    measured model states: "bwd end" less the gradient buckets held then
built     live tensors once the engine is built, before any step
in bwd    the largest sample as gradients arrive during the last backward pass
of it bkt DeepSpeed's gradient buckets at their largest (reduce_bucket_size elements, default 5e8)
bwd end   at the end of a backward pass once the optimizer states exist: weights, gradients, optimizer
step      after the last optimizer step
peak smp  the largest of all samples (after each forward pass too: activations included)
maxrss +  growth of the process's peak resident set: pages touched, so an untouched bucket barely counts"""


def deepspeed_estimate(stage: int, world: int, params: int, largest_layer: int) -> int | None:
    """DeepSpeed's estimate of a GPU's model-state memory without offload; it has none for
    stages 0 and 1."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=world, cpu_offload=False)
        return gpu
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, num_gpus_per_node=world,
                                                          cpu_offload=False, cpu_offload_params=False)
        return gpu
    return None


def run_job(stage: int, world: int, env: dict[str, str], args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Each rank's figures, from a torchrun job of ``world`` ranks with the plan's environment."""
    out = tmp / f"stage{stage}-world{world}"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               __file__, "--worker", "--stage", str(stage), "--out", str(out), "--run-dir", str(out),
               "--steps", str(args.steps), "--precision", args.precision, "--hidden", *map(str, args.hidden)]
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"stage {stage}, world {world} failed:\n{done.stderr[-3000:]}")
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024, 1024],
                        help="the MLP's hidden layers (512 features in, 10 classes out)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--out", default="bench/results/memory.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    probe = plan_for(0, 1, args.hidden, "probe", args.precision)
    os.environ.update(probe.env)  # DS_ACCELERATOR, before DeepSpeed is imported
    from deepspeed.runtime.zero.stage3 import model_to_params

    from launcher.models.build import build_model

    device = probe.topology.device
    columns = {**COLUMNS, **({"peak_allocator": "peak alloc"} if device == "cuda" else {})}
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlaunch-memory-") as tmp:
        for world in args.world:
            for stage in args.stages:
                plan = plan_for(stage, world, args.hidden, tmp, args.precision)
                params, largest_layer = model_to_params(build_model(plan.recipe.model, plan.training.data))
                ranks = run_job(stage, world, plan.env, args, Path(tmp))
                estimate = plan.training.memory
                rows.append({
                    "stage": stage, "world": world, "params": params, "optimizer": ranks[0]["optimizer"],
                    "formula": estimate.bytes_on("device"),
                    "formula_states": {s.state: s.bytes for s in estimate.states},
                    "deepspeed_estimate": deepspeed_estimate(stage, world, params, largest_layer),
                    # The rank that holds the most (partitions differ by their padding).
                    **{key: max(r[key] for r in ranks) for key in columns},
                    "ranks": ranks,
                })
                print(f"stage {stage} world {world}: done", file=sys.stderr)

    print(f"MLP {args.hidden}, Ψ = {rows[0]['params']:,} parameters, {args.precision}, AdamW, {device}; "
          "MiB per rank (the rank that holds the most)")
    print(f"{'stage':>5} {'ranks':>5} {'formula':>8} {'DS est.':>8} "
          + " ".join(f"{header:>9}" for header in columns.values()) + "  DeepSpeed optimizer")
    for row in rows:
        ds_estimate = "—" if row["deepspeed_estimate"] is None else f"{row['deepspeed_estimate'] / MiB:.2f}"
        print(f"{row['stage']:>5} {row['world']:>5} {row['formula'] / MiB:8.2f} {ds_estimate:>8} "
              + " ".join(f"{row[key] / MiB:9.2f}" for key in columns) + f"  {row['optimizer']}")
    print(NOTE)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "device": device, "precision": args.precision,
                               "hidden": args.hidden, "steps": args.steps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
