"""The local backend: ``plan.topology.nodes`` torch elastic agents on this host, meeting
at a c10d rendezvous on 127.0.0.1, each running ``procs_per_node`` workers.

The agents are torchrun's elastic agent, so a job that works here meets the same
rendezvous, environment and failure handling on a cluster. For the built-in trainer on
the CPU they fork their ranks warm (launcher/agent.py), and the agents of several nodes
are themselves forked warm from one process that imported what their ranks import, then
left to this one (a child subreaper) to supervise; otherwise they are plain ``torchrun``
processes. Each agent gets a session of
its own: the terminal's Ctrl-C reaches only the CLI, which then stops the agents the
one way they are meant to be stopped (SIGTERM, a grace period, SIGKILL).

A failure (an agent that exits non-zero or is killed) stops every agent; with
``train.max_restarts`` left, all of them start again as the job's next attempt, at a
rendezvous of its own, and the trainer resumes from the latest checkpoint. The whole
job restarts, not one agent (torchrun's own --max-restarts): a lost agent, or the one
that hosts the rendezvous store, cannot be restarted from the inside.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

from cluster.base import JobState
from cluster.failure import (
    Endings,
    agent_failure_report,
    out_of_restarts_line,
    rank_failure_report,
    restart_line,
)
from cluster.process import Terminated, agent_module, stop_signals, worker_pythonpath
from launcher.faults import ATTEMPT_VAR
from launcher.plan import LaunchPlan
from launcher.rundir import rank_log, rank_progress, rank_status

GRACE_S = 10
"""How long stopped agents get to stop their workers before the CLI SIGKILLs them."""
AGENT_GRACE_S = 5
"""How long an agent waits for a SIGTERMed worker before SIGKILLing it: shorter than
GRACE_S, so that an agent is not killed while it still has workers to reap."""
POLL_S = 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_command(plan: LaunchPlan, port: int, rdzv_id: str) -> list[str]:
    topo = plan.topology
    options = [
        "--nnodes", str(topo.nodes), "--nproc-per-node", str(topo.procs_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
        # join_timeout: the c10d rendezvous ignores a plain `timeout` (and waits 600 s).
        "--rdzv-id", rdzv_id, "--rdzv-conf", f"join_timeout={topo.rdzv_timeout}",
        # MASTER_ADDR would otherwise be this host's FQDN, which need not resolve.
        "--local-addr", "127.0.0.1",
        "--max-restarts", "0",
    ]
    module, worker = agent_module(plan)
    return [sys.executable, "-m", module, *options, *worker, plan.run_dir]


def _agent_env(plan: LaunchPlan, attempt: int) -> dict[str, str]:
    env = {**os.environ, **plan.env, "DLAUNCH_RUN_DIR": plan.run_dir, ATTEMPT_VAR: str(attempt),
           # An env var rather than --shutdown-timeout, which older torch lacks.
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(AGENT_GRACE_S)}
    pythonpath = worker_pythonpath()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def _start_agents(plan: LaunchPlan, attempt: int) -> list[Agent]:
    """The agents of one attempt, at a rendezvous of their own."""
    # A resumed run reuses its run dir, a restart its attempt's: their ranks' statuses
    # and positions are not this attempt's.
    for rank in range(plan.topology.world_size):
        rank_status(plan.run_dir, rank).unlink(missing_ok=True)
        rank_progress(plan.run_dir, rank).unlink(missing_ok=True)
    command = _agent_command(plan, _free_port(), f"{plan.name}-{uuid.uuid4().hex[:8]}")
    env = _agent_env(plan, attempt)
    nodes = plan.topology.nodes
    if nodes > 1 and agent_module(plan)[0] == "launcher.agent" and _become_subreaper():
        return _forked_agents(command, env, nodes)
    return [subprocess.Popen(command, env=env, start_new_session=True) for _ in range(nodes)]


def _become_subreaper() -> bool:
    """Make this process the one that orphaned descendants are reparented to (Linux's
    PR_SET_CHILD_SUBREAPER), so that agents forked by a child become its own; whether it is."""
    if not sys.platform.startswith("linux"):
        return False
    pr_set_child_subreaper = 36
    return ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0


def _forked_agents(command: list[str], env: dict[str, str], nodes: int) -> list[Agent]:
    """The ``nodes`` agents of ``command``, forked warm by one launcher.agent (its
    --fork-nodes) and left to this process; that one alone when it fails to fork them all,
    whose exit is then reported as an agent's."""
    read_end, write_end = os.pipe()
    python, m, module, *options = command
    fork_command = [python, m, module, "--fork-nodes", str(nodes), str(write_end), *options]
    try:
        host = subprocess.Popen(fork_command, env=env, start_new_session=True, pass_fds=(write_end,))
    finally:
        os.close(write_end)
    forked: list[AdoptedAgent] = []
    try:
        with os.fdopen(read_end) as pids:
            for line in pids:  # until the host and its agents have closed it
                forked.append(AdoptedAgent(int(line)))
        # Once the host has exited, its agents are this process' children.
        if host.wait() == 0 and len(forked) == nodes:
            return forked
    except BaseException:  # a Ctrl-C while the host imports: no agent may outlive this process
        _signal_group(host, signal.SIGKILL)
        _kill_forked(host, forked)
        raise
    _kill_forked(host, forked)
    return [host]


