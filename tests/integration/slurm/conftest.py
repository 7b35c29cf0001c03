"""A real Slurm for the tests in this folder: slurm/dev-cluster/ brings up slurmctld and
four `slurmd -N nodeK` (node1..node4) on this host, once per test session, in a
loopback-only network namespace of its own (tests/conftest.py's `loopback_namespace`).
The daemons, the jobs they start (and the Ray clusters those start), and every command the
tests run against the cluster (`SlurmCluster.run`, `.sbatch`, `.dlaunch`) are in it, so
that every server binds 127.0.0.1 alone.

Every test here is marked `slurm`. If the cluster cannot be installed or started, the
tests using it fail (with the daemons' log tails), they are never skipped: CI must not
go green on a machine where nothing ran.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Loopback, dlaunch, loopback_namespace

REPO = Path(__file__).resolve().parents[3]
SCRIPTS = REPO / "slurm" / "dev-cluster"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slurm)


@dataclass(frozen=True)
class SlurmCluster:
    env: dict[str, str]
    """os.environ without the caller's SLURM_* variables, plus up.sh's exports (SLURM_CONF)."""
    state_dir: Path
    """Everything the cluster writes: slurm.conf, log/, spool/, state/, munge/, run/."""
    loopback: Loopback
    """The network namespace the daemons, their jobs and every command of the tests run in."""

    def command(self, *argv: str) -> list[str]:
        return self.loopback.command(*argv)

    def dlaunch(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return dlaunch(*args, env=self.env, timeout=timeout, netns=self.loopback)

    def run(self, *cmd: str, timeout: float = 60, check: bool = True,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.command(*cmd), env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"{shlex.join(cmd)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str, cwd: Path, timeout: float = 60) -> str:
        """Submit; return the job id (`--wait` blocks until the job ends)."""
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, timeout=timeout).stdout
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, StartTime, NodeList, ...)."""
        line = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(field.partition("=")[::2] for field in line.split() if "=" in field)

    def wait_job(self, job_id: str, until: Callable[[dict[str, str]], bool] | Iterable[str],
                 timeout: float = 30) -> dict[str, str]:
        """Poll the job until `until(job)` holds (or its JobState is one of `until`)."""
        test = until if callable(until) else (lambda job, states=set(until): job["JobState"] in states)
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if test(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} timed out after {timeout}s: {job}")
            time.sleep(0.2)

    def log_tails(self, lines: int = 30) -> str:
        return _log_tails(self.state_dir, lines)


def _log_tails(state_dir: Path, lines: int = 30) -> str:
    logs = sorted((state_dir / "log").glob("*.log"))
    return "\n".join(f"==> {log} <==\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                     for log in logs) or f"(no logs under {state_dir / 'log'})"


def _script(name: str, *args: str, env: dict[str, str], timeout: float,
            netns: Loopback | None = None) -> subprocess.CompletedProcess:
    command = ["bash", str(SCRIPTS / name), *args]
    return subprocess.run(netns.command(*command) if netns else command, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterable[SlurmCluster]:
    with loopback_namespace() as loopback:
        yield from _cluster(loopback)


def _cluster(loopback: Loopback) -> Iterable[SlurmCluster]:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    state_dir = Path(base_env.get("DLAUNCH_SLURM_DIR", "/tmp/dlaunch-slurm"))

    install = _script("install.sh", env=base_env, timeout=900)  # apt-get: outside the namespace
    if install.returncode != 0:
        pytest.fail(f"slurm/dev-cluster/install.sh exited {install.returncode}:\n"
                    f"{install.stdout}{install.stderr}", pytrace=False)

    # The daemons run in this session's loopback-only namespace, and with them every job
    # and what the jobs start (Ray, among others). A cluster of the same state dir that an
    # earlier session (or a person) left up runs in another namespace: stop it first
    # (down.sh enters that namespace itself).
    down = _script("down.sh", env=base_env, timeout=120)
    if down.returncode != 0:
        pytest.fail(f"slurm/dev-cluster/down.sh (of a cluster from before) exited {down.returncode}:\n"
                    f"{down.stderr}", pytrace=False)
    up = _script("up.sh", env=base_env, timeout=120, netns=loopback)
    if up.returncode != 0:
        down = _script("down.sh", env=base_env, timeout=120, netns=loopback)
        tails = "" if "==> " in up.stderr else _log_tails(state_dir)  # up.sh prints them itself
        pytest.fail(f"slurm/dev-cluster/up.sh exited {up.returncode}:\n{up.stderr}\n{tails}\n"
                    f"(down.sh: {down.stderr.strip() or 'ok'})", pytrace=False)

    env = dict(base_env)
    for line in up.stdout.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, _, value = words[1].partition("=")
            env[key] = value
    assert "SLURM_CONF" in env, f"up.sh printed no SLURM_CONF: {up.stdout!r}"
    cluster = SlurmCluster(env=env, state_dir=Path(env.get("DLAUNCH_SLURM_DIR", state_dir)), loopback=loopback)
    # A cluster left up by an interrupted session may still run its jobs: end them, so
    # that every test starts on four idle nodes.
    leftover = cluster.run("squeue", "-h", "-o", "%A").stdout.split()
    if leftover:
        cluster.run("scancel", *leftover)
        deadline = time.monotonic() + 30
        while cluster.run("squeue", "-h", "-o", "%A").stdout.strip():
            if time.monotonic() > deadline:
                pytest.fail(f"jobs {leftover} from before this session did not end within 30s",
                            pytrace=False)
            time.sleep(0.2)
    try:
        yield cluster
    finally:
        down = _script("down.sh", env=base_env, timeout=120, netns=loopback)
        if down.returncode != 0:
            pytest.fail(f"slurm/dev-cluster/down.sh exited {down.returncode}:\n{down.stderr}",
                        pytrace=False)
