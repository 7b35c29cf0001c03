"""What every backend's launching process needs: the node agent's command, workers that
import this launcher, and a SIGTERM or SIGHUP that stops a job instead of orphaning it."""

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
    """The launching process itself got SIGTERM, or SIGHUP (its terminal went away)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_signals() -> list[signal.Signals]:
    """The signals that stop a job as Ctrl-C does: SIGTERM, and SIGHUP (a closed SSH
    session), as torchrun's agent takes both; not SIGHUP under `nohup`, which ignores it."""
    hangup = [] if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else [signal.SIGHUP]
    return [signal.SIGTERM, *hangup]


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP interrupt a wait as Ctrl-C does (raising Terminated), so the
    job is stopped, not orphaned. Signal handlers belong to the main thread; elsewhere
    the defaults stay."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, raise_terminated) for sig in stop_signals()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
