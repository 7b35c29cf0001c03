"""Shared helpers: run the real `dlaunch` CLI in a subprocess, run a probe as a one-rank
job (`one_rank`), read a run directory; the real Slurm cluster that
tests/integration/slurm and tests/faults share (`slurm_cluster`, started once per
session, whichever folder asks first)."""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLURM_SCRIPTS = REPO / "slurm" / "dev-cluster"


@dataclass(frozen=True)
class Loopback:
    """A network namespace holding nothing but a loopback interface, alive while
    ``holder`` lives. Servers started in it can bind 127.0.0.1 alone, and must: Ray
    2.60, for one, swaps a loopback --node-ip-address for the host's outward address
    and listens on every interface unless the host has no other. Creating it needs root
    (CI runs as root, as the Slurm tests' apt-get does)."""

    holder: subprocess.Popen

    def command(self, *argv: str) -> list[str]:
        """``argv`` run in the namespace (nsenter execs it: the pid is argv's)."""
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--", *argv]

    def listening(self) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
        """(address, port) of every listening TCP socket in the namespace."""
        tables = subprocess.run(self.command("cat", "/proc/net/tcp", "/proc/net/tcp6"), capture_output=True,
                                text=True, check=True).stdout
        return listening_sockets(tables.splitlines())


def listening_sockets(rows: list[str]) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of each row of /proc/net/tcp{,6} in state 0A (listening). Its
    local_address is hex: each 32-bit word of the address in host (little-endian) order,
    then the port. An IPv4-mapped IPv6 address (an IPv6 socket bound to ::ffff:127.0.0.1,
    as gRPC's are) comes back as the IPv4 address."""
    sockets = []
    for row in rows:
        fields = row.split()
        if len(fields) > 3 and fields[3] == "0A":
            host, _, port = fields[1].partition(":")
            address = ipaddress.ip_address(b"".join(bytes.fromhex(host[i:i + 8])[::-1]
                                                    for i in range(0, len(host), 8)))
            sockets.append((getattr(address, "ipv4_mapped", None) or address, int(port, 16)))
    return sockets


@contextmanager
def loopback_namespace() -> Iterator[Loopback]:
    """A new `Loopback`, its holder killed on exit: each cluster of the tests (Ray's,
    Slurm's) gets one of its own, so that neither's ports can be the other's."""
    # 127.0.0.2 beside 127.0.0.1: getaddrinfo(AF_INET, AI_ADDRCONFIG), which Slurm uses,
    # finds no IPv4 address on a host whose only one is 127.0.0.1. Both are loopback addresses.
    holder = subprocess.Popen(["unshare", "--net", "sh", "-c",
                               "ip link set lo up && ip addr add 127.0.0.2/8 dev lo && exec sleep infinity"])
    space = Loopback(holder)
    try:
        deadline = time.monotonic() + 30
        bind = "import socket; socket.socket().bind(('127.0.0.1', 0))"
        while subprocess.run(space.command(sys.executable, "-c", bind), capture_output=True).returncode:
            assert holder.poll() is None, "cannot create a network namespace (unshare --net needs root)"
            assert time.monotonic() < deadline, "the namespace's loopback interface never came up"
            time.sleep(0.2)
        yield space
    finally:
        holder.kill()
        holder.wait()


def dlaunch(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: int = 900, netns: Loopback | None = None) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS`: the same entry point as the console script; in the
    namespace ``netns`` when given."""
    command = [sys.executable, "-m", "launcher", *args]
    return subprocess.run(netns.command(*command) if netns else command, cwd=cwd or REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def stopped_run(*args: str, once: Callable[[], bool]) -> tuple[int, str]:
    """`dlaunch ARGS` started, and sent Ctrl-C's SIGINT once ``once()`` holds: its exit
    code and stderr."""
    launcher = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=REPO, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.monotonic() + 300
        while not once():
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=120)
    finally:
        launcher.terminate()  # no-op once it has ended; else it stops its job
        launcher.wait(120)
    return launcher.returncode, err


def one_rank(probe: str, *args: str) -> dict:
    """Run the Python source ``probe`` as the one rank of a torchrun-style job (a gloo
    process group of one, on a free port), in a process of its own: DeepSpeed and
    Accelerate keep process-wide state. Its last line of output, read as JSON."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_SIZE", None)  # DeepSpeed's; a probe gets the plan's, if any
    done = subprocess.run([sys.executable, "-c", probe, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def only_run_dir(root: Path) -> Path:
    runs = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1, f"expected one run dir under {root}, found {runs}"
    return runs[0]


def metrics(run_dir: Path, kind: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind is None or r["kind"] == kind]


def kill_after(step: int, rank: int = 0) -> dict[str, str]:
    """The environment that has ``rank`` SIGKILLed after step ``step`` (launcher/faults.py)."""
    from launcher.faults import spec

    return spec({"kind": "kill", "rank": rank, "step": step})


def resume_to_identical_weights(run_dir: Path, straight_dir: Path,
                                killed_after: int) -> subprocess.CompletedProcess:
    """`dlaunch run --resume` of the killed run in ``run_dir``: it continues from step
    ``killed_after`` and ends with the weights of the uninterrupted run in ``straight_dir``.
    Returns the resumed run's process, for what it printed."""
    resumed = dlaunch("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics(run_dir, "resume")[0]["step"] == killed_after
    assert_same_weights(run_dir, straight_dir)
    return resumed


def assert_same_weights(run_dir: Path, straight_dir: Path) -> None:
    """Every tensor of ``run_dir``'s model.pt equals the uninterrupted run's, to the bit."""
    import torch

    expected, actual = torch.load(straight_dir / "model.pt"), torch.load(run_dir / "model.pt")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs from the uninterrupted run"


CLUSTER_FIXTURES = ("slurm_cluster", "ray_cluster")


def pytest_configure(config: pytest.Config) -> None:
    """Commands the tests start get SIGINT as a terminal's foreground command has it. A
    suite started in the background by a non-interactive shell (`make test &`) inherits
    it ignored, Python keeps it so, and so would every CLI the tests start: a Ctrl-C test
    then waited out a whole run."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# DeepSpeed builds its CPU Adam (the optimizer of ZeRO's offload) with a C++ compiler the
# first time a process on the machine loads it: 100 s of CPU, 60 s of an otherwise idle
# 2-core machine, which the offload test paid inside its run. The other tests leave a
# third of the cores idle (waiting on start-up, rendezvous, Slurm and Ray), so a build
# started with the session at the lowest priority is done, on cores nobody wanted, by the
# time the test runs. A rank that loads it mid-build waits for it (torch holds a lock on
# the build directory), as it would for another rank's build.
BUILD_CPU_ADAM = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
_cpu_adam_build: subprocess.Popen | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the CPU Adam build when a collected test is marked `cpu_adam` (in one
    process of the session: xdist's first worker, or pytest itself without xdist)."""
    global _cpu_adam_build
    if session.config.option.collectonly or os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return
    if any(item.get_closest_marker("cpu_adam") for item in session.items):
        _cpu_adam_build = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", BUILD_CPU_ADAM],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True)


def pytest_sessionfinish() -> None:
    # Never left running: a build killed midway leaves torch's lock behind, and every
    # later load of the op on this machine waits on it forever.
    if _cpu_adam_build is not None:
        _cpu_adam_build.wait()


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n 2 --dist loadgroup`, the default addopts), every test that
    uses the dev Slurm cluster runs in the same worker, and so does every test that uses
    the two-node Ray cluster: each cluster is started once per worker process that needs
    it, and two Slurm clusters on one host would fight over munge, the state directory
    and their ports. The two clusters live in network namespaces of their own, so their
    two groups may run at once, in two workers; one group of both was the suite's
    longest chain (21 min of its 32 in one run).

    Likewise the tests of one module that share a module-scoped fixture (a pretraining
    run, an uninterrupted run to compare with) run in one worker: a fixture is made once
    per worker that needs it, and spread over workers they made it up to once each (the
    transfer tests' four fixture runs twice, 110 s, in one CI log)."""
    for item in items:
        clusters = [name for name in CLUSTER_FIXTURES if name in _fixture_names(item)]
        if clusters:
            item.add_marker(pytest.mark.xdist_group(clusters[0]))
        elif _uses_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Stop a cluster once the last test of its group in this worker has run, not when
    the session ends: an idle Ray cluster (its log monitor 6%, its raylets and GCS 1%)
    kept 7% of a core busy for the 20 minutes of tests after its own. A later test that
    asks for it again (`-n 0` runs the suite in file order) gets a fresh one: pytest
    makes a finished fixture anew. `nextitem` is known under xdist too (its worker holds
    a test back until the next one arrives) and None only for the session's last."""
    outcome = yield
    for name in CLUSTER_FIXTURES:
        if nextitem is not None and name in _fixture_names(item) and name not in _fixture_names(nextitem):
            # pytest's own teardown of a fixture (private API: pytest is pinned below 9).
            item._fixtureinfo.name2fixturedefs[name][-1].finish(item._request)
    return outcome


def _fixture_names(item: pytest.Item) -> tuple[str, ...]:
    return tuple(getattr(item, "fixturenames", ()))


def _uses_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)  # a test function's; other items have none
    return info is not None and any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values())


@pytest.fixture
def write_recipe(tmp_path):
    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie (an orphan waits for init to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def processes_holding(root: str) -> list[int]:
    """Live pids that name ``root`` on their command line or hold a file under it open
    (Ray's workers retitle themselves; their logs stay open)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            files = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile
            continue
        if state != "Z" and (root in cmdline or any(f.startswith(root) for f in files)):
            pids.append(int(proc.name))
    return pids


# -- the dev Slurm cluster (slurm/dev-cluster/) -------------------------------------


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
"""The JobStates of a Slurm job that has ended."""


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

    def dlaunch(self, *args: str, timeout: int = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """`dlaunch ARGS` in the cluster's namespace and environment, plus ``env``."""
        return dlaunch(*args, env={**self.env, **(env or {})}, timeout=timeout, netns=self.loopback)

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
    command = ["bash", str(SLURM_SCRIPTS / name), *args]
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
