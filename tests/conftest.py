"""Shared helpers: run the real `dlaunch` CLI in a subprocess, read a run directory."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
            timeout: int = 300, netns: Loopback | None = None) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS`: the same entry point as the console script; in the
    namespace ``netns`` when given."""
    command = [sys.executable, "-m", "launcher", *args]
    return subprocess.run(netns.command(*command) if netns else command, cwd=cwd or REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def only_run_dir(root: Path) -> Path:
    runs = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1, f"expected one run dir under {root}, found {runs}"
    return runs[0]


def metrics(run_dir: Path, kind: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind is None or r["kind"] == kind]


def kill_after(step: int, rank: int = 0) -> dict[str, str]:
    """The environment that has ``rank`` SIGKILLed after step ``step`` (launcher/faults.py)."""
    return {"DLAUNCH_FAULTS": json.dumps([{"kind": "kill", "rank": rank, "step": step}])}


def resume_to_identical_weights(run_dir: Path, straight_dir: Path,
                                killed_after: int) -> subprocess.CompletedProcess:
    """`dlaunch run --resume` of the killed run in ``run_dir``: it continues from step
    ``killed_after`` and ends with the weights of the uninterrupted run in ``straight_dir``.
    Returns the resumed run's process, for what it printed."""
    import torch

    resumed = dlaunch("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics(run_dir, "resume")[0]["step"] == killed_after
    expected, actual = torch.load(straight_dir / "model.pt"), torch.load(run_dir / "model.pt")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs after resume"
    return resumed


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
