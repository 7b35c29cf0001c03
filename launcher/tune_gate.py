"""The hand-off between a PBT trial's job and the trial that reports it to Ray Tune.

Tune's PBT decides at a trial's result whether to go on or to restart it from a better
trial's checkpoint. A function trainable waits at each report for that decision; a
dlaunch trial is a job in other processes, which trained on while Tune decided: in one
test run a trial went 100 steps past the result Tune was deciding on, and a trial that
had already ended was "cloned" into, to no effect. Under PBT the job's ranks therefore
wait after each evaluation's checkpoint until the trial says Tune took that result and
let it go on (RUN_DIR/tune-took holds its step); a trial Tune stops or restarts ends
the job instead, which then has trained nothing past the step of the decision.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from launcher.rundir import write_atomic

ENV = "DLAUNCH_TUNE_GATE"
"""Set (to 1) in a trial's ranks' environment under PBT."""
TOOK = "tune-took"
POLL_S = 0.05


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def reset(run_dir: Path) -> None:
    """Before a trial's job starts: no step of an earlier attempt lets its ranks through."""
    (run_dir / TOOK).unlink(missing_ok=True)


def let_through(run_dir: Path, step: int) -> None:
    """The trial's side: Tune took the result of ``step`` and the trial goes on."""
    write_atomic(run_dir / TOOK, f"{step}\n", durable=False)


def taken(run_dir: Path, step: int) -> bool:
    try:
        return (run_dir / TOOK).read_text().strip() == str(step)
    except FileNotFoundError:
        return False


def wait(run_dir: Path, step: int) -> None:
    """A rank's side: until the trial lets ``step`` through (the watchdog bounds the wait)."""
    while not taken(run_dir, step):
        time.sleep(POLL_S)
