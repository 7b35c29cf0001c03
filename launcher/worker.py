"""What every rank runs: ``python -m launcher.worker RUN_DIR``, started by a torch elastic
agent on every backend (or ``main`` itself, in a rank that launcher/agent.py forks).

It gives the rank its log and status files, then runs the user's script exactly as
torchrun would, or the built-in trainer. The status file is how a launcher learns, after
the fact, which rank failed and why (format in launcher/rundir.py).
"""

from __future__ import annotations

import ctypes
import faulthandler
import fcntl
import logging
import os
import runpy
import signal
import socket
import sys
import traceback
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, NoReturn

from launcher import build_lock, preemption
from launcher.errors import FinalFailure
from launcher.plan import LaunchPlan, ScriptPlan
from launcher.rundir import PLAN, rank_host, rank_lock, rank_log, rank_status, write_atomic

log = logging.getLogger("launcher")

# Signals a launcher stops a job with. torch elastic forwards the one its agent got.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_LAUNCHER_FILES = {__file__, runpy.__file__, "<frozen runpy>"}


def write_status(run_dir: Path, rank: int, state: str) -> None:
    # Not durable: a launcher reads a status while the machine is up, and the stop
    # handler writes one within the agent's grace before SIGKILL (cluster/local.py),
    # which an fsync queued behind a busy disk (a checkpoint being written) could outlast.
    write_atomic(rank_status(run_dir, rank), state + "\n", durable=False)


def _describe(exc: BaseException) -> str:
    """`ExcType: first line of the message`: the status is one line; the log has the rest."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__


def _die_with_agent() -> None:
    """Have the kernel SIGKILL this rank when its agent dies.

    torch elastic starts each worker in a session of its own, so a signal to the agent's
    process group never reaches it; without this, an agent killed hard leaves its
    workers running, holding ports and cores.
    """
    if not sys.platform.startswith("linux"):
        return
    agent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != agent:  # the agent died before the request took effect
        os._exit(128 + signal.SIGKILL)


def _log_to_file(run_dir: Path, rank: int) -> None:
    """Every rank logs to logs/rank-N.log: `logging` records and fatal-signal tracebacks
    (faulthandler). Ranks other than 0 send stdout and stderr there too, at the
    file-descriptor level so that C++ output (a gloo or NCCL abort) lands in the file;
    rank 0 keeps the terminal for its progress bar."""
    path = rank_log(run_dir, rank)
    if rank != 0:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s rank {rank} %(name)s %(levelname)s: %(message)s"))
    # Our INFO, everyone's WARNING: libraries' INFO chatter (DeepSpeed's op builds log
    # compiler command lines) would crowd out the lines a failure report shows.
    logging.getLogger().addHandler(handler)
    log.setLevel(logging.INFO)
    faulthandler.enable(open(path, "a"))  # noqa: SIM115 (it keeps the file open)


def _hold_life_lock(run_dir: Path, rank: int) -> IO[str]:
    """Lock logs/rank-N.lock until this process ends; the returned file must stay open.

    A POSIX lock, not flock(): forked children (DataLoader workers) do not inherit it,
    so it goes the instant this process dies, however it dies.
    """
    lock = open(rank_lock(run_dir, rank), "w")  # noqa: SIM115
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(f"another process already runs rank {rank} of {run_dir}") from None
    except OSError as exc:  # a file system without POSIX locks (Lustre without -o flock)
        log.warning("cannot lock %s (%s); a launcher cannot watch this rank", lock.name, exc)
    return lock


def _stop_on_signal(run_dir: Path, rank: int) -> None:
    def stop(signum: int, frame: FrameType | None) -> None:
        # One stop: the signal comes twice as a rule (to the agent's process group, then
        # from the agent), and a second run of this handler inside the first would log
        # to the handlers the first has closed.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        try:
            build_lock.release_held()  # else every later load of the op would wait for it
        except Exception:  # the exit below must come, whatever befell the lock
            log.warning("could not release a build lock", exc_info=True)
        write_status(run_dir, rank, f"terminated: {signal.Signals(signum).name}")
        log.warning("stopped by %s", signal.Signals(signum).name)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # Exit now rather than raise into the training code, where an `except
        # BaseException` or a teardown collective could keep the rank alive.
        os._exit(128 + signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)


def run_script(script: ScriptPlan) -> None:
    """Run ``script`` as ``__main__`` the way ``python script.py args`` (and so torchrun)
    does: argv from the plan, the script's directory first on sys.path."""
    path = os.path.abspath(script.path)
    sys.argv = [script.path, *script.args]
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


