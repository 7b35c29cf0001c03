"""Which rank failed first, and the report that names it; between two attempts of a job
that restarts, the line that says so.

Each rank keeps a status file (running | done | failed: why | stopped: why | terminated:
signal | preempted: why) and holds a lock while it lives (launcher/worker.py). A rank's
peers fail too once it dies (their collectives break), so "the first `failed` status"
would often blame a survivor: the order in which ranks were *seen* to end decides instead.

`python -m cluster.failure RUN_DIR RESTART MAX_RESTARTS` prints the report of the
attempt that just ended and the restart line: the Slurm batch script runs it between
attempts, so that the job's output says why each one ended.
"""

from __future__ import annotations

import fcntl
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import NamedTuple

from launcher.plan import LaunchPlan, Topology
from launcher.progress import read_position
from launcher.rundir import CHECKPOINTS, PLAN, rank_host, rank_lock, rank_log, rank_status

LOG_TAIL = 20
KILLED = "killed"
"""What a rank's end is called when it died still `running`: it had no chance to say."""
FULL_BELOW_BYTES = 1 << 20
"""Less room than this, and a file system is full for a rank's writes (a status line, a
log record, a checkpoint's smallest file)."""


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


def running_ranks(run_dir: str, world_size: int) -> list[int]:
    """The ranks of the run in ``run_dir`` whose processes are alive now, wherever they
    run: each holds its life lock until it ends."""
    return [rank for rank in range(world_size) if rank_lock(run_dir, rank).exists() and _alive(run_dir, rank)]


# Among ranks seen ending in the same poll: a hard death causes failures in its peers'
# collectives, never the other way round; a signal we sent comes after both.
_PRIORITY = {KILLED: 0, "failed": 1, "stopped": 1, "terminated": 2, "preempted": 2, "done": 3}


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


def _on_host(run_dir: str, rank: int) -> str:
    """` on HOST`; empty before the rank wrote its host file."""
    host = rank_host(run_dir, rank)
    return f" on {host.read_text().strip()}" if host.exists() else ""


def _at_step(run_dir: str, rank: int) -> str:
    """` at step S (phase)` from the rank's progress file; empty for a script, or a rank
    that died before its first step."""
    position = read_position(run_dir, rank)
    return "" if position is None else f" at step {position.step} ({position.phase})"


def _log_tail(run_dir: str, rank: int) -> list[str]:
    log = rank_log(run_dir, rank)
    if not log.exists():
        return []
    tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
    return [f"last lines of {log}:", *(f"  {line}" for line in tail)]


def _full_disk(run_dir: str) -> str | None:
    """Why a rank that ended without a word most likely did, when its run directory's
    file system is full: a write failed there (a checkpoint, a log), and then so did the
    status and log lines that would have said so."""
    from launcher.folds import fold_number

    free = shutil.disk_usage(run_dir).free
    if free >= FULL_BELOW_BYTES:
        return None
    # A fold is resumed with the folds after it, and their summary: through its folds directory.
    resume_dir = str(Path(run_dir).parent) if fold_number(run_dir) is not None else run_dir
    return (f"it ended without a word, and the file system of {run_dir} is full ({free:,} bytes free): "
            f"most likely it failed writing there; free space, and `dlaunch run --resume "
            f"{shlex.quote(resume_dir)}` continues from {resume_point(run_dir)}")


def rank_failure_report(run_dir: str, topology: Topology, rank: int, status: str) -> str:
    """`error: rank R (node K on HOST, local rank L) failed at step S (phase): why`, then
    the end of its log."""
    node, local = divmod(rank, topology.procs_per_node)
    # A stop (launcher.errors.FinalFailure) is said as such: no restart follows it.
    ended = "stopped" if status.startswith("stopped: ") else "failed"
    why = status.removeprefix(f"{ended}: ")
    if status == KILLED:
        why = _full_disk(run_dir) or "killed before it could say why (SIGKILL, the OOM killer or a native crash)"
    where = f"node {node}{_on_host(run_dir, rank)}, local rank {local}"
    return "\n".join([f"error: rank {rank} ({where}) {ended}{_at_step(run_dir, rank)}: {why}",
                      *_log_tail(run_dir, rank)])


def agent_failure_report(run_dir: str, topology: Topology, pid: int, signum: int, rank: int | None) -> str:
    """`error: the agent of node K on HOST (pid P) was killed by SIG; rank(s) ... died
    with it at step S (phase)`, then the end of the rank's log: a lost node, as the local
    backend sees one. ``rank`` is the first of its ranks seen dead, which names the node
    (the rendezvous, not the launch order, numbers the agents); None when none had started."""
    killed = f"was killed by {signal.Signals(signum).name}"
    if rank is None:
        return f"error: a node agent (pid {pid}) {killed} before its ranks started"
    node = rank // topology.procs_per_node
    ranks = range(node * topology.procs_per_node, (node + 1) * topology.procs_per_node)
    died = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    return "\n".join([f"error: the agent of node {node}{_on_host(run_dir, rank)} (pid {pid}) {killed}; "
                      f"{died} died with it{_at_step(run_dir, rank)}",
                      *_log_tail(run_dir, rank)])


def resume_point(run_dir: str) -> str:
    """Where the trainer's resume will pick up: launcher/checkpoint.py's `latest`
    pointer, read here without importing torch."""
    pointer = Path(run_dir) / CHECKPOINTS / "latest"
    return f"checkpoint {pointer.read_text().strip()}" if pointer.exists() else "the first step (no checkpoint yet)"


def restart_line(run_dir: str, restart: int, max_restarts: int) -> str:
    """`dlaunch: restarting (K of N) from checkpoint step-…`."""
    return f"dlaunch: restarting ({restart} of {max_restarts}) from {resume_point(run_dir)}"


def stopped_line(code: int, resume_dir: str, continues: str) -> str:
    """The last line of a run that ended with ``code`` 130 (Ctrl-C), 143 (SIGTERM, or
    `dlaunch cancel` on Ray) or 129 (SIGHUP): the command that continues it, and how
    (``continues``: "from checkpoint step-…", or for the folds of `--folds`, which)."""
    how = "interrupted" if code == 128 + signal.SIGINT else "stopped"
    return f"dlaunch: {how}; `dlaunch run --resume {shlex.quote(resume_dir)}` continues it {continues}"


def out_of_restarts_line(max_restarts: int) -> str:
    return f"dlaunch: no restarts left (train.max_restarts: {max_restarts}); the run failed"


def first_failure(run_dir: str, world_size: int) -> tuple[int, str] | None:
    """(rank, status) of the failure to report once a job has ended, or None."""
    endings = Endings(run_dir, world_size)
    endings.poll()
    end = endings.first_failure()
    return None if end is None else (end.rank, end.status)


def main(argv: list[str]) -> int:
    """Between two attempts of a Slurm job: the report of the attempt that ended, then
    the restart line (RESTART of MAX_RESTARTS)."""
    run_dir, restart, max_restarts = argv[0], int(argv[1]), int(argv[2])
    topology = LaunchPlan.from_json((Path(run_dir) / PLAN).read_text()).topology
    failure = first_failure(run_dir, topology.world_size)
    if failure is None:
        print("error: the agents failed before any rank reported a failure; see srun's lines above",
              file=sys.stderr)
    else:
        print(rank_failure_report(run_dir, topology, *failure), file=sys.stderr)
    print(restart_line(run_dir, restart, max_restarts), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
