"""A real two-node Ray cluster for the tests in this folder: `ray start --head` and a
second `ray start --address`, both on this host, once per test session.

The cluster, and every dlaunch command that talks to it, runs in a network namespace of
its own that holds nothing but a loopback interface (`unshare --net`, entered with
`nsenter`): there Ray's node address is 127.0.0.1 and its servers bind 127.0.0.1 alone.
Outside one, Ray 2.60 swaps a loopback --node-ip-address for the host's outward address
and listens on every interface. Creating the namespace needs root (CI runs as root, as
the Slurm tests' apt-get does); without it the tests fail, they are never skipped.

Each node is one `ray start --block` process, which owns every Ray process of its node
and stops them all when it gets SIGTERM; the fixture stops the two by pid and then
checks that nothing of the cluster is left.

Every test here is marked `ray`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Loopback, dlaunch, loopback_namespace, processes_holding

HERE = Path(__file__).resolve().parent
RAY = str(Path(sys.executable).with_name("ray"))
CPUS_PER_NODE = 4
"""Logical CPUs each node offers: room for two 2-worker trials at once on 2 cores."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.ray)


@dataclass(frozen=True)
class RayCluster:
    address: str
    temp_dir: Path
    nodes: tuple[subprocess.Popen, ...]
    loopback: Loopback

    def dlaunch(self, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return dlaunch(*args, timeout=timeout, netns=self.loopback)


def _start_node(loopback: Loopback, temp_dir: Path, log: Path, *args: str) -> subprocess.Popen:
    # nsenter execs `ray start` (no fork for a network namespace): the pid is the node's.
    with open(log, "ab") as out:
        return subprocess.Popen(loopback.command(
            RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(CPUS_PER_NODE),
            "--disable-usage-stats", "--temp-dir", str(temp_dir), *args), stdout=out, stderr=subprocess.STDOUT)


def _alive_nodes(loopback: Loopback, address: str) -> int:
    probe = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    result = subprocess.run(loopback.command(sys.executable, "-c", probe), capture_output=True, text=True,
                            timeout=60)
    return int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else 0


def _stop(cluster: RayCluster) -> list[int]:
    """SIGTERM each node's `ray start --block` (workers first); the pids of the cluster
    still alive afterwards, which are then SIGKILLed."""
    for node in reversed(cluster.nodes):
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
    deadline = time.monotonic() + 30
    while processes_holding(str(cluster.temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = processes_holding(str(cluster.temp_dir))
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.fixture(scope="session")
def loopback() -> Iterator[Loopback]:
    """The Ray cluster's network namespace (the Slurm tests' cluster has another)."""
    with loopback_namespace() as space:
        yield space


@pytest.fixture(scope="session")
def ray_cluster(loopback: Loopback) -> Iterator[RayCluster]:
    # Token authentication, as cluster/templates/ray-cluster.sbatch sets it up: the
    # cluster's own token, which `ray start` then requires (it makes none itself, and
    # ~/.ray/auth_token exists only after some ray.init() made it: CI's fresh machine
    # failed here), and which a driver given the address uses, as users' drivers do.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "token")
        patch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        yield from _two_node_cluster(loopback)


def _two_node_cluster(loopback: Loopback) -> Iterator[RayCluster]:
    # Short: Ray puts unix sockets in here, and their paths must stay under 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="dlray-", dir="/tmp"))
    log = temp_dir / "nodes.log"
    # Ray's default port: the namespace is this cluster's alone.
    address = "127.0.0.1:6379"
    head = _start_node(loopback, temp_dir, log, "--head", "--port", "6379", "--include-dashboard=false")
    nodes = [head]
    cluster = RayCluster(address, temp_dir, (head,), loopback)
    try:
        deadline = time.monotonic() + 120
        while _alive_nodes(loopback, address) < 1:
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        nodes.append(_start_node(loopback, temp_dir, log, "--address", address))
        cluster = RayCluster(address, temp_dir, tuple(nodes), loopback)
        while _alive_nodes(loopback, address) < 2:
            assert all(n.poll() is None for n in nodes) and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield cluster
    finally:
        left = _stop(cluster)
    assert not left, f"Ray processes outlived their node's `ray start`: {left}"
    shutil.rmtree(temp_dir)  # kept, with Ray's logs, when something was left running
