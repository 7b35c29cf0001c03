"""Snapshot ensembles (Huang et al. 2017, "Snapshot Ensembles: Train 1, get M for free"):
the weights at the end of every warm-restart cycle, where the LR has annealed to its
floor, saved as the run reaches them (``schedule.snapshots``).

RUN_DIR/snapshots/
  cycle-01-step-00000050.pt   the float32 state dict (gathered under ZeRO-3)
  ...
  snapshots.json              {"snapshots": [{file, cycle, step, lr, val_loss, val_acc}, ...]}

A file is written under a temporary name, fsynced and renamed; the index is rewritten
the same way after it, so the index lists complete files only. A snapshot is written
before the checkpoint of its step, so a run resumed from that checkpoint finds it; a run
resumed from an earlier checkpoint drops the snapshots past it and writes them again as
it reaches their steps: none is lost, none is listed twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from launcher.engines.base import Engine
from launcher.rundir import write_atomic
from launcher.schedules import lr_factor

log = logging.getLogger(__name__)

SNAPSHOTS = "snapshots"
INDEX = "snapshots.json"
_NAME = re.compile(r"^cycle-(\d+)-step-(\d+)\.pt$")


def snapshot_name(cycle: int, step: int) -> str:
    return f"cycle-{cycle:02d}-step-{step:08d}.pt"


def read_index(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's snapshots in step order, as its index lists them (none: an empty list)."""
    path = Path(run_dir) / SNAPSHOTS / INDEX
    if not path.is_file():
        return []
    return json.loads(path.read_text())["snapshots"]


class SnapshotWriter:
    """Saves the snapshots of one run at ``cycle_ends`` (the plan's steps.snapshots;
    empty when the recipe takes none). Every rank holds one: a save is a collective."""

    def __init__(self, run_dir: Path, cycle_ends: Sequence[int], rank: int) -> None:
        self.run_dir = run_dir
        self.folder = run_dir / SNAPSHOTS
        self.cycle_ends = tuple(cycle_ends)
        self.rank = rank

    def at_cycle_end(self, step: int) -> bool:
        return step in self.cycle_ends

    def due(self, step: int, stopped_early: bool) -> bool:
        """At a cycle end, and at the last step of a run that stopped early."""
        return bool(self.cycle_ends) and (step in self.cycle_ends or stopped_early)

    def save(self, step: int, engine: Engine, scores: dict[str, float]) -> None:
        """Every rank calls it (the weights are gathered under ZeRO-3); rank 0 writes the
        file and its index entry, with the step's evaluation ``scores`` when it had one."""
        weights = engine.full_state_dict()
        if self.rank != 0:
            return
        cycle = 1 + sum(end < step for end in self.cycle_ends)
        name = snapshot_name(cycle, step)
        self.folder.mkdir(exist_ok=True)
        _save_atomic(weights, self.folder / name)
        # The LR the cycle's last step trained with (the engine's schedule already holds the next one's).
        lr = engine.schedule.peak_lrs[0] * lr_factor(engine.schedule.shape, step - 1)
        entries = [entry for entry in read_index(self.run_dir) if entry["step"] != step]
        self._write_index([*entries, {"file": name, "cycle": cycle, "step": step, "lr": lr, **scores}])
        log.info("snapshot %s", name)

    def forget_after(self, step: int) -> None:
        """A resumed run continues from ``step``: the snapshots its crashed attempt wrote
        past that step are dropped (the index first), to be written again in turn."""
        if self.rank != 0 or not self.folder.is_dir():
            return
        entries = read_index(self.run_dir)
        kept = [entry for entry in entries if entry["step"] <= step]
        if kept != entries:
            self._write_index(kept)
        for path in self.folder.glob("cycle-*-step-*.pt"):
            match = _NAME.match(path.name)
            if match and int(match.group(2)) > step:
                path.unlink()

    def _write_index(self, entries: list[dict[str, Any]]) -> None:
        entries = sorted(entries, key=lambda entry: entry["step"])
        write_atomic(self.folder / INDEX, json.dumps({"snapshots": entries}, indent=2) + "\n")


def _save_atomic(weights: dict[str, torch.Tensor], path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as f:
        torch.save(weights, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
