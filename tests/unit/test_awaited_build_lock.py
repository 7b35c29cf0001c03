"""Which build lock a thread waits for, and who holds it (launcher/build_lock.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from torch.utils.file_baton import FileBaton

from launcher.build_lock import AwaitedLock, awaited

HOLDER = """
import sys, time
from torch.utils.file_baton import FileBaton
assert FileBaton(sys.argv[1]).try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def _waiting_thread(lock: Path) -> threading.Thread:
    thread = threading.Thread(target=FileBaton(str(lock), wait_seconds=0.01).wait, daemon=True)
    thread.start()
    while not any(frame.f_code.co_name == "wait" for frame in _stack(thread)):
        time.sleep(0.01)
    return thread


def _stack(thread: threading.Thread):
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        yield frame
        frame = frame.f_back


def test_a_lock_a_live_build_holds_names_its_process(tmp_path):
    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        thread = _waiting_thread(lock)
        found = awaited(sys._current_frames()[thread.ident])
        assert found == AwaitedLock(lock, [holder.pid])
        assert found.describe() == f"waits for a C++ extension build to release {lock} (pid {holder.pid} holds it)"
    finally:
        holder.kill()
        holder.wait()
    lock.unlink()
    thread.join(5)
    assert not thread.is_alive()


def test_a_lock_nobody_holds_is_said_to_be_left_behind(tmp_path):
    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    lock.touch()
    thread = _waiting_thread(lock)
    assert awaited(sys._current_frames()[thread.ident]) == AwaitedLock(lock, [])
    lock.unlink()
    thread.join(5)


def test_a_thread_that_waits_for_no_lock_gets_none():
    assert awaited(sys._current_frames()[threading.get_ident()]) is None
