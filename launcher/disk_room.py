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


def refuse_without_room(plan: LaunchPlan, *, resuming: bool) -> None:
    """Refuse the run of ``plan`` when one of its checkpoints does not fit. ``resuming``:
    its run directory exists, and is where the room is looked for."""
    size = checkpoint_size(plan)
    where = Path(plan.run_dir) if resuming else Path(plan.run_dir).parent
    if size and (free := _free_bytes(where)) < size:
        raise UsageError(f"the file system of {where} has {amount(free)} free, and one checkpoint of "
                         f"this run takes about {amount(size)}: free space, or put the run elsewhere",
                         key="--resume" if resuming else "logging.run_root")


def short_of_room(plans: list[LaunchPlan]) -> str | None:
    """The line that says the checkpoints ``plans`` keep do not fit (one run, or the grid
    points or folds of one command, which share a run root); None when they do."""
    sizes = [checkpoint_size(plan) or 0 for plan in plans]
    if not any(sizes):
        return None
    where = Path(plans[0].run_dir).parent
    free, keep = _free_bytes(where), plans[0].recipe.train.keep_last
    kept = sum(sizes) * keep + max(sizes)
    if free >= kept:
        return None
    each = f"{amount(max(sizes))} each" if len(set(sizes)) == 1 else f"up to {amount(max(sizes))} each"
    runs = f", in each of {len(plans)} runs" if len(plans) > 1 else ""
    return (f"dlaunch: the file system of {where} has {amount(free)} free, and the checkpoints this "
            f"command keeps take up to {amount(kept)} ({each}, train.keep_last {keep}{runs}, "
            "and the one being written): it may fail at a checkpoint unless room is freed")