def _run(plan: LaunchPlan) -> None:
    if plan.script is not None:
        run_script(plan.script)
    else:
        from launcher.trainer import run_training
        run_training(plan)


def _user_traceback(exc: BaseException) -> TracebackType | None:
    """The traceback from the first frame outside this module and runpy, as `python
    script.py` would print it: the log tail in a failure report is the user's code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in _LAUNCHER_FILES:
        tb = tb.tb_next
    return tb or exc.__traceback__


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, SystemExit) and isinstance(exc.code, int):
        return exc.code
    return 1


def main(run_dir: Path, *, forked: bool = False) -> int:
    """Run this rank; its exit code. ``forked``: the rank is a child forked by
    launcher/agent.py, which ends it without the interpreter's exit once this returns."""
    # torchrun calls the node GROUP_RANK; its static rendezvous and Slurm also export
    # NODE_RANK, the c10d rendezvous does not. The rendezvous' answer is the one to trust.
    os.environ["NODE_RANK"] = os.environ["GROUP_RANK"]
    rank = int(os.environ["RANK"])
    _die_with_agent()
    _log_to_file(run_dir, rank)
    _life_lock = _hold_life_lock(run_dir, rank)  # held until main returns, status final
    _stop_on_signal(run_dir, rank)
    preemption.install()  # after the stop handlers: the preemption signal only asks for a checkpoint
    write_status(run_dir, rank, "running")
    write_atomic(rank_host(run_dir, rank), os.environ.get("SLURMD_NODENAME", socket.gethostname()) + "\n",
                 durable=False)
    log.info("rank %d of %s on node %s, pid %d", rank, os.environ["WORLD_SIZE"],
             os.environ["NODE_RANK"], os.getpid())
    plan = None
    try:
        plan = LaunchPlan.from_json((run_dir / PLAN).read_text())
        _run(plan)
    except preemption.Preempted as exc:
        write_status(run_dir, rank, f"preempted: {exc}")
        code = 0 if rank != 0 or preemption.requeue() else 1
    except BaseException as exc:
        exc_info = (type(exc), exc, _user_traceback(exc))
        log.error("rank %d failed", rank, exc_info=exc_info)  # into the rank's log
        if rank == 0:
            traceback.print_exception(*exc_info)  # and onto the terminal rank 0 kept
        write_status(run_dir, rank, f"{'stopped' if isinstance(exc, FinalFailure) else 'failed'}: {_describe(exc)}")
        code = _exit_code(exc)
    else:
        write_status(run_dir, rank, "done")
        code = 0
    _exit_on_stop_signals(code)
    if forked and preemption.ending:
        # A SIGTERM the preemption handler took during the run (it checkpointed) reached
        # the agent too, which is shutting down: it waits for its ranks to exit (SIGKILL
        # after 30 s), not for their results.
        _exit_without_teardown(128 + signal.SIGTERM)
    if plan is not None and plan.script is None and not forked:
        _exit_without_teardown(code)
    return code


def _exit_on_stop_signals(code: int) -> None:
    """From here on, a stop signal ends the rank with ``code``, its status left as final.

    A forked rank outlives this function: it waits for its agent to collect its result,
    and an agent stopped meanwhile SIGTERMs it. Under Slurm that is the rule, not a race:
    rank 0's `scontrol requeue` after a preemption checkpoint has Slurm SIGTERM every
    process of the job. The preemption handler would only have set its flag, leaving the
    rank (and its agent, waiting for it) alive until Slurm's SIGKILL, KillWait seconds
    (30 by default) later, which delayed every requeue by as much."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: _exit_without_teardown(code))


def _exit_without_teardown(code: int) -> NoReturn:
    """End a rank of the built-in trainer at once. The interpreter's own teardown of
    torch, DeepSpeed and all they import takes one to two seconds a rank and does nothing
    a finished rank needs: the trainer closed and flushed what it wrote. A user's script
    keeps the usual exit, for its atexit handlers."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
