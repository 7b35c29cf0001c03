"""One node of a Ray cluster inside a Slurm allocation (cluster/templates/ray-cluster.sbatch).

    python -m cluster.ray_node head|worker     on each node, under srun: `ray start --block`
    python -m cluster.ray_node head-address SECONDS [STEP_PID ...]
                                               in the batch script: the head's HOST:PORT
                                               once it answers
    python -m cluster.ray_node wait NODES SECONDS [STEP_PID ...]
                                               in the batch script: until NODES nodes are up

Ray's ports come from the job id (`ray_ports`), so that two jobs sharing a node do not
collide: Ray's own defaults (6379, 10001, 10002-19999, 52365...) are the same for everyone,
and Ray's Slurm guide leaves ports to the user.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import stat
import sys
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import NoReturn

# Ports: a block of 800 per job (job id mod 40), in it a slot of 100 per node (node index
# mod 8). Nodes of one job normally sit on different hosts, where their slots need not
# differ; the slot matters when several emulated nodes share a host (the dev cluster).
# The blocks span 30000-61999, which overlaps Linux's ephemeral range (32768-60999): any
# outgoing connection may hold one of these ports (below 32768 there is no room for 40
# blocks beside Ray's defaults and other services). On a busy host that is no rare event
# (the dev host, beside other tests' Ray clusters, had ~200 sockets in the range, and a
# GCS port among them). So a node takes the first block, from its job's on, in which its
# slot's fixed ports are free (`free_ports`): a port held by a connection, or by a job
# whose id is congruent mod 40, moves the node to the next block instead of failing it.
# Checking is not enough where two nodes start at once: a node moved to the next block
# finds it free because that job's node has not bound it yet, and both start there (CI
# saw a job's driver reach the neighbouring job's GCS). So a node also claims its slot on
# the host (`claim_slot`) until its `ray start` ends. Worker ports need no such care: the
# raylet skips those it finds taken.
PORT_BASE = 30000
JOB_BLOCKS = 40
NODE_SLOTS = 8
SLOT_PORTS = 100

NODE_IP_VAR = "DLAUNCH_RAY_NODE_IP"
ADDRESS_VAR = "DLAUNCH_RAY_ADDRESS"
# A file on the head's host, where the head writes its HOST:PORT for the batch script.
HEAD_FILE_VAR = "DLAUNCH_RAY_HEAD_FILE"
# The preemption signal and the right to requeue are the driver's (the batch script passes
# the signal on to it). A trial that saw them would checkpoint and requeue the whole
# allocation on its own, so the Ray nodes, and every process they start, go without.
DRIVER_ONLY_VARS = ("DLAUNCH_PREEMPT_SIGNAL", "DLAUNCH_REQUEUE")


@dataclass(frozen=True)
class RayPorts:
    """The ports of one Ray node: the fixed ones (the first three bound on the head only),
    then the worker range."""

    gcs: int
    client_server: int
    dashboard: int
    """Served by no one (the dashboard is off), but Ray checks that it is free: named so
    that it is not 8265, and so that a Ray that serves its job API without the dashboard
    (a TODO in Ray's services.py) serves it here."""
    node_manager: int
    object_manager: int
    runtime_env_agent: int
    dashboard_agent_grpc: int
    """Also the metrics agent's port."""
    dashboard_agent_http: int
    metrics_export: int
    min_worker: int
    """Workers, drivers and actors each listen on one port of min_worker..max_worker."""
    max_worker: int

    def fixed(self, head: bool) -> dict[str, int]:
        """The ports Ray binds at start-up on a head or a worker node, by name."""
        names = [field.name for field in fields(self)[:FIXED_PORTS]]
        return {name: getattr(self, name) for name in names if head or name not in HEAD_ONLY}

    def all(self) -> set[int]:
        """Every port this node may use, the worker range included."""
        return {*astuple(self)[:FIXED_PORTS], *range(self.min_worker, self.max_worker + 1)}


FIXED_PORTS = len(fields(RayPorts)) - 2  # every field but the worker range
HEAD_ONLY = ("gcs", "client_server", "dashboard")


def ray_ports(job_id: int, node_id: int) -> RayPorts:
    """The ports of node ``node_id`` (0: the head) of Slurm job ``job_id``: the fixed ones
    first in its slot, the rest of the slot for workers."""
    start = PORT_BASE + ((job_id % JOB_BLOCKS) * NODE_SLOTS + node_id % NODE_SLOTS) * SLOT_PORTS
    return RayPorts(*range(start, start + FIXED_PORTS), min_worker=start + FIXED_PORTS,
                    max_worker=start + SLOT_PORTS - 1)


def _free(port: int) -> bool:
    with socket.socket() as probe:
        # As Ray's servers do: a TIME_WAIT left by this job's previous run (requeued) is
        # no conflict (on Linux; gVisor counts it).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def claim_slot(ports: RayPorts) -> socket.socket | None:
    """This host's claim on the slot ``ports`` (None: another node holds it), held while the
    returned socket is open. An abstract unix socket: one name per host, as ports are (per
    network namespace), for every user, and gone with the last process holding it."""
    claim = socket.socket(socket.AF_UNIX)
    try:
        claim.bind(f"\0dlaunch-ray-slot-{ports.gcs}")
    except OSError:
        claim.close()
        return None
    return claim


def free_ports(job_id: int, node_id: int, head: bool) -> tuple[RayPorts, socket.socket]:
    """This node's ports, and its claim on them (`claim_slot`): those of its job's block or,
    where another node claims that slot, or one of the ports Ray binds at start-up is taken
    on this host, of the next block free of both."""
    for later in range(JOB_BLOCKS):
        ports = ray_ports(job_id + later, node_id)
        claim = claim_slot(ports)
        if claim is None:
            continue
        if all(_free(port) for port in ports.fixed(head).values()):
            return ports, claim
        claim.close()
    _fail(f"no block of Ray ports has its node {node_id} slot free on {socket.gethostname()}")


def temp_dir(job_id: int, node_id: int) -> Path:
    """Ray's --temp-dir: short (its unix socket paths, under it, must stay below 108
    bytes), one per node, so that emulated nodes on one host keep apart."""
    return Path(f"/tmp/dlaunch-ray-{job_id}/{node_id}")


def ray_start_command(ports: RayPorts, *, ip: str, temp: Path, cpus: int, gpus: int | None,
                      head_address: str | None) -> list[str]:
    """`ray start --block` for the head (``head_address`` None) or a worker node, with
    every port named: a port left to Ray's default is the same in every job. Ray of this
    Python, whatever PATH holds."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
               f"--node-ip-address={ip}", f"--temp-dir={temp}", f"--num-cpus={cpus}"]
    if gpus is not None:
        command.append(f"--num-gpus={gpus}")
    if head_address is None:
        command += ["--head", f"--port={ports.gcs}", f"--ray-client-server-port={ports.client_server}",
                    "--include-dashboard=false", f"--dashboard-port={ports.dashboard}"]
    else:
        command.append(f"--address={head_address}")
    return command + [
        f"--node-manager-port={ports.node_manager}",
        f"--object-manager-port={ports.object_manager}",
        f"--runtime-env-agent-port={ports.runtime_env_agent}",
        f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_http}",
        f"--metrics-export-port={ports.metrics_export}",
        f"--min-worker-port={ports.min_worker}",
        f"--max-worker-port={ports.max_worker}",
    ]


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def node_ip(name: str) -> str:
    """The address Ray advertises for node ``name``: DLAUNCH_RAY_NODE_IP when set, else
    what the name resolves to. (Ray itself swaps a loopback address for the host's
    outward one, and its servers listen on every interface either way.)"""
    override = os.environ.get(NODE_IP_VAR)
    if override:
        return override
    try:
        return socket.gethostbyname(name)
    except OSError:
        _fail(f"Ray node '{name}' does not resolve on {socket.gethostname()}")


def _own_dir(path: Path) -> None:
    """Create ``path`` (mode 700) or accept it if it is this user's directory: its name is
    predictable from the job id, so another user could have put a directory, or a symlink,
    there to receive our sockets."""
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        _fail(f"{path} exists and is not a directory of this user; remove it")


def start(head: bool) -> NoReturn:
    """Replace this process by `ray start --block` for this node (srun runs one a node)."""
    job_id = int(os.environ["SLURM_JOB_ID"])
    # SLURM_NODEID counts the nodes of this step, and the workers' step leaves out the
    # head: the step's node k is the job's node k + 1.
    node_id = 0 if head else int(os.environ["SLURM_NODEID"]) + 1
    ports, claim = free_ports(job_id, node_id, head)
    # Held across the exec, by `ray start --block`, for as long as the node runs.
    claim.set_inheritable(True)
    temp = temp_dir(job_id, node_id)
    _own_dir(temp.parent)
    temp.mkdir(exist_ok=True)
    # The name Slurm gives this node (`scontrol show hostnames`), which is what the other
    # nodes know it by.
    ip = node_ip(os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    command = ray_start_command(ports, ip=ip, temp=temp, cpus=int(os.environ["SLURM_CPUS_ON_NODE"]),
                                gpus=int(gpus) if gpus else None,
                                head_address=None if head else os.environ[ADDRESS_VAR])
    if head:
        # One write of a whole line: the batch script reads it once it ends in a newline.
        Path(os.environ[HEAD_FILE_VAR]).write_text(f"{ip}:{ports.gcs}\n")
    preempt = os.environ.get("DLAUNCH_PREEMPT_SIGNAL")
    if preempt:
        # Ignored survives exec: Slurm signals every process of the step, and this
        # signal's default action would end Ray under the driver.
        signal.signal(getattr(signal, f"SIG{preempt}"), signal.SIG_IGN)
    for var in DRIVER_ONLY_VARS:
        os.environ.pop(var, None)
    # On SIGTERM, `ray start` would first drain the node, for up to 30 s, asking a GCS
    # that the same signal is stopping: nothing here serves traffic that could drain.
    os.environ["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    os.execv(command[0], command)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has ended: only its parent's wait is missing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return False
    return True


class _Deadline:
    """Fails, saying what it waited for, once ``timeout`` has passed or one of the srun
    ``steps`` (pids) running Ray has ended."""

    def __init__(self, what: str, timeout: float, steps: list[int]) -> None:
        self.what, self.timeout, self.steps = what, timeout, steps
        self.end = time.monotonic() + timeout

    def check(self) -> None:
        for pid in self.steps:
            if not _alive(pid):
                _fail(f"a Ray step (srun, pid {pid}) ended while waiting for {self.what}; its output is above")
        if time.monotonic() > self.end:
            _fail(f"{self.timeout:g}s passed waiting for {self.what}")


def wait_for_head(head_file: Path, timeout: float, steps: list[int]) -> str:
    """The head's HOST:PORT, once the head has written it and answers there."""
    deadline = _Deadline("the Ray head to answer", timeout, steps)
    while not (line := head_file.read_text()).endswith("\n") or not _answers(line.strip()):
        deadline.check()
        time.sleep(0.5)
    return line.strip()


def wait_for_nodes(address: str, nodes: int, timeout: float, steps: list[int]) -> int:
    """How many Ray nodes are alive, once ``nodes`` are."""
    deadline = _Deadline(f"{nodes} Ray nodes at {address} to be up", timeout, steps)
    import ray  # only here: the node roles run without it

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        while (alive := sum(node["Alive"] for node in ray.nodes())) < nodes:
            deadline.check()
            time.sleep(0.5)
    finally:
        ray.shutdown()
    return alive


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.ray_node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("head", help=f"start the head node, writing its address to ${HEAD_FILE_VAR}")
    commands.add_parser("worker", help=f"start a worker node, joining ${ADDRESS_VAR}")
    head_address = commands.add_parser("head-address", help=f"print the address in ${HEAD_FILE_VAR} once "
                                       "the head answers there")
    wait = commands.add_parser("wait", help=f"wait until the cluster at ${ADDRESS_VAR} has NODES nodes")
    wait.add_argument("nodes", type=int)
    for command in (head_address, wait):
        command.add_argument("timeout", type=float, help="seconds")
        command.add_argument("steps", type=int, nargs="*", help="pids of the srun steps running Ray")
    args = parser.parse_args(argv)
    if args.command in ("head", "worker"):
        start(head=args.command == "head")
    elif args.command == "head-address":
        print(wait_for_head(Path(os.environ[HEAD_FILE_VAR]), args.timeout, args.steps))
    else:
        address = os.environ[ADDRESS_VAR]
        alive = wait_for_nodes(address, args.nodes, args.timeout, args.steps)
        print(f"Ray cluster at {address}: {alive} node(s) up", flush=True)


if __name__ == "__main__":
    main()
