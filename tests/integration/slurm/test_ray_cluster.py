"""A Ray cluster across a Slurm allocation (cluster/templates/ray-cluster.sbatch) on the dev
cluster: two at once on the same two nodes, on ports from their job ids, each driven from
its batch shell; a signal for the job reaches the driver; nothing of Ray outlives a job."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import time
from pathlib import Path

from cluster.ray_node import JOB_BLOCKS, ray_ports, temp_dir
from cluster.slurm_ray import render_ray_cluster
from launcher.recipe import Recipe
from tests.conftest import listening_sockets, processes_holding

REPO = Path(__file__).resolve().parents[3]

# Connects to its job's cluster, runs a task on each of its nodes, writes what it saw,
# with the rows of /proc/net/tcp{,6}: the TCP sockets of its network namespace (that of
# the dev cluster, its jobs and their Ray).
REPORTING_DRIVER = """\
import json, os, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=os.environ["DLAUNCH_RAY_ADDRESS"])
nodes = [node for node in ray.nodes() if node["Alive"]]
assert len(nodes) == 2, nodes

@ray.remote(num_cpus=1)
def node_id():
    return ray.get_runtime_context().get_node_id(), os.environ.get("DLAUNCH_PREEMPT_SIGNAL")

pinned = [node_id.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
          for node in nodes]
ran_on = ray.get([task.remote() for task in pinned])
listening = [row for table in ("/proc/net/tcp", "/proc/net/tcp6") for row in open(table).readlines()[1:]]
json.dump({"address": os.environ["DLAUNCH_RAY_ADDRESS"], "ran_on": ran_on, "listening": listening,
           "driver_signal": os.environ.get("DLAUNCH_PREEMPT_SIGNAL"),
           "nodes": {node["NodeID"]: node["NodeManagerPort"] for node in nodes}}, open(sys.argv[1], "w"))
"""

# Connects, says so, and exits 3 at the first SIGTERM or SIGUSR2, writing the signals it got
# and, after SIGUSR2, how many Ray nodes are still alive.
SIGNALLED_DRIVER = """\
import os, signal, sys, time
from pathlib import Path
import ray

out = Path(sys.argv[1])
got = []
ray.init(address=os.environ["DLAUNCH_RAY_ADDRESS"])
for signum in (signal.SIGTERM, signal.SIGUSR2):  # after ray.init, which sets a SIGTERM handler of its own
    signal.signal(signum, lambda signum, frame: got.append(signal.Signals(signum).name))
out.with_suffix(".ready").touch()
while not got:
    time.sleep(0.1)
time.sleep(0.5)  # a second delivery of the same signal, if any, lands here
if got[0] == "SIGUSR2":
    got.append(f"alive={sum(node['Alive'] for node in ray.nodes())}")
out.write_text(" ".join(got))
sys.exit(3)
"""


def submit(cluster, tmp_path: Path, name: str, driver: str, *args: str) -> tuple[str, Path]:
    """A 2-node Ray cluster job on node1 and node2 (2 of their 4 CPUs each, so that two
    such jobs share them) whose driver is the Python script ``driver`` with ``args``."""
    sweep = tmp_path / name
    sweep.mkdir()
    script = tmp_path / f"{name}.py"
    script.write_text(driver)
    recipe = Recipe.model_validate({"cluster": {"nodes": 2, "slurm": {
        "cpus_per_task": 2, "time": "00:05:00", "extra_sbatch": ["--nodelist=node[1-2]"]}}})
    command = shlex.join([str(script), *args])
    batch = sweep / "ray-cluster.sbatch"
    batch.write_text(render_ray_cluster(recipe, sweep_dir=str(sweep), driver=f'"$DLAUNCH_PYTHON" {command}'))
    return cluster.sbatch(str(batch), cwd=REPO), sweep


def ended(job: dict[str, str]) -> bool:
    return job["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")


def ray_pids(job_id: str) -> list[int]:
    """Live processes of the job's Ray (its temp dir)."""
    return processes_holding(f"{temp_dir(int(job_id), 0).parent}/")


def finish(cluster, jobs: list[str], timeout: float = 300) -> list[dict[str, str]]:
    """Wait for the jobs to end (cancelling them if they do not), then check that no
    process of their Ray is left, killing any that is, by pid."""
    try:
        return [cluster.wait_job(job, ended, timeout=timeout) for job in jobs]
    finally:
        stuck = [job for job in jobs if not ended(cluster.job(job))]
        if stuck:
            cluster.run("scancel", *stuck)
            for job in stuck:
                cluster.wait_job(job, ended, timeout=30)
        left = {job: ray_pids(job) for job in jobs}
        for pid in sum(left.values(), []):
            os.kill(pid, signal.SIGKILL)
        for job in jobs:
            shutil.rmtree(temp_dir(int(job), 0).parent, ignore_errors=True)
        assert not any(left.values()), f"Ray processes outlived their jobs: {left}"


