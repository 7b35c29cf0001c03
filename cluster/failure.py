"""Which rank failed first, and the report that names it.

Each rank keeps a status file (running | done | failed: why | terminated: signal) and
holds a lock while it lives (launcher/worker.py). A rank's peers fail too once it dies
(their collectives break), so "the first `failed` status" would often blame a
survivor: the order in which ranks were *seen* to end decides instead.
"""

from __future__ import annotations

import fcntl
from typing import NamedTuple

from launcher.plan import Topology
from launcher.rundir import rank_host, rank_lock, rank_log, rank_status

LOG_TAIL = 20
KILLED = "killed"
"""What a rank's end is called when it died still `running`: it had no chance to say."""


def _read_status(run_dir: str, rank: int) -> str | None:
    try:
        return rank_status(run_dir, rank).read_text().strip()
    except FileNotFoundError:
        return None


def _alive(run_dir: str, rank: int) -> bool:
    """Whether the rank's process still holds its life lock (launcher/worker.py)."""
    with open(rank_lock(run_dir, rank), "rb") as lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        return False  # closing the file drops the lock just taken


# Among ranks seen ending in the same poll: a hard death causes failures in its peers'
# collectives, never the other way round; a signal we sent comes after both.
_PRIORITY = {KILLED: 0, "failed": 1, "terminated": 2, "preempted": 2, "done": 3}


class _End(NamedTuple):
    """A rank's end; the earliest sorts first."""
    poll: int
    priority: int
    mtime_ns: int
    rank: int
    status: str


class Endings:
    """The order in which ranks ended, seen by polling status files and life locks.

    Each poll reads the status files before it probes any lock. A rank that dies still
    `running` (SIGKILL, the OOM killer, a native crash) takes its peers down only once
    it is dead, so it is seen dead no later than they are seen failing.
    """

    def __init__(self, run_dir: str, world_size: int) -> None:
        self.run_dir = run_dir
        self.world_size = world_size
        self.polls = 0
        self.ended: dict[int, _End] = {}

    def poll(self) -> None:
        self.polls += 1
        pending = [r for r in range(self.world_size) if r not in self.ended]
        states = {rank: _read_status(self.run_dir, rank) for rank in pending}
        for rank, state in states.items():
            if state == "running" and not _alive(self.run_dir, rank):
                state = _read_status(self.run_dir, rank)  # it may have ended properly since
                if state == "running":
                    state = KILLED
            if state in (None, "running"):
                continue
            mtime = rank_status(self.run_dir, rank).stat().st_mtime_ns
            self.ended[rank] = _End(self.polls, _PRIORITY[state.split(":")[0]], mtime, rank, state)

    def first_failure(self) -> _End | None:
        failures = [end for end in self.ended.values() if end.status != "done"]
        return min(failures, default=None)


def rank_failure_report(run_dir: str, topology: Topology, rank: int, status: str) -> str:
    """`error: rank R (node K, local rank L) failed: why`, then the end of its log."""
    node, local = divmod(rank, topology.procs_per_node)
    why = status.removeprefix("failed: ")
    if status == KILLED:
        why = "killed before it could say why (SIGKILL, the OOM killer or a native crash)"
    host = rank_host(run_dir, rank)
    on = f" on {host.read_text().strip()}" if host.exists() else ""
    lines = [f"error: rank {rank} (node {node}{on}, local rank {local}) failed: {why}"]
    log = rank_log(run_dir, rank)
    if log.exists():
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        lines += [f"last lines of {log}:", *(f"  {line}" for line in tail)]
    return "\n".join(lines)


def first_failure(run_dir: str, world_size: int) -> tuple[int, str] | None:
    """(rank, status) of the failure to report once a job has ended, or None."""
    endings = Endings(run_dir, world_size)
    endings.poll()
    end = endings.first_failure()
    return None if end is None else (end.rank, end.status)
