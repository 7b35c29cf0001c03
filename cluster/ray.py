"""The Ray backend: one Ray actor per rank, placed node by node with a placement group.

Each actor reserves the rank's resources (``cluster.ray``) and starts the same worker
process every backend runs (``python -m launcher.worker RUN_DIR``) with the environment
torchrun would give it: RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK, MASTER_ADDR... The
placement group has a bundle per node: on a cluster its bundles must land on different
Ray nodes (STRICT_SPREAD), as a node's ranks must share one; on the Ray instance this
command starts itself, every "node" is this host, as on the local backend.

A Ray job lives as long as the process that drives it (the CLI, or a sweep's trial):
the actors belong to that process, so Ray kills them when it ends, and each worker
dies with its actor (launcher/worker.py). ``RUN_DIR/ray/job.json`` records where the
job runs, so that ``dlaunch status``, ``logs`` and ``cancel`` find it from anywhere.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.base import JobState
from cluster.failure import Endings, rank_failure_report
from cluster.process import Terminated, stop_signals_raise, worker_pythonpath
from launcher.errors import UsageError
from launcher.plan import LaunchPlan
from launcher.rundir import RAY_JOB, rank_log, rank_status, write_atomic

NAMESPACE = "dlaunch"
DRIVER_LOCK = "ray/driver.lock"
AUTH_MODE = "RAY_AUTH_MODE"
"""Ray's switch for token authentication, which a driver given an address must set."""
POLL_S = 0.5
GRACE_S = 10
"""How long a stopped worker gets to end before it is SIGKILLed."""


@ray.remote(num_cpus=0)
class RankActor:
    """Holds one rank's resources and runs its worker process.

    A plain (single-threaded) actor: its methods run on the process' main thread, which
    the worker's parent-death signal is tied to, and none of them blocks for long.
    """

    def __init__(self) -> None:
        self.worker: subprocess.Popen | None = None

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind((ray.util.get_node_ip_address(), 0))
            return s.getsockname()[1]

    def gpu_ids(self) -> list[str]:
        return [str(gpu) for gpu in ray.get_gpu_ids()]

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def start(self, run_dir: str, env: dict[str, str], cwd: str) -> int:
        """Start the rank's worker in the submitter's directory (on the storage all nodes
        share), so that a recipe's relative paths mean what they meant there."""
        self.worker = subprocess.Popen([sys.executable, "-m", "launcher.worker", run_dir],
                                       env={**os.environ, **env}, cwd=cwd)
        return self.worker.pid

    def poll(self) -> int | None:
        return self.worker.poll() if self.worker is not None else None

    def stop(self, grace: float) -> int | None:
        """SIGTERM the worker (it writes its status and exits), SIGKILL it after grace."""
        if self.worker is None or self.worker.poll() is not None:
            return self.worker.returncode if self.worker else None
        self.worker.terminate()
        try:
            return self.worker.wait(grace)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            return self.worker.wait()


def ray_address(plan: LaunchPlan) -> str | None:
    """The cluster to join: the recipe's (or --address), else RAY_ADDRESS, else none."""
    return plan.recipe.cluster.ray.address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def connected(address: str | None, *, cpus_needed: float = 0) -> Iterator[None]:
    """Join the Ray cluster at ``address``, or run a Ray instance on this host for as long
    as the block runs. Inside a Ray worker (a sweep's trial) the connection already
    exists and is kept."""
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
    else:
        # Logical CPUs, not cores: like the local backend, a 4-rank job runs on 2 cores.
        ray.init(num_cpus=max(os.cpu_count() or 1, cpus_needed), namespace=NAMESPACE,
                 include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def node_bundles(plan: LaunchPlan) -> list[dict[str, float]]:
    """One bundle per node: the resources of its procs_per_node ranks."""
    return [{key: value * plan.topology.procs_per_node for key, value in worker_resources(plan).items()}
            for _ in range(plan.topology.nodes)]


def worker_resources(plan: LaunchPlan) -> dict[str, float]:
    config = plan.recipe.cluster.ray
    gpus = config.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if plan.topology.device == "cuda" else 0.0
    resources = {"CPU": config.cpus_per_worker, **config.resources}
    if gpus:
        resources["GPU"] = gpus
    return resources


def _reserve(plan: LaunchPlan, *, spread: bool) -> PlacementGroup:
    """A placement group with a bundle per node, ready, or a clear error."""
    nodes = plan.topology.nodes
    if spread:
        alive = sum(1 for node in ray.nodes() if node["Alive"])
        if alive < nodes:
            raise UsageError(f"the job needs {nodes} Ray nodes and the cluster has {alive}; use "
                             f"--nodes {alive} or add nodes", key="cluster.nodes")
    group = placement_group(node_bundles(plan), strategy="STRICT_SPREAD" if spread else "PACK")
    timeout = plan.recipe.cluster.ray.start_timeout
    ready, _ = ray.wait([group.ready()], timeout=timeout)
    if not ready:
        remove_placement_group(group)
        raise UsageError(
            f"Ray could not reserve {node_bundles(plan)[0]} on each of {nodes} node(s) within "
            f"{timeout} s; the cluster has {ray.available_resources()} free",
            key="cluster.ray.cpus_per_worker")
    return group


def _rank_env(plan: LaunchPlan, job_id: str, rank: int, master: tuple[str, int],
              visible_gpus: list[str]) -> dict[str, str]:
    """What torchrun exports to a worker (torch.distributed.elastic.agent), and the plan's."""
    topo = plan.topology
    node, local = divmod(rank, topo.procs_per_node)
    env = {
        **plan.env,
        "DLAUNCH_RUN_DIR": plan.run_dir,
        "RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(topo.world_size),
        "LOCAL_WORLD_SIZE": str(topo.procs_per_node), "GROUP_RANK": str(node),
        "GROUP_WORLD_SIZE": str(topo.nodes), "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(topo.world_size),
        "ROLE_NAME": "default", "MASTER_ADDR": master[0], "MASTER_PORT": str(master[1]),
        "TORCHELASTIC_RUN_ID": job_id, "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        # No elastic agent hosts a store here: init_process_group makes its own TCP store.
        "TORCHELASTIC_USE_AGENT_STORE": "False",
    }
    if visible_gpus:
        # Every rank of a node sees the node's GPUs in local-rank order, so LOCAL_RANK
        # indexes its own, as under torchrun (Ray would show each actor only its own).
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus)
    pythonpath = worker_pythonpath()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


