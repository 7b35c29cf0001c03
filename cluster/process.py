"""What every backend's launching process needs: workers that import this launcher, and
a SIGTERM that stops a job instead of orphaning it."""

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
