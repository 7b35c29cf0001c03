"""Atomic, verified checkpoints: written to a temporary folder, listed with their sizes
and sha256 in a manifest, fsynced, renamed into place; the ``latest`` pointer moves
last. A crash at any moment leaves either the old latest checkpoint or the new one,
never half of one; a file damaged later (a bad disk, a full quota, a careless `rm`) is
found by the manifest, and a resume goes back to the newest checkpoint that verifies.

checkpoints/
  step-00000120/
    engine/          the engine's own files (DeepSpeed's tag folder, Accelerate's state)
    trainer.json     step, LR schedule, early-stopping state
    rng/rank-N.pt    each rank's RNG states
    manifest.json    every other file's path, size and sha256 (launcher/manifest.py)
  .tmp-step-00000124/  a checkpoint being written (or left by a crash): never loaded,
                     removed by the next save
  latest             "step-00000120"
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from launcher.engines.base import Engine, recipe_options_kept
from launcher.errors import FinalFailure
from launcher.faults import Faults
from launcher.manifest import MANIFEST, TRAINER_STATE, loadable, verify, write_manifest
from launcher.rundir import CHECKPOINTS, write_atomic

LATEST = "latest"


class NoGoodCheckpoint(FinalFailure):
    """A run has checkpoints, and none of them verifies."""


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
    """The checkpoint the ``latest`` pointer names, or None: cheap (no verification),
    for "does the run have a checkpoint"; `choose` picks the one to load."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    named = pointer.parent / pointer.read_text().strip()
    return named if named.is_dir() else None


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
    if rank == 0:  # the run dir is on a file system every rank shares: rank 0 sees all files
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        write_manifest(staging)
        _fsync_tree(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(staging, final)
        write_atomic(root / LATEST, final.name)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first (``.tmp-*`` staging
    folders are not)."""
    return sorted(p for p in root.glob("step-*") if p.is_dir())


def _prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, the one ``latest`` names and
    the newest one whose files are all there at their sizes; and the staging folders
    of saves a crash interrupted. Sizes, not hashes: the newest checkpoint was hashed a
    moment ago, and rehashing at every save would double its cost; what befalls a file
    after it is written (a truncation, a deletion) shows in its size, and a resume
    hashes in full."""
    done = _checkpoints(root)
    intact = next((p for p in reversed(done) if loadable(verify(p, hashes=False))), None)
    keep = {*done[-keep_last:], latest(root.parent), intact}
    for old in done:
        if old not in keep:
            shutil.rmtree(old)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale)


@dataclass(frozen=True)
class Rejected:
    checkpoint: Path
    problems: tuple[str, ...]


@dataclass(frozen=True)
class Choice:
    """The checkpoint a run resumes from (None: none to resume from), and the newer
    ones passed over because they do not verify, newest first."""

    checkpoint: Path | None
    rejected: tuple[Rejected, ...] = ()
    unverified: bool = False
    """It has no manifest: an older dlaunch wrote it (launcher/manifest.py, `loadable`)."""

    def warnings(self) -> list[str]:
        then = f"resuming from {self.checkpoint.name}" if self.checkpoint else "no older checkpoint verifies"
        lines = [f"checkpoint {r.checkpoint.name} is corrupt: {', '.join(r.problems)}; {then}"
                 for r in self.rejected]
        if self.unverified:
            lines.append(f"checkpoint {self.checkpoint.name} has no {MANIFEST} (written by an older "
                         "dlaunch): resuming from it unverified")
        return lines

    def error(self) -> str:
        """Why a run whose checkpoints all fail to verify cannot resume, and what to do."""
        found = "; ".join(f"{r.checkpoint.name} ({', '.join(r.problems)})" for r in self.rejected)
        root = self.rejected[0].checkpoint.parent
        return (f"no checkpoint in {root} verifies: {found}. Put back intact copies of the damaged "
                f"files, or move {root} aside to train from step 0")


def choose(run_dir: str | Path) -> Choice:
    """The newest checkpoint of the run that verifies against its manifest.

    Candidates, best first: the one ``latest`` names, then the older ones, newest first.
    A checkpoint past ``latest`` was never committed: a save that ended between its
    rename and the pointer's move, or, under PBT, one of the trial's own that another
    trial's adopted checkpoint superseded (cluster/tune.py). Without a pointer: all of
    them, newest first.
    """
    done = _checkpoints(Path(run_dir) / CHECKPOINTS)[::-1]
    pointed = latest(run_dir)
    candidates = done[done.index(pointed):] if pointed in done else done
    rejected = []
    for candidate in candidates:
        problems = verify(candidate)
        if loadable(problems):
            return Choice(candidate, tuple(rejected), unverified=bool(problems))
        rejected.append(Rejected(candidate, tuple(problems)))
    return Choice(None, tuple(rejected))


def load(checkpoint: Path, engine: Engine) -> dict[str, Any]:
    """Restore the engine and this rank's RNG; return the trainer state. The optimizer
    keeps the options of this run's recipe, not those the checkpoint was saved with."""
    with recipe_options_kept(engine.schedule.optimizer):
        engine.load(checkpoint / "engine")
    set_rng_state(torch.load(checkpoint / "rng" / f"rank-{dist.get_rank()}.pt", weights_only=False))
    return json.loads((checkpoint / TRAINER_STATE).read_text())
