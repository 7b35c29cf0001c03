"""The local backend: ``plan.topology.nodes`` torch elastic agents on this host, meeting
at a c10d rendezvous on 127.0.0.1, each running ``procs_per_node`` workers.

The agents are real ``torchrun`` processes, so a job that works here meets the same
rendezvous, environment and failure handling on a cluster. Each agent gets a session of
its own: the terminal's Ctrl-C reaches only the CLI, which then stops the agents the
one way they are meant to be stopped (SIGTERM, a grace period, SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

from cluster.base import JobState
from cluster.failure import Endings, rank_failure_report
from cluster.process import Terminated, sigterm_raises, worker_pythonpath
from launcher.plan import LaunchPlan
from launcher.rundir import rank_log, rank_status

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
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(topo.nodes), "--nproc-per-node", str(topo.procs_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
        # join_timeout: the c10d rendezvous ignores a plain `timeout` (and waits 600 s).
        "--rdzv-id", rdzv_id, "--rdzv-conf", f"join_timeout={topo.rdzv_timeout}",
        # MASTER_ADDR would otherwise be this host's FQDN, which need not resolve.
        "--local-addr", "127.0.0.1",
        "--max-restarts", "0",
        "-m", "launcher.worker", plan.run_dir,
    ]


def _agent_env(plan: LaunchPlan) -> dict[str, str]:
    env = {**os.environ, **plan.env, "DLAUNCH_RUN_DIR": plan.run_dir,
           # An env var rather than --shutdown-timeout, which older torch lacks.
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(AGENT_GRACE_S)}
    pythonpath = worker_pythonpath()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


class LocalJob:
    def __init__(self, plan: LaunchPlan, agents: list[subprocess.Popen]) -> None:
        self.plan = plan
        self.run_dir = plan.run_dir
        self.job_id = f"local-{agents[0].pid}"
        self._agents = agents
        self._cancelled = False
        self._stopping = threading.Lock()  # cancel() and wait() may stop from two threads

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
        endings = Endings(self.run_dir, self.plan.topology.world_size)
        try:
            with sigterm_raises():
                failed = self._first_failed_agent(endings)
        except KeyboardInterrupt:
            self._stop()
            return 128 + signal.SIGINT
        except Terminated:
            self._stop()
            return 128 + signal.SIGTERM
        if failed is None:
            return 0
        # A failed node's peers would otherwise wait out a rendezvous or collective
        # timeout. After cancel() this waits for that stop to finish.
        self._stop()
        if self._cancelled:
            return 128 + signal.SIGTERM
        endings.poll()
        print(self._failure_report(endings, failed), file=sys.stderr)
        return 1

    def _first_failed_agent(self, endings: Endings) -> int | None:
        """The index of the first agent to exit non-zero; None once all exited with 0."""
        while True:
            codes = [agent.poll() for agent in self._agents]
            endings.poll()  # after the agents: every rank end that made one exit is seen
            for i, code in enumerate(codes):
                if code:
                    return i
            if None not in codes:
                return None
            time.sleep(POLL_S)

    def _failure_report(self, endings: Endings, agent: int) -> str:
        first = endings.first_failure()
        if first is not None:
            return rank_failure_report(self.run_dir, self.plan.topology, first.rank, first.status)
        code = self._agents[agent].returncode
        return (f"error: node agent {agent} exited with code {code} and no rank reported a "
                "failure; see the agent's output above")

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
            deadline = time.monotonic() + GRACE_S
            try:
                for agent in live:
                    agent.wait(max(0.0, deadline - time.monotonic()))
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                pass
            for agent in live:
                if agent.poll() is None:
                    _signal_group(agent, signal.SIGKILL)
                    agent.wait()


def _signal_group(agent: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(agent.pid, sig)  # the agent leads a group of its own: start_new_session
    except ProcessLookupError:
        pass


class LocalBackend:
    def submit(self, plan: LaunchPlan) -> LocalJob:
        # A resumed run reuses its run dir: the last attempt's statuses are not this one's.
        for rank in range(plan.topology.world_size):
            rank_status(plan.run_dir, rank).unlink(missing_ok=True)
        command = _agent_command(plan, _free_port(), f"{plan.name}-{uuid.uuid4().hex[:8]}")
        env = _agent_env(plan)
        agents = [subprocess.Popen(command, env=env, start_new_session=True)
                  for _ in range(plan.topology.nodes)]
        return LocalJob(plan, agents)
