"""Whether the file system of the run directories can hold the run's checkpoints, asked
before anything starts: a run that cannot write one trains until its first checkpoint
and fails there, hours in, with the work since its start lost.

A checkpoint's size is estimated from the model states (launcher/memory.py). Less room
than one checkpoint is refused; less than what the run keeps (its checkpoints, final
weights and snapshots) is said on one line, and the run starts: room may be freed
before it is needed. `df`'s figure is what counts, as for any write; a quota below it is
not seen here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from launcher.errors import UsageError
from launcher.memory import amount
from launcher.plan import LaunchPlan, checkpoint_size, weights_size


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
    """The line that says what ``plans`` keep on disk does not fit (one run, or the grid
    points or folds of one command, which share a run root): the checkpoints, the one
    being written, the final weights and any snapshots. None when it fits."""
    sizes = [checkpoint_size(plan) or 0 for plan in plans]
    if not any(sizes):
        return None
    weights = [weights_size(plan) or 0 for plan in plans]
    snapshots = [len(plan.training.steps.snapshots) if plan.training else 0 for plan in plans]
    where = Path(plans[0].run_dir).parent
    free, keep = _free_bytes(where), plans[0].recipe.train.keep_last
    kept = sum(size * keep + w * (1 + n) for size, w, n in zip(sizes, weights, snapshots, strict=True)) + max(sizes)
    if free >= kept:
        return None
    up_to = "" if len(set(sizes)) == 1 else "up to "
    parts = [f"checkpoints of {up_to}{amount(max(sizes))}, train.keep_last {keep} and the one being written",
             f"the final weights, {up_to}{amount(max(weights))}"]
    if any(snapshots):
        parts.append(f"{max(snapshots)} snapshots of the weights' size")
    runs = f", in each of {len(plans)} runs" if len(plans) > 1 else ""
    return (f"dlaunch: the file system of {where} has {amount(free)} free, and the files this command keeps "
            f"take up to {amount(kept)} ({'; '.join(parts)}{runs}): writing them may fail unless room is freed")
