"""Node loss: one node's agent SIGKILLed mid-run, on the local backend's 4-node emulation
and on the real Slurm dev cluster. With a restart left (train.max_restarts: 1) the job
starts every agent again and resumes from the checkpoint before the loss: locally it ends
with the weights of an uninterrupted 4-node run. (With none left, the run ends at once
naming the agent: tests/integration/test_local_backend.py.)

The test finds the agent by pid, never by name: the parent of a rank's worker, whose pid
the rank's log gives. So that it strikes mid-run, rank 0 hangs in the first attempt where
it would load step 9's batch (a DLAUNCH_FAULTS hang), after step 8's checkpoint; the
second attempt does not hang.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from launcher.faults import spec
from launcher.progress import read_position
from tests.conftest import REPO, assert_same_weights, dlaunch, metrics, only_run_dir

pytestmark = pytest.mark.integration

HOST = socket.gethostname()
HANG_S = 240
"""Far beyond any run here: reaching it means a hang, not a slow machine."""
HOLD_AT_STEP_9 = spec({"kind": "hang", "rank": 0, "step": 9, "where": "data"})
RECIPE = """
name: node-loss
model: {name: mlp, kwargs: {hidden: [32], dropout: 0.1}}
data: {source: synthetic, samples: 400, num_features: 8, num_classes: 3, val_fraction: 0.2}
optim: {lr: 1.0e-2}
schedule: {name: cosine, warmup_steps: 3}
engine: {name: deepspeed, zero_stage: 2}
precision: {dtype: fp32}
train: {micro_batch_size: 8, max_steps: 12, eval_every: 4, checkpoint_every: 4, keep_last: 2,
        early_stopping: {patience: null}}
logging: {progress: false, report: false}
"""


def run_args(root: Path, nodes: int, restarts: int) -> list[str]:
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    return [str(recipe), "--nodes", str(nodes), "--procs-per-node", "1", "--set", f"logging.run_root={root / 'runs'}",
            "--set", f"train.max_restarts={restarts}"]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {HANG_S}s"
        time.sleep(0.2)


def held_at_step_9(run_dir: Path) -> bool:
    """Step 8's checkpoint is written and rank 0 hangs in step 9's data."""
    position = read_position(run_dir, 0)
    latest = run_dir / "checkpoints" / "latest"
    return (position is not None and position[:2] == (9, "data") and latest.exists()
            and latest.read_text().strip() == "step-00000008")


def agent_of(run_dir: Path, rank: int) -> int:
    """The pid of the torch elastic agent running ``rank``: its worker's parent (torchrun,
    or on the local backend's CPU runs launcher/agent.py, which forks its workers)."""
    starts = re.findall(rf"rank {rank} of \d+ on node \d+, pid (\d+)$",
                        (run_dir / "logs" / f"rank-{rank}.log").read_text(), re.MULTILINE)
    agent = parent_of(int(starts[-1]))
    assert re.search(rb"-m\0(torch\.distributed\.run|launcher\.agent)\0", Path(f"/proc/{agent}/cmdline").read_bytes())
    return agent


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # after the command name: state, ppid


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted 4-node run."""
    root = tmp_path_factory.mktemp("straight")
    result = dlaunch("run", *run_args(root, nodes=4, restarts=0))
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run_dir(root / "runs")


def test_a_node_agent_killed_mid_run_restarts_the_job_which_ends_with_the_uninterrupted_weights(
        straight, tmp_path):
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        run = subprocess.Popen([sys.executable, "-m", "launcher", "run", *run_args(tmp_path, nodes=4, restarts=1)],
                               cwd=REPO, env={**os.environ, **HOLD_AT_STEP_9}, stdout=out, stderr=err)
    try:
        # Not a hidden entry: the run directory is made under a dot-name and renamed into place.
        wait_until(lambda: (tmp_path / "runs").exists()
                   and any(not p.name.startswith(".") for p in (tmp_path / "runs").iterdir()), "no run dir")
        run_dir = only_run_dir(tmp_path / "runs")
        wait_until(lambda: held_at_step_9(run_dir), "rank 0 never reached step 9")
        agent = agent_of(run_dir, 0)  # node 0's, the one that hosts the rendezvous store
        # The 4 agents were forked warm from one process and left to the CLI, which supervises them.
        assert b"--fork-nodes\x004\x00" in Path(f"/proc/{agent}/cmdline").read_bytes()
        assert parent_of(agent) == run.pid
        os.kill(agent, signal.SIGKILL)
        assert run.wait(HANG_S) == 0, (tmp_path / "err").read_text()[-3000:]
    finally:
        run.terminate()  # a no-op once it has ended; else it stops its job
        run.wait(HANG_S)
    stderr = (tmp_path / "err").read_text()
    assert (f"error: the agent of node 0 on {HOST} (pid {agent}) was killed by SIGKILL; rank 0 died with it at "
            "step 9 (data)\n") in stderr
    assert stderr.count("dlaunch: restarting") == 1
    assert "dlaunch: restarting (1 of 1) from checkpoint step-00000008" in stderr
    assert [r["step"] for r in metrics(run_dir, "resume")] == [8]
    assert_same_weights(run_dir, straight)


@pytest.mark.slurm
def test_on_slurm_a_node_agent_killed_mid_run_restarts_the_job_which_resumes(slurm_cluster, tmp_path):
    submitted = slurm_cluster.dlaunch("submit", "--cluster", "slurm", *run_args(tmp_path, nodes=2, restarts=1),
                                      env=HOLD_AT_STEP_9)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.strip()
    run_dir = only_run_dir(tmp_path / "runs")
    wait_until(lambda: held_at_step_9(run_dir), "rank 0 never reached step 9")
    os.kill(agent_of(run_dir, 0), signal.SIGKILL)
    wait_until(lambda: slurm_cluster.job(job_id)["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"),
               "the job never ended")
    output = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert slurm_cluster.job(job_id)["JobState"] == "COMPLETED", output[-3000:]
    assert re.search(r"^error: rank 0 \(node 0 on node[1-4], local rank 0\) failed at step 9 \(data\): killed",
                     output, re.MULTILINE), output[-3000:]
    assert output.count("dlaunch: restarting") == 1
    assert "dlaunch: restarting (1 of 1) from checkpoint step-00000008" in output
    assert [r["step"] for r in metrics(run_dir, "resume")] == [8]
    assert metrics(run_dir, "summary")[-1]["steps"] == 12
