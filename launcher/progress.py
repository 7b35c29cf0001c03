"""Where each rank of the built-in trainer is: logs/rank-N.progress holds `STEP PHASE`,
rewritten in place as the rank moves on, so its mtime says since when.

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

Phase = Literal["start", "data", "compute", "collective", "update", "eval", "snapshot", "checkpoint", "report",
                "finish"]
# The order of a step's phases: a rank in an earlier phase of the same step is behind.
PHASES: tuple[Phase, ...] = ("start", "data", "compute", "collective", "update", "eval", "snapshot", "checkpoint",
                             "report", "finish")


class Position(NamedTuple):
    step: int
    phase: Phase
    since: float
    """time.time() when the rank entered the phase."""

    def order(self) -> tuple[int, int]:
        return self.step, PHASES.index(self.phase)


LINE_BYTES = 32
"""Every line is padded to this width, so a rewrite covers the one before it whole."""


class RankProgress:
    """This rank's progress file, rewritten in place: one pwrite a mark, a few
    microseconds, where writing a new file and renaming it over the old one cost about
    0.7 ms, three times a step: 3% of the 65 ms steps of bench/trainer_overhead.py's job
    (an A/B run with the marks off). No fsync: a line lost in a crash costs nothing."""

    def __init__(self, run_dir: str | Path, rank: int) -> None:
        self.path = rank_progress(run_dir, rank)
        self._fd: int | None = None
        self.position: Position | None = None
        """The last line written, kept for this rank's watchdog: it looks without reading."""

    def mark(self, step: int, phase: Phase) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.pwrite(self._fd, f"{step} {phase}".ljust(LINE_BYTES - 1).encode() + b"\n", 0)
        self.position = Position(step, phase, time.time())

    def clear(self) -> None:
        """Remove a previous attempt's line: until this rank marks a phase, its peers see
        it as not started."""
        self.path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.position = None


def read_position(run_dir: str | Path, rank: int) -> Position | None:
    """Where the rank last said it was; None before it started training."""
    path = rank_progress(run_dir, rank)
    try:
        since = path.stat().st_mtime
        line = path.read_text()
        # A read that raced a rewrite could mix the two lines' bytes; two equal reads cannot.
        if line != path.read_text():
            return read_position(run_dir, rank)
        step, phase = line.split()
        position = Position(int(step), phase, since)  # type: ignore[arg-type]
    except (FileNotFoundError, ValueError):
        return None
    return position if phase in PHASES else None