class RayJob:
    """A running Ray job, seen from the process that started it."""

    def __init__(self, plan: LaunchPlan, job_id: str, actors: list[Any], group: PlacementGroup,
                 own_group: bool, driver_lock: IO[str]) -> None:
        self.plan = plan
        self.run_dir = plan.run_dir
        self.job_id = job_id
        self._actors = actors
        self._group = group
        self._own_group = own_group
        self._driver_lock = driver_lock

    def status(self) -> JobState:
        return job_state(self.run_dir)

    def logs(self, rank: int = 0) -> str:
        return read_log(self.run_dir, rank)

    def cancel(self) -> None:
        _mark(self.run_dir, "CANCELLED")
        self._stop()

    def wait(self, every_poll: Callable[[], None] = lambda: None) -> int:
        """Block until the job ends; its exit code. ``every_poll`` runs at each look at
        the ranks (a sweep trial passes on new metrics from there)."""
        endings = Endings(self.run_dir, self.plan.topology.world_size)
        try:
            with stop_signals_raise():
                failed = self._first_failed_rank(endings, every_poll)
        except (KeyboardInterrupt, Terminated) as stopped:
            self._stop()
            self._end("CANCELLED")
            return 128 + (signal.SIGINT if isinstance(stopped, KeyboardInterrupt) else stopped.signum)
        except BaseException:
            # Whoever drives the job is going away (Tune stopping a trial exits its
            # thread): take the ranks down now rather than when Ray reaps the actors.
            self._end("CANCELLED")
            raise
        if failed is None:
            self._end("COMPLETED")
            return 0
        self._stop()
        if _recorded_state(self.run_dir) == "CANCELLED":
            self._end("CANCELLED")
            return 128 + signal.SIGTERM
        endings.poll()
        first = endings.first_failure()
        rank, status = (first.rank, first.status) if first else (failed, "failed: exited non-zero")
        print(rank_failure_report(self.run_dir, self.plan.topology, rank, status), file=sys.stderr)
        self._end("FAILED")
        return 1

    def _first_failed_rank(self, endings: Endings, every_poll: Callable[[], None]) -> int | None:
        while True:
            codes = ray.get([actor.poll.remote() for actor in self._actors])
            endings.poll()
            every_poll()
            for rank, code in enumerate(codes):
                if code:
                    return rank
            if None not in codes:
                return None
            time.sleep(POLL_S)

    def _stop(self) -> None:
        ray.get([actor.stop.remote(GRACE_S) for actor in self._actors])

    def _end(self, state: JobState) -> None:
        if _recorded_state(self.run_dir) != "CANCELLED":
            _mark(self.run_dir, state)
        for actor in self._actors:
            ray.kill(actor)
        if self._own_group:
            remove_placement_group(self._group)
        self._driver_lock.close()


