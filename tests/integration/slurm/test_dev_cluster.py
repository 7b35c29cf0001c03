"""The dev cluster (slurm/dev-cluster/) behaves like the Slurm the sbatch backend targets:
four nodes, multi-node steps, shared nodes, requeue and signals."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import TERMINAL


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -u\n" + body)
    return path


def wait_for_file(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.1)


def test_sinfo_lists_four_idle_nodes(slurm_cluster):
    out = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %T %c").stdout
    rows = sorted(line.split() for line in out.splitlines())
    assert rows == [[f"node{k}", "idle", "4"] for k in range(1, 5)], out


def test_four_node_job_expands_node_id_on_each_node(slurm_cluster, tmp_path):
    # Single quotes: $SLURM_NODEID is expanded by each node's task, not by the batch shell.
    job_id = slurm_cluster.sbatch(
        "--wait", "--nodes=4", "--ntasks-per-node=1", "--output=out.txt",
        "--wrap", "srun bash -c 'echo $SLURM_NODEID $SLURMD_NODENAME'", cwd=tmp_path, timeout=60)
    lines = (tmp_path / "out.txt").read_text().split("\n")
    pairs = sorted(tuple(line.split()) for line in lines if line.strip())
    assert pairs == [("0", "node1"), ("1", "node2"), ("2", "node3"), ("3", "node4")], lines
    assert slurm_cluster.job(job_id)["JobState"] == "COMPLETED"


def test_two_two_node_jobs_run_at_once_on_the_same_nodes(slurm_cluster, tmp_path):
    # Each job's step, on both nodes, marks itself started and waits for the other job's
    # step on the same node: both complete only if both ran at the same time.
    script = write_script(tmp_path / "pair.sh", """
srun bash -c '
    touch "marks/$ME.$SLURMD_NODENAME"
    for _ in $(seq 300); do [[ -e "marks/$OTHER.$SLURMD_NODENAME" ]] && exit 0; sleep 0.1; done
    echo "no $OTHER on $SLURMD_NODENAME" >&2; exit 1'
""")
    (tmp_path / "marks").mkdir()
    common = ["--nodes=2", "--nodelist=node[1-2]", "--ntasks-per-node=1"]
    a = slurm_cluster.sbatch(*common, "--output=a.out", "--export=ALL,ME=a,OTHER=b", str(script),
                             cwd=tmp_path)
    b = slurm_cluster.sbatch(*common, "--output=b.out", "--export=ALL,ME=b,OTHER=a", str(script),
                             cwd=tmp_path)
    jobs = [slurm_cluster.wait_job(j, TERMINAL, timeout=45) for j in (a, b)]
    for job, name in zip(jobs, "ab"):
        assert job["JobState"] == "COMPLETED", (job, (tmp_path / f"{name}.out").read_text())
        assert job["NodeList"] == "node[1-2]"
    assert sorted(p.name for p in (tmp_path / "marks").iterdir()) == [
        "a.node1", "a.node2", "b.node1", "b.node2"]
    # Both jobs were running at once (scontrol's times have 1 s resolution).
    assert max(j["StartTime"] for j in jobs) <= min(j["EndTime"] for j in jobs)


def test_requeued_job_runs_again_with_restart_count(slurm_cluster, tmp_path):
    script = write_script(tmp_path / "requeue.sh", """
echo "run restart=${SLURM_RESTART_COUNT:-0}"
if [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
    touch started
    for _ in $(seq 600); do sleep 0.1; done
    exit 1
fi
""")
    job_id = slurm_cluster.sbatch("--requeue", "--nodes=1", "--output=out.txt", "--open-mode=append",
                                  str(script), cwd=tmp_path)
    wait_for_file(tmp_path / "started")
    slurm_cluster.run("scontrol", "requeue", job_id)
    # A requeued job waits out AuthInfo's cred_expire (10 s in up.sh) before it may start again.
    job = slurm_cluster.wait_job(job_id, TERMINAL, timeout=45)
    assert job["JobState"] == "COMPLETED", job
    assert job["Restarts"] == "1"
    runs = [line for line in (tmp_path / "out.txt").read_text().splitlines() if line.startswith("run ")]
    assert runs == ["run restart=0", "run restart=1"]


def test_scancel_signal_batch_reaches_the_batch_shell_trap(slurm_cluster, tmp_path):
    # `sleep` in small steps: bash runs a trap only between foreground commands.
    script = write_script(tmp_path / "trap.sh", """
trap 'echo "batch got USR2"; exit 0' USR2
touch started
for _ in $(seq 600); do sleep 0.1; done
exit 1
""")
    job_id = slurm_cluster.sbatch("--nodes=1", "--output=out.txt", str(script), cwd=tmp_path)
    wait_for_file(tmp_path / "started")
    slurm_cluster.run("scancel", "--signal=USR2", "--batch", job_id)
    job = slurm_cluster.wait_job(job_id, TERMINAL, timeout=30)
    assert job["JobState"] == "COMPLETED", (job, (tmp_path / "out.txt").read_text())
    assert "batch got USR2" in (tmp_path / "out.txt").read_text()


def test_scancel_signal_without_batch_reaches_every_task_of_the_steps(slurm_cluster, tmp_path):
    # Without --batch (or --full) the signal goes to the job steps' processes only: each
    # node's task traps it; the batch shell does not see it and carries on.
    script = write_script(tmp_path / "steps.sh", """
trap 'echo "batch got USR2"' USR2
srun bash -c '
    trap "echo task $SLURM_NODEID got USR2; exit 0" USR2
    touch "started.$SLURM_NODEID"
    for _ in $(seq 600); do sleep 0.1; done
    exit 1'
echo "steps done"
""")
    job_id = slurm_cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--output=out.txt", str(script),
                                  cwd=tmp_path)
    for node_id in (0, 1):
        wait_for_file(tmp_path / f"started.{node_id}")
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    job = slurm_cluster.wait_job(job_id, TERMINAL, timeout=30)
    out = (tmp_path / "out.txt").read_text()
    assert job["JobState"] == "COMPLETED", (job, out)
    assert "task 0 got USR2" in out and "task 1 got USR2" in out and "steps done" in out, out
    assert "batch got USR2" not in out, out