def _kill_forked(host: subprocess.Popen, forked: list[AdoptedAgent]) -> None:
    host.wait()  # once it has exited, its agents are this process' children
    for agent in forked:
        _signal_group(agent, signal.SIGKILL)
        agent.wait()


class AdoptedAgent:
    """An agent this process adopted as a subreaper: Popen's poll, wait, pid and returncode."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._reaping = threading.Lock()  # poll() and wait() come from two threads (cancel)

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self) -> int:
        return self._reap(0)

    def _reap(self, options: int) -> int | None:
        with self._reaping:
            if self.returncode is None:
                pid, status = os.waitpid(self.pid, options)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode


Agent = subprocess.Popen | AdoptedAgent


class LocalJob:
    def __init__(self, plan: LaunchPlan) -> None:
        self.plan = plan
        self.run_dir = plan.run_dir
        self.attempt = 0
        self._agents = _start_agents(plan, self.attempt)
        self.job_id = f"local-{self._agents[0].pid}"
        self._cancelled = False
        self._signals: list[int] = []  # SIGINT / SIGTERM / SIGHUP as they came, while wait() runs
        # cancel() and wait() may stop (and wait() restart) the agents from two threads.
        self._stopping = threading.Lock()

    def status(self) -> JobState:
        if self._cancelled:
            return "CANCELLED"
        codes = [agent.poll() for agent in self._agents]
        if None in codes:
            return "RUNNING"
        return "FAILED" if any(codes) else "COMPLETED"

    def logs(self, rank: int = 0) -> str:
        path = rank_log(self.run_dir, rank)
        return path.read_text(errors="replace") if path.exists() else ""

    def cancel(self) -> None:
        self._cancelled = True
        self._stop()

    def wait(self) -> int:
        """Supervise attempts until one succeeds, the job is stopped, or a failure finds
        no restart left; each failure is reported as it happens."""
        max_restarts = self.plan.recipe.train.max_restarts
        with self._noting_stop_signals():
            return self._supervise(max_restarts)

    def _supervise(self, max_restarts: int) -> int:
        try:
            while (failure := self._wait_attempt()) is not None and not self._cancelled:
                report, final = failure
                print(report, file=sys.stderr)
                if final:  # a stop policy, or nothing to resume: another attempt would stop again
                    return 1
                if self.attempt == max_restarts:
                    if max_restarts:
                        print(out_of_restarts_line(max_restarts), file=sys.stderr)
                    return 1
                self._restart(max_restarts)
        except KeyboardInterrupt:
            self._stop()
            return 128 + signal.SIGINT
        except Terminated as stopped:
            self._stop()
            return 128 + stopped.signum
        return 128 + signal.SIGTERM if self._cancelled else 0

    @contextlib.contextmanager
    def _noting_stop_signals(self) -> Iterator[None]:
        """SIGINT, SIGTERM and SIGHUP are noted, then acted on between two polls of the agents.
        Raised where they land, they could land inside Popen's bookkeeping and leave its
        wait lock taken, and the stop that follows would then wait for that agent forever.
        Handlers belong to the main thread; elsewhere (cancel()) the defaults stay."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, lambda signum, frame: self._signals.append(signum))
                    for sig in (signal.SIGINT, *stop_signals())}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _act_on_signals(self) -> None:
        if self._signals:
            raise KeyboardInterrupt if self._signals[0] == signal.SIGINT else Terminated(self._signals[0])

    def _wait_attempt(self) -> tuple[str, bool] | None:
        """Block until this attempt's agents have all exited 0 (None), or until one
        failed: then stop the others and return the report that names the cause, and
        whether the failure is final (a rank `stopped`: no restart would help)."""
        endings = Endings(self.run_dir, self.plan.topology.world_size)
        failed = self._first_failed_agent(endings)
        if failed is None:
            return None
        # A failed node's peers would otherwise wait out a rendezvous or collective
        # timeout. After cancel() this waits for that stop to finish.
        self._stop()
        endings.poll()
        return self._failure_report(endings, failed)

    def _first_failed_agent(self, endings: Endings) -> int | None:
        """The index of the first agent to exit non-zero; None once all exited with 0.
        Of agents seen ending together, one killed by a signal (a negative code) goes
        first: the others failed because its ranks died."""
        while True:
            self._act_on_signals()
            codes = [agent.poll() for agent in self._agents]
            endings.poll()  # after the agents: every rank end that made one exit is seen
            failed = [i for i, code in enumerate(codes) if code]
            if failed:
                return min(failed, key=lambda i: codes[i] > 0)
            if None not in codes:
                return None
            time.sleep(POLL_S)

    def _failure_report(self, endings: Endings, agent: int) -> tuple[str, bool]:
        code, pid = self._agents[agent].returncode, self._agents[agent].pid
        first = endings.first_failure()
        if code < 0:  # the agent itself was killed, and its workers with it: they ended first
            return agent_failure_report(self.run_dir, self.plan.topology, pid, -code,
                                        None if first is None else first.rank), False
        if first is not None:
            return (rank_failure_report(self.run_dir, self.plan.topology, first.rank, first.status),
                    first.status.startswith("stopped"))
        return (f"error: node agent {agent} exited with code {code} and no rank reported a "
                "failure; see the agent's output above"), False

    def _restart(self, max_restarts: int) -> None:
        """Start the next attempt's agents, unless cancel() stops the job meanwhile."""
        with self._stopping:
            if self._cancelled:
                return
            self.attempt += 1
            print(restart_line(self.run_dir, self.attempt, max_restarts), file=sys.stderr)
            self._agents = _start_agents(self.plan, self.attempt)

    def _stop(self) -> None:
        """SIGTERM every live agent's process group; SIGKILL what is left after GRACE_S,
        or at once on a second Ctrl-C.

        An agent passes SIGTERM on to its workers and SIGKILLs those still alive after
        AGENT_GRACE_S; a worker whose agent is SIGKILLed dies with it (launcher/worker.py).
        """
        with self._stopping:
            live = [agent for agent in self._agents if agent.poll() is None]
            for agent in live:
                _signal_group(agent, signal.SIGTERM)
            deadline, signals = time.monotonic() + GRACE_S, len(self._signals)
            while (any(agent.poll() is None for agent in live) and time.monotonic() < deadline
                   and len(self._signals) == signals):  # a signal during the stop: no more grace
                time.sleep(POLL_S)
            for agent in live:
                if agent.poll() is None:
                    _signal_group(agent, signal.SIGKILL)
                    agent.wait()


def _signal_group(agent: Agent, sig: signal.Signals) -> None:
    try:
        os.killpg(agent.pid, sig)  # the agent leads a group of its own: start_new_session
    except ProcessLookupError:
        pass


class LocalBackend:
    def submit(self, plan: LaunchPlan) -> LocalJob:
        return LocalJob(plan)
