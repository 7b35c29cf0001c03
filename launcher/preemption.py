"""Preemption: a signal from the scheduler asks for a checkpoint, not an exit.

Under Slurm, the sbatch script names the signal (`--signal`, default USR2) in
DLAUNCH_PREEMPT_SIGNAL. Each rank's handler only sets a flag; the trainer shares the
flags of all ranks at the end of every step, so every rank sees the request at the same
step, checkpoints there, and rank 0 requeues the job (`scontrol requeue`, as submitit
does). The requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
from types import FrameType

SIGNAL_VAR = "DLAUNCH_PREEMPT_SIGNAL"
REQUEUE_VAR = "DLAUNCH_REQUEUE"

requested = False


class Preempted(Exception):
    """Raised by the trainer once the preemption checkpoint is written."""


def _request(signum: int, frame: FrameType | None) -> None:
    global requested
    requested = True


def install() -> str | None:
    """Catch the configured signal, if any; its name."""
    name = os.environ.get(SIGNAL_VAR)
    if name:
        signal.signal(getattr(signal, f"SIG{name}"), _request)
    return name


def requeue() -> bool:
    """Put this Slurm job back in the queue; False when the job asked not to be."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get(REQUEUE_VAR) != "1" or not job:
        return False
    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=60)
    return True