class RayBackend:
    """Submits plans to the Ray cluster this process is connected to (see ``connected``).

    ``group``: run in this placement group (a sweep trial's, whose bundles Tune
    reserved, one per node) instead of reserving one.
    """

    def __init__(self, group: PlacementGroup | None = None) -> None:
        self._group = group

    def submit(self, plan: LaunchPlan) -> RayJob:
        for rank in range(plan.topology.world_size):
            rank_status(plan.run_dir, rank).unlink(missing_ok=True)
        own_group = self._group is None
        group = _reserve(plan, spread=ray_address(plan) is not None) if own_group else self._group
        job_id = f"ray-{uuid.uuid4().hex[:12]}"
        topo = plan.topology
        resources = worker_resources(plan)
        actors = [
            RankActor.options(
                name=f"{job_id}-rank-{rank}", num_cpus=resources.get("CPU", 0),
                num_gpus=resources.get("GPU", 0),
                resources={k: v for k, v in resources.items() if k not in ("CPU", "GPU")},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=rank // topo.procs_per_node),
            ).remote()
            for rank in range(topo.world_size)
        ]
        master = (ray.get(actors[0].node_ip.remote()), ray.get(actors[0].free_port.remote()))
        gpus = ray.get([actor.gpu_ids.remote() for actor in actors])
        driver_lock = _hold_driver_lock(plan.run_dir)
        _record(plan.run_dir, {"job_id": job_id, "address": ray.get_runtime_context().gcs_address,
                               "namespace": NAMESPACE, "world_size": topo.world_size,
                               "ray_nodes": ray.get([actor.node_id.remote() for actor in actors]),
                               # How to reconnect (never the token itself: that stays in ~/.ray).
                               "auth_mode": os.environ.get(AUTH_MODE),
                               "driver_host": socket.gethostname(), "driver_pid": os.getpid(),
                               "state": "RUNNING"})
        for rank, actor in enumerate(actors):
            node = rank // topo.procs_per_node
            node_gpus = [g for ids in gpus[node * topo.procs_per_node:(node + 1) * topo.procs_per_node]
                         for g in ids]
            ray.get(actor.start.remote(plan.run_dir, _rank_env(plan, job_id, rank, master, node_gpus),
                                       os.getcwd()))
        return RayJob(plan, job_id, actors, group, own_group, driver_lock)


# -- the job seen from another process: dlaunch status / logs / cancel ----------------


def _job_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / RAY_JOB


def _record(run_dir: str, record: dict[str, Any]) -> None:
    path = _job_file(run_dir)
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2) + "\n")


def _read_record(run_dir: str | Path) -> dict[str, Any]:
    return json.loads(_job_file(run_dir).read_text())


def _recorded_state(run_dir: str) -> str:
    return _read_record(run_dir)["state"]


def _mark(run_dir: str, state: JobState) -> None:
    _record(run_dir, {**_read_record(run_dir), "state": state})


def _hold_driver_lock(run_dir: str) -> IO[str]:
    """Locked while the driving process lives: a job whose record says RUNNING but whose
    lock is free lost its driver (killed hard), and with it its actors."""
    path = Path(run_dir) / DRIVER_LOCK
    path.parent.mkdir(exist_ok=True)
    lock = open(path, "w")  # noqa: SIM115 (held until the job ends)
    fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return lock


def _driver_alive(run_dir: str | Path) -> bool:
    with open(Path(run_dir) / DRIVER_LOCK, "rb") as lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        return False


def is_ray_run(run_dir: str | Path) -> bool:
    return _job_file(run_dir).is_file()


def job_state(run_dir: str | Path) -> JobState:
    state = _read_record(run_dir)["state"]
    if state == "RUNNING" and not _driver_alive(run_dir):
        return "FAILED"
    return state


def read_log(run_dir: str | Path, rank: int) -> str:
    path = rank_log(run_dir, rank)
    return path.read_text(errors="replace") if path.exists() else ""


class RayJobRecord:
    """A Ray job found by its run directory, for status, logs and cancel."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = str(run_dir)
        self.job_id = _read_record(run_dir)["job_id"]

    def status(self) -> JobState:
        return job_state(self.run_dir)

    def logs(self, rank: int = 0) -> str:
        return read_log(self.run_dir, rank)

    def output(self) -> str:
        return self.logs(0)

    def cancel(self) -> None:
        """Stop every worker through its actor; the driving process sees them end and
        reports the job cancelled."""
        record = _read_record(self.run_dir)
        if job_state(self.run_dir) != "RUNNING":
            return
        _mark(self.run_dir, "CANCELLED")
        if record["auth_mode"]:
            os.environ.setdefault(AUTH_MODE, record["auth_mode"])
        with connected(record["address"]):
            actors = []
            for rank in range(record["world_size"]):
                try:
                    actors.append(ray.get_actor(f"{record['job_id']}-rank-{rank}", namespace=record["namespace"]))
                except ValueError:  # that rank's actor is already gone
                    continue
            ray.get([actor.stop.remote(GRACE_S) for actor in actors])
