"""What every backend's launching process needs: the node agent's command, workers that
import this launcher, and a SIGTERM that stops a job instead of orphaning it."""

from __future__ import annotations

import os
import signal
import site
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import launcher
from launcher.plan import LaunchPlan


def agent_module(plan: LaunchPlan) -> tuple[str, list[str]]:
    """(the node agent's module, what follows its options before the run dir). The
    built-in trainer on the CPU gets launcher.agent, which forks its ranks warm; a CUDA
    plan or a ``--script`` gets torchrun with exec'd ranks (why: launcher/agent.py)."""
    if plan.topology.device == "cpu" and plan.script is None:
        return "launcher.agent", []
    return "torch.distributed.run", ["-m", "launcher.worker"]


def worker_pythonpath() -> str | None:
    """PYTHONPATH for workers: they must import the launcher this CLI runs, also from a
    source checkout that is not installed, started from another directory."""
    root = Path(launcher.__file__).resolve().parent.parent
    if root in {Path(p).resolve() for p in site.getsitepackages()}:
        return None
    return os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))


class Terminated(Exception):
    """The launching process itself got SIGTERM."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM interrupts a wait as Ctrl-C does, so the job is stopped, not orphaned.
    Signal handlers belong to the main thread; elsewhere the default stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
