"""Preemption: a signal from the scheduler asks for a checkpoint, not an exit.

Under Slurm, the sbatch script names the signal (`--signal`, default USR2) in
DLAUNCH_PREEMPT_SIGNAL. Each rank's handler only sets a flag; the trainer shares the
flags of all ranks at the end of every step, so every rank sees the request at the same
step, checkpoints there, and rank 0 requeues the job (`scontrol requeue`, as submitit
does). The requeued job resumes from that checkpoint. SIGTERM, with which Slurm ends a
job (cancelled, requeued by Slurm itself, out of time), also asks for a checkpoint, but
requeues nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType

log = logging.getLogger(__name__)

SIGNAL_VAR = "DLAUNCH_PREEMPT_SIGNAL"
REQUEUE_VAR = "DLAUNCH_REQUEUE"

requested = False
# SIGTERM among the requests: Slurm is ending the job (a cancel, a requeue, a time limit),
# and every process of it, the node agents included, got the signal.
ending = False


class Preempted(Exception):
    """Raised by the trainer once the preemption checkpoint is written."""


def _request(signum: int, frame: FrameType | None) -> None:
    global requested, ending
    requested = True
    ending = ending or signum == signal.SIGTERM


def install() -> str | None:
    """Catch the configured signal, if any, and SIGTERM with it: Slurm ends a
    preempted, requeued or timed-out job with SIGTERM and, KillWait seconds later,
    SIGKILL; the step that is running gets its checkpoint in between."""
    name = os.environ.get(SIGNAL_VAR)
    if name:
        signal.signal(getattr(signal, f"SIG{name}"), _request)
        signal.signal(signal.SIGTERM, _request)
    return name


def requeue() -> bool:
    """Put this Slurm job back in the queue. False when the job asked not to be, when
    Slurm refuses because the job is already on its way back (requeued by `scontrol
    requeue`, preempted), and after a SIGTERM: that is how scancel (and `dlaunch cancel`)
    ends a job, and Slurm requeues a cancelled batch job as readily as a running one, so
    the cancel would not stick. As submitit does, only the preemption signal requeues
    (SIGTERM itself when the recipe names TERM); a SIGTERM that comes with Slurm's own
    requeue needs none."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get(REQUEUE_VAR) != "1" or not job:
        return False
    if ending and os.environ.get(SIGNAL_VAR) != "TERM":
        log.warning("SIGTERM: job %s not requeued (a cancel, or Slurm's own requeue)", job)
        return False
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        log.warning("scontrol requeue %s: %s", job, done.stderr.strip())
    return done.returncode == 0
