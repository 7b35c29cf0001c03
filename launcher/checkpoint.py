"""Atomic checkpoints: written to a temporary folder, fsynced, renamed into place; the
``latest`` pointer moves last. A crash at any moment leaves either the old latest
checkpoint or the new one, never half of one.

checkpoints/
  step-00000120/
    engine/          the engine's own files (DeepSpeed's tag folder, Accelerate's state)
    trainer.json     step, LR schedule, early-stopping state
    rng/rank-N.pt    each rank's RNG states
  latest             "step-00000120"
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from launcher.engines.base import Engine
from launcher.faults import Faults
from launcher.rundir import CHECKPOINTS, write_atomic

LATEST = "latest"
TRAINER_STATE = "trainer.json"


def _name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    return pointer.parent / pointer.read_text().strip()


def save(run_dir: str | Path, step: int, engine: Engine, trainer_state: dict[str, Any],
         keep_last: int, faults: Faults | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint's final path."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / _name(step)
    staging = root / f".tmp-{_name(step)}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash mid-save
        (staging / "rng").mkdir(parents=True)
    dist.barrier()
    engine.save(staging / "engine")
    torch.save(rng_state(), staging / "rng" / f"rank-{rank}.pt")
    if faults is not None:
        faults.in_checkpoint(step)
    dist.barrier()
    if rank == 0:
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        _fsync_tree(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(staging, final)
        write_atomic(root / LATEST, final.name)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints; ``latest`` is never deleted."""
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    current = latest(root.parent)
    for old in done[:-keep_last]:
        if old != current:
            shutil.rmtree(old)


def load(checkpoint: Path, engine: Engine) -> dict[str, Any]:
    """Restore the engine and this rank's RNG; return the trainer state."""
    engine.load(checkpoint / "engine")
    set_rng_state(torch.load(checkpoint / "rng" / f"rank-{dist.get_rank()}.pt", weights_only=False))
    return json.loads((checkpoint / TRAINER_STATE).read_text())