def test_two_ray_clusters_share_two_nodes_on_ports_from_their_job_ids(slurm_cluster, tmp_path):
    submitted = [submit(slurm_cluster, tmp_path, name, REPORTING_DRIVER, str(tmp_path / f"{name}.json"))
                 for name in ("a", "b")]
    jobs = [job for job, _ in submitted]
    states = finish(slurm_cluster, jobs)
    for state, (job, sweep) in zip(states, submitted):
        assert state["JobState"] == "COMPLETED", (sweep / f"slurm-{job}.out").read_text()[-3000:]
        assert state["NodeList"] == "node[1-2]"
    seen = {job: json.loads((tmp_path / f"{name}.json").read_text()) for job, name in zip(jobs, "ab")}
    for job, report in seen.items():
        # Each node's slot of its job's block, or where a port there was taken, of a later block.
        head, worker = ([ray_ports(int(job) + later, node) for later in range(JOB_BLOCKS)] for node in (0, 1))
        assert int(report["address"].rpartition(":")[2]) in {ports.gcs for ports in head}
        assert len({ports.node_manager for ports in head} & set(report["nodes"].values())) == 1
        assert len({ports.node_manager for ports in worker} & set(report["nodes"].values())) == 1
        assert sorted(node for node, _ in report["ran_on"]) == sorted(report["nodes"])  # a task on each
        # The preemption signal is the driver's: the tasks Ray runs do not see it.
        assert report["driver_signal"] == "USR2"
        assert [signal for _, signal in report["ran_on"]] == [None, None]
    a, b = seen.values()
    assert a["address"] != b["address"]
    assert not set(a["nodes"]) & set(b["nodes"])
    # Every server of the cluster, of the jobs and of their Ray binds the loopback address
    # alone (the tests' network namespace has no other interface, and Ray takes its node
    # address for 127.0.0.1 there).
    for report in seen.values():
        listening = listening_sockets(report["listening"])
        assert int(report["address"].rpartition(":")[2]) in {port for _, port in listening}  # the GCS
        assert {str(address) for address, _ in listening} <= {"127.0.0.1", "::1"}, listening


def test_a_signal_for_the_job_reaches_the_driver_and_ray_stops(slurm_cluster, tmp_path):
    submitted = {name: submit(slurm_cluster, tmp_path, name, SIGNALLED_DRIVER, str(tmp_path / f"{name}.txt"))
                 for name in ("preempted", "cancelled")}
    preempted, cancelled = (job for job, _ in submitted.values())
    try:
        deadline = time.monotonic() + 180
        while not all((tmp_path / f"{name}.ready").exists() for name in submitted):
            for job, sweep in submitted.values():
                assert not ended(slurm_cluster.job(job)), (sweep / f"slurm-{job}.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "the drivers did not start within 180s"
            time.sleep(0.2)
        # Sent to the steps, the preemption signal would end Ray had it not been ignored.
        slurm_cluster.run("scancel", "--signal=USR2", preempted)
        time.sleep(1)
        # The time limit's warning goes to the batch shell alone (#SBATCH --signal=B:...),
        # as does this; a cancel sends SIGTERM to every process of the job.
        slurm_cluster.run("scancel", "--batch", "--signal=USR2", preempted)
        slurm_cluster.run("scancel", cancelled)
    finally:
        states = finish(slurm_cluster, [preempted, cancelled])
    assert (tmp_path / "preempted.txt").read_text() == "SIGUSR2 alive=2"
    assert (states[0]["JobState"], states[0]["ExitCode"]) == ("FAILED", "3:0")  # the driver's status
    assert (tmp_path / "cancelled.txt").read_text().startswith("SIGTERM")
    assert states[1]["JobState"] == "CANCELLED"


SWEEP_RECIPE = """
name: slurmsweep
model: {name: mlp, kwargs: {hidden: [32]}}
data: {source: synthetic, samples: 480, num_features: 8, num_classes: 3, val_fraction: 0.2}
engine: {name: accelerate}
precision: {dtype: fp32}
train: {micro_batch_size: 8, max_steps: 40, eval_every: 10, early_stopping: {patience: null}}
logging: {progress: false, report: false, tensorboard: false}
cluster:
  slurm: {time: "00:10:00", requeue: false}
sweep:
  metric: val_acc
  num_samples: 1
  max_concurrent: 1
  scheduler: {name: fifo}
  space:
    optim.lr: {grid: [3.0e-2, 1.0e-2]}
"""


def test_dlaunch_sweep_on_slurm_runs_every_trial_on_the_allocations_ray(slurm_cluster, tmp_path):
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(SWEEP_RECIPE)
    root = tmp_path / "runs"
    submitted = slurm_cluster.dlaunch("sweep", str(recipe), "--cluster", "slurm", "--nodes", "2",
                                      "--set", f"logging.run_root={root}", timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    [sweep] = list(root.iterdir())
    assert (sweep / "slurm" / "job_id").read_text().strip() == job_id
    [job] = finish(slurm_cluster, [job_id], timeout=600)
    output = (sweep / f"slurm-{job_id}.out").read_text(errors="replace")
    assert job["JobState"] == "COMPLETED", output[-4000:]
    assert job["NumNodes"] == "2"  # nodes per trial x max_concurrent
    rows = json.loads((sweep / "trials.json").read_text())
    assert [row["end"] for row in rows] == ["finished", "finished"]
    for row in rows:  # each trial a 2-worker job, one rank on each of the allocation's Ray nodes
        ray_job = json.loads((sweep / "trials" / row["trial_id"] / "ray" / "job.json").read_text())
        assert len(set(ray_job["ray_nodes"])) == 2
    assert (sweep / "best.yaml").exists()
