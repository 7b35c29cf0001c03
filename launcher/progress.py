"""Where each rank of the built-in trainer is: logs/rank-N.progress holds `STEP PHASE`,
rewritten as the rank moves on, so its mtime says since when.

STEP is the optimizer step the rank is working on, counted from 1 (the step whose
checkpoint it writes, in the checkpoint phase). A rank's peers read the file to tell
which ranks a collective is waiting for (launcher/watchdog.py), and failure reports
read it for the step a rank died in.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal, NamedTuple

from launcher.rundir import rank_progress

Phase = Literal["start", "data", "compute", "collective", "eval", "snapshot", "checkpoint", "finish"]
# The order of a step's phases: a rank in an earlier phase of the same step is behind.
PHASES: tuple[Phase, ...] = ("start", "data", "compute", "collective", "eval", "snapshot", "checkpoint",
                             "finish")


class Position(NamedTuple):
    step: int
    phase: Phase
    since: float
    """time.time() when the rank entered the phase."""

    def order(self) -> tuple[int, int]:
        return self.step, PHASES.index(self.phase)


class RankProgress:
    """This rank's progress file. A rename, not an fsync: a reader on another node
    sees the old line or the new (or, for the instant between the unlink and the rename,
    none), and a lost line after a crash costs nothing."""

    def __init__(self, run_dir: str | Path, rank: int) -> None:
        self.path = rank_progress(run_dir, rank)
        self.temporary = self.path.with_name(f".{self.path.name}.tmp")
        self.position: Position | None = None
        """The last line written, kept for this rank's watchdog: it looks without reading."""

    def mark(self, step: int, phase: Phase) -> None:
        self.temporary.write_text(f"{step} {phase}\n")
        # Not os.replace: renamed over an existing file, ext4 (auto_da_alloc) writes the
        # new one out before the rename returns, about 1.5 ms a mark, 10 ms a step.
        self.path.unlink(missing_ok=True)
        os.rename(self.temporary, self.path)
        self.position = Position(step, phase, time.time())

    def clear(self) -> None:
        """Remove a previous attempt's line: until this rank marks a phase, its peers see
        it as not started."""
        self.path.unlink(missing_ok=True)
        self.position = None


def read_position(run_dir: str | Path, rank: int) -> Position | None:
    """Where the rank last said it was; None before it started training."""
    path = rank_progress(run_dir, rank)
    try:
        since = path.stat().st_mtime
        step, phase = path.read_text().split()
        position = Position(int(step), phase, since)  # type: ignore[arg-type]
    except (FileNotFoundError, ValueError):
        return None
    return position if phase in PHASES else None
