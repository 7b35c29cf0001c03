"""Whether the file system of the run directories can hold the run's checkpoints, asked
before anything starts: a run that cannot write one trains until its first checkpoint
and fails there, hours in, with the work since its start lost.

A checkpoint's size is estimated from the model states (launcher/memory.py). Less room
than one checkpoint is refused; less than the checkpoints the run keeps is said on one
line, and the run starts: room may be freed before it is needed. `df`'s figure is what
counts, as for any write; a quota below it is not seen here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from launcher.errors import UsageError
from launcher.memory import amount
from launcher.plan import LaunchPlan, checkpoint_size


def _free_bytes(path: Path) -> int:
    """Free bytes for unprivileged writes on the file system ``path`` is, or will be, on."""
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    return shutil.disk_usage(existing).free


def check(plans: list[LaunchPlan], *, resuming: bool) -> str | None:
    """Refuse ``plans`` (one run, or the grid points or folds of one command, which share
    a run root) when one checkpoint does not fit; otherwise the line that says their
    kept checkpoints do not, or None. ``resuming``: their checkpoints exist already,
    and only the one being written needs room."""
    size = checkpoint_size(plans[0])
    if not size:
        return None
    run_dir = Path(plans[0].run_dir)
    where = run_dir if resuming else run_dir.parent
    free = _free_bytes(where)
    if free < size:
        raise UsageError(f"the file system of {where} has {amount(free)} free, and one checkpoint of "
                         f"this run takes about {amount(size)}: free space, or put the run elsewhere",
                         key="--resume" if resuming else "logging.run_root")
    keep = plans[0].recipe.train.keep_last
    kept = size * (len(plans) * keep + 1)
    if resuming or free >= kept:
        return None
    runs = f", in each of {len(plans)} runs" if len(plans) > 1 else ""
    return (f"dlaunch: the file system of {where} has {amount(free)} free, and the checkpoints this "
            f"command keeps take up to {amount(kept)} ({amount(size)} each, train.keep_last {keep}{runs}, "
            "and the one being written): it may fail at a checkpoint unless room is freed")
