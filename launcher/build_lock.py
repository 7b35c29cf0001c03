"""torch's lock on a C++ extension build, as DeepSpeed builds its JIT ops (CPU Adam for
ZeRO's offload, its fused kernels on a GPU) the first time a machine loads them.

The lock is a file, `lock` in the op's build folder, that the building process creates
and removes when the build ends; every other process that loads the op meanwhile waits
for it to go (torch.utils.file_baton). Nothing else marks it: a process that exits
mid-build leaves it behind, and every later load of the op waits forever. A rank stopped
by a signal exits at once (launcher/worker.py), so the stop first ends its build and
removes its lock (`release_held`); for a lock left some other way (a SIGKILL, a process
outside dlaunch), the hang watchdog names the lock a rank waits for and who holds it
(`awaited`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import NamedTuple

LOCK = "lock"
"""The name torch gives the lock file in each build folder (torch.utils.cpp_extension)."""
BUILD_STOP_S = 3.0
"""How long a stopped rank waits for its build (ninja, which stops its compilers and
removes their half-written outputs) to end before it removes the lock; shorter than the
agent's grace before it SIGKILLs the rank (cluster/local.py AGENT_GRACE_S)."""


def _extensions_root() -> Path | None:
    """Where torch builds extensions; None if this process never imported the builder,
    and so holds no lock of it."""
    cpp_extension = sys.modules.get("torch.utils.cpp_extension")
    if cpp_extension is None:
        return None
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())


def _open_files(pid: int | str) -> list[Path]:
    """The files process ``pid`` has open (those of another user's process: none)."""
    folder = Path(f"/proc/{pid}/fd")
    try:
        fds = list(folder.iterdir())
    except OSError:  # it ended, or is not ours to look at
        return []
    files = []
    for fd in fds:
        try:
            files.append(Path(os.readlink(fd)))
        except OSError:  # closed meanwhile
            pass
    return files


def _held_here() -> list[Path]:
    """The build locks this process holds: torch keeps each one open while it builds."""
    root = _extensions_root()
    if root is None:
        return []
    root = root.resolve()
    return [path for path in _open_files("self") if path.name == LOCK and path.is_relative_to(root)]


def _children() -> list[int]:
    """This process's children, from each process's parent in /proc (the kernel's own
    list of children is a build option)."""
    me, pids = os.getpid(), []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                pids.append(int(proc.name))
        except OSError:  # ended meanwhile
            pass
    return pids


def release_held() -> None:
    """Called as a stopped rank exits: if it is building an extension, stop the build
    (ninja, this process's child) and, once it has ended, remove the lock. A build still
    running after BUILD_STOP_S keeps its lock: a second build in the same folder at the
    same time could leave a broken library."""
    locks = _held_here()
    if not locks:
        return
    children = _children()
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + BUILD_STOP_S
    while any(_alive_child(pid) for pid in children):
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    for lock in locks:
        lock.unlink(missing_ok=True)


def _alive_child(pid: int) -> bool:
    """Reaps ``pid`` if it has ended (this process is its parent)."""
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # reaped already, by the wait of whoever started it
        return False


class AwaitedLock(NamedTuple):
    path: Path
    holders: list[int]
    """The processes on this host that hold it open: none means a stopped build left it,
    unless a process on another host builds in a shared folder."""

    def describe(self) -> str:
        if self.holders:
            pids = ", ".join(str(pid) for pid in self.holders)
            return f"waits for a C++ extension build to release {self.path} (pid {pids} holds it)"
        return (f"waits for the lock {self.path} of a C++ extension build that no process on "
                "this host holds: a build stopped midway left it; delete it, unless a process on "
                "another host builds in that folder")


def awaited(frame: FrameType | None) -> AwaitedLock | None:
    """The build lock the thread at ``frame`` waits for, if it is waiting for one."""
    from torch.utils.file_baton import FileBaton

    while frame is not None:
        baton = frame.f_locals.get("self") if frame.f_code.co_name == "wait" else None
        if isinstance(baton, FileBaton):
            path = Path(baton.lock_file_path).resolve()
            holders = [int(pid.name) for pid in Path("/proc").iterdir()
                       if pid.name.isdigit() and path in _open_files(pid.name)]
            return AwaitedLock(path, holders)
        frame = frame.f_back
    return None
