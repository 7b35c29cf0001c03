"""The run directory: its layout, and its creation (all or nothing).

RUN_DIR/
  recipe.yaml       the resolved recipe (file + overrides + defaults)
  plan.json         the LaunchPlan every worker reads
  ds_config.json | accelerate.json   the engine config, exactly as the engine gets it
  env.json          versions, git sha, host, seeds, command line
  metrics.jsonl     the hyperparameters, then one JSON object per logged step /
                    evaluation (rank 0)
  tb/               TensorBoard event files
  mlflow.json       the MLflow run this run logs to (logging.mlflow); wandb/ its
                    W&B run (logging.wandb)
  checkpoints/      step-XXXXXXXX/ directories, each with its manifest.json, and the
                    `latest` pointer (launcher/checkpoint.py)
  logs/rank-N.log   each rank's log; rank-N.status its last known state;
                    rank-N.lock held while the rank's process lives; rank-N.host
                    the host it runs on; rank-N.progress the step and phase it is in
                    hang-verdict why the run was declared hung (train.hang_timeout)
  slurm/            job.sbatch as submitted and job_id (Slurm jobs)
  ray/job.json      the Ray cluster, job id and state (Ray jobs); ray/driver.lock is
                    held while the process driving the job lives
  model.pt          the final weights, float32
  snapshots/        the weights at each warm-restart cycle's end and their index
                    (schedule.snapshots)
  alerts.jsonl      training-health alerts and what was done about them
  report/           plots and summary.md, written when the run ends
  eval-<split>.json `dlaunch eval`'s scores (eval-<split>-ensemble.json with --ensemble);
                    export/ `dlaunch export`'s files
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from launcher.credentials import may_hold_credential
from launcher.errors import UsageError
from launcher.plan import LaunchPlan
from launcher.recipe import Recipe
from launcher.yamlio import dump_yaml

PLAN = "plan.json"
RECIPE = "recipe.yaml"
ENV = "env.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
MLFLOW_RUN = "mlflow.json"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
RAY_JOB = "ray/job.json"


def rank_log(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / LOGS / f"rank-{rank}.log"


def rank_status(run_dir: str | Path, rank: int) -> Path:
    """One line: running | done | failed: <why> | terminated: <signal>.
    A rank whose file still says `running` after its job ended was killed hard."""
    return Path(run_dir) / LOGS / f"rank-{rank}.status"


def rank_host(run_dir: str | Path, rank: int) -> Path:
    """The host a rank runs on (Slurm's node name where there is one), for reports."""
    return Path(run_dir) / LOGS / f"rank-{rank}.host"


def rank_lock(run_dir: str | Path, rank: int) -> Path:
    """POSIX-locked by the rank's process for as long as it lives, so that a launcher on
    the same host sees the moment a rank dies, even one killed too hard to say so."""
    return Path(run_dir) / LOGS / f"rank-{rank}.lock"


def rank_progress(run_dir: str | Path, rank: int) -> Path:
    """`STEP PHASE`: the step a rank of the built-in trainer is in and what it is doing
    there (launcher/progress.py); the file's mtime says since when."""
    return Path(run_dir) / LOGS / f"rank-{rank}.progress"


def hang_verdict(run_dir: str | Path) -> Path:
    """One line: which ranks did not arrive where (launcher/watchdog.py), written by the
    first rank whose watchdog fires; every rank of the attempt then reports that line."""
    return Path(run_dir) / LOGS / "hang-verdict"


ENGINE_CONFIG = {"deepspeed": "ds_config.json", "accelerate": "accelerate.json"}


def run_root(recipe: Recipe, backend: str) -> str:
    """Where run directories go: on Ray, in the storage every node reaches."""
    if backend == "ray" and recipe.cluster.ray.storage:
        return recipe.cluster.ray.storage
    return recipe.logging.run_root


def new_run_dir(root: str | Path, name: str, stamp: str) -> Path:
    """RUN_ROOT/<name>-<stamp>, absolute (workers, `--resume` and other nodes may start
    elsewhere), with a -2, -3... suffix if two runs share a second."""
    base = Path(root).absolute() / f"{name}-{stamp}"
    candidate, n = base, 1
    try:
        while candidate.exists():
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")
    except OSError as exc:  # a path too long, a folder we may not look into
        raise UsageError(f"cannot use {str(base)!r}: {exc.strerror or exc}", key="logging.run_root") from None
    return candidate


def _env_record(plan: LaunchPlan, argv: list[str]) -> dict[str, Any]:
    """What a person needs to reproduce the run: versions, code, host, seeds."""
    versions = {}
    for package in ("dlaunch", "torch", "deepspeed", "accelerate", "ray", "numpy", "pyarrow", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git": _git_state(),
        "hosts": [socket.gethostname()],
        "seeds": {"train": plan.recipe.train.seed, "data_split": plan.recipe.data.split_seed},
        "command": argv,
        "environment": {k: v for k, v in os.environ.items() if _is_reproducibility_var(k)},
    }


# Variables that change how a run behaves. Anything that looks like a credential is left
# out even if it matches: run directories get shared and uploaded. The allocator's
# (glibc's MALLOC_*, a preloaded jemalloc or tcmalloc) change a CPU step's speed by
# several percent.
_VAR_PREFIXES = ("CUDA_", "NCCL_", "OMP_", "MKL_", "TORCH_", "PYTORCH_", "SLURM_JOB_", "DLAUNCH_",
                 "MALLOC_", "LD_PRELOAD")


def _is_reproducibility_var(name: str) -> bool:
    return name.startswith(_VAR_PREFIXES) and not may_hold_credential(name)


def _git_state() -> dict[str, Any] | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha, "dirty": dirty}


def write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Through a temporary file and a rename: a reader sees the old text or the new.

    ``durable`` fsyncs the text before the rename, so that it survives a power cut too.
    A file only read while its machine is up can skip that: an fsync waits for whatever
    else the disk has queued, seconds on a busy one."""
    temporary = path.with_name(f".{path.name}.tmp")
    if durable:
        write_durably(temporary, text)
    else:
        temporary.write_text(text)
    os.replace(temporary, path)


def create(plan: LaunchPlan, argv: list[str]) -> Path:
    """Write the run directory for ``plan`` all at once: it is assembled under a hidden
    temporary name and renamed into place, so a failure leaves nothing behind."""
    final = Path(plan.run_dir)
    staging = final.with_name(f".{final.name}.tmp")
    # The top-most folder this call creates, removed again if anything fails.
    first_missing = next((p for p in reversed(final.absolute().parents) if not p.exists()), None)
    try:
        staging.mkdir(parents=True)
        (staging / LOGS).mkdir()
        write_durably(staging / PLAN, plan.to_json())
        write_durably(staging / RECIPE, dump_yaml(plan.recipe.model_dump(mode="json")))
        write_durably(staging / ENV, json.dumps(_env_record(plan, argv), indent=2) + "\n")
        if plan.training is not None:
            engine = plan.training.engine
            config = engine.deepspeed if engine.name == "deepspeed" else engine.accelerate
            write_durably(staging / ENGINE_CONFIG[engine.name], json.dumps(config, indent=2) + "\n")
        os.rename(staging, final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if first_missing is not None:
            shutil.rmtree(first_missing, ignore_errors=True)
        raise UsageError(f"cannot create run directory {str(final)!r}: {exc.strerror or exc}",
                         key="logging.run_root") from None
    return final
