"""`dlaunch run --cluster ray` on a real two-node Ray cluster (conftest.py): the same
worker code as the local backend, one Ray actor per rank, each node's ranks on a Ray
node of their own; status, logs and cancel from another process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, dlaunch, gone, metrics, only_run_dir

pytestmark = pytest.mark.integration

RECIPE = """
name: onray
model: {{name: mlp, kwargs: {{hidden: [32], dropout: 0.1}}}}
data: {{source: synthetic, samples: 400, num_features: 8, num_classes: 3, val_fraction: 0.2}}
optim: {{lr: 1.0e-2}}
engine: {{name: {engine}, zero_stage: {stage}}}
precision: {{dtype: {dtype}}}
train: {{micro_batch_size: 8, max_steps: {steps}, eval_every: 5, early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, log_every: 1, progress: false, report: false}}
"""


def write(tmp_path: Path, name: str, engine: str = "deepspeed", stage: int = 2, dtype: str = "fp32",
          steps: int = 10) -> tuple[Path, Path]:
    root = tmp_path / name
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(engine=engine, stage=stage, dtype=dtype, steps=steps, root=root))
    return recipe, root


def losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in metrics(run_dir, "train")]


@pytest.mark.parametrize("engine,stage,dtype", [("deepspeed", 2, "bf16"), ("accelerate", 0, "fp32")])
def test_a_recipe_runs_as_two_ray_nodes_and_matches_the_local_backend(tmp_path, ray_cluster, engine,
                                                                       stage, dtype):
    recipe, root = write(tmp_path, "ray", engine, stage, dtype)
    on_ray = ray_cluster.dlaunch("run", str(recipe), "--cluster", "ray", "--address", ray_cluster.address,
                     "--nodes", "2", "--procs-per-node", "1")
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    run_dir = only_run_dir(root)
    job = json.loads((run_dir / "ray" / "job.json").read_text())
    assert job["state"] == "COMPLETED"
    assert len(set(job["ray_nodes"])) == 2, "the two nodes' ranks shared a Ray node"
    assert job["address"].endswith(ray_cluster.address.split(":")[1])
    assert [(run_dir / "logs" / f"rank-{r}.status").read_text() for r in (0, 1)] == ["done\n"] * 2

    local_recipe, local_root = write(tmp_path, "local", engine, stage, dtype)
    local = dlaunch("run", str(local_recipe), "--nodes", "2", "--procs-per-node", "1")
    assert local.returncode == 0, local.stderr[-3000:]
    expected = losses(only_run_dir(local_root))
    assert len(expected) == 10
    assert losses(run_dir) == pytest.approx(expected, rel=1e-6)


def test_a_job_needing_more_nodes_than_the_cluster_has_fails_before_anything_runs(tmp_path, ray_cluster):
    recipe, root = write(tmp_path, "three")
    result = ray_cluster.dlaunch("run", str(recipe), "--cluster", "ray", "--address", ray_cluster.address,
                                 "--nodes", "3")
    assert result.returncode == 2
    assert "error: cluster.nodes" in result.stderr
    assert "needs 3 Ray nodes and the cluster has 2" in result.stderr
    assert not root.exists() or not any(root.iterdir())


def _pid_of_rank(run_dir: Path, rank: int) -> int:
    line = next(line for line in (run_dir / "logs" / f"rank-{rank}.log").read_text().splitlines()
                if f"rank {rank} of" in line)
    return int(line.rsplit("pid ", 1)[1])


def test_folds_on_ray_run_one_job_after_another_and_are_summarized(tmp_path, ray_cluster):
    recipe, root = write(tmp_path, "folds", "accelerate", 0)
    result = ray_cluster.dlaunch("run", str(recipe), "--cluster", "ray", "--address", ray_cluster.address,
                                 "--nodes", "2", "--procs-per-node", "1", "--folds", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    group = only_run_dir(root)
    jobs = [json.loads((group / f"fold-{fold}" / "ray" / "job.json").read_text()) for fold in (0, 1)]
    assert [job["state"] for job in jobs] == ["COMPLETED"] * 2 and jobs[0]["job_id"] != jobs[1]["job_id"]
    accs = [metrics(group / f"fold-{fold}", "summary")[0]["val_acc"] for fold in (0, 1)]
    assert json.loads((group / "folds.json").read_text())["val_acc"]["mean"] == pytest.approx(sum(accs) / 2)
    assert "over 2 folds" in result.stdout


def test_a_script_runs_as_two_ray_nodes_with_torchruns_environment(tmp_path, ray_cluster):
    """`--script` on Ray: each rank the script under torchrun's variables, the two nodes'
    ranks on two Ray nodes, one process group over both, the arguments after `--` its own."""
    script = tmp_path / "report.py"
    script.write_text(
        "import json, os, sys\nimport torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "keys = ['RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'NODE_RANK', 'GROUP_RANK']\n"
        "seen = [None] * dist.get_world_size()\n"
        "dist.all_gather_object(seen, {k: os.environ[k] for k in keys})\n"
        "if dist.get_rank() == 0:\n"
        "    json.dump({'ranks': seen, 'argv': sys.argv[1:]}, open(os.path.join(sys.argv[1], 'seen.json'), 'w'))\n"
        "dist.destroy_process_group()\n")
    result = ray_cluster.dlaunch("run", "--cluster", "ray", "--address", ray_cluster.address, "--script", str(script),
                                 "--nodes", "2", "--procs-per-node", "2", "--set", f"logging.run_root={tmp_path / 'runs'}",
                                 "--", str(tmp_path), "--flag")
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["argv"] == [str(tmp_path), "--flag"]
    assert [(r["RANK"], r["LOCAL_RANK"], r["NODE_RANK"], r["GROUP_RANK"]) for r in seen["ranks"]] == [
        ("0", "0", "0", "0"), ("1", "1", "0", "0"), ("2", "0", "1", "1"), ("3", "1", "1", "1")]
    assert {(r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"]) for r in seen["ranks"]} == {("4", "2")}
    job = json.loads((only_run_dir(tmp_path / "runs") / "ray" / "job.json").read_text())
    assert job["state"] == "COMPLETED" and len(set(job["ray_nodes"])) == 2


@contextmanager
def long_job(tmp_path: Path, ray_cluster, name: str, **output) -> Iterator[tuple[subprocess.Popen, Path]]:
    """(driver, run dir) of a `dlaunch run --cluster ray` of an endless job on two nodes,
    once its ranks train; a driver still running at the end is stopped with its job.
    ``output``: the driver's stdout and stderr, as Popen takes them."""
    recipe, root = write(tmp_path, name, steps=100000)
    driver = subprocess.Popen(ray_cluster.loopback.command(
        sys.executable, "-m", "launcher", "run", str(recipe), "--cluster", "ray", "--address", ray_cluster.address,
        "--nodes", "2"), cwd=REPO, text=True, **output)
    try:
        deadline = time.monotonic() + 300
        # Not a hidden entry: the run directory is made under a dot-name and renamed into place.
        while not (root.exists() and any(not p.name.startswith(".") for p in root.iterdir())
                   and (only_run_dir(root) / "metrics.jsonl").exists() and metrics(only_run_dir(root), "train")):
            assert driver.poll() is None and time.monotonic() < deadline, \
                (driver.stdout or driver.stderr).read() if driver.poll() is not None else ""
            time.sleep(0.5)
        yield driver, only_run_dir(root)
    finally:
        if driver.poll() is None:
            driver.terminate()  # it stops its job
            driver.wait(60)


def test_status_logs_and_cancel_work_from_another_process(tmp_path, ray_cluster):
    with long_job(tmp_path, ray_cluster, "long", stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as (driver, run_dir):
        status = ray_cluster.dlaunch("status", str(run_dir))
        assert status.returncode == 0 and " RUNNING " in status.stdout, status.stdout + status.stderr
        log = ray_cluster.dlaunch("logs", str(run_dir), "--rank", "1")
        assert "rank 1 of 2 on node 1" in log.stdout
        pids = [_pid_of_rank(run_dir, rank) for rank in (0, 1)]

        cancel = ray_cluster.dlaunch("cancel", str(run_dir))
        assert cancel.returncode == 0, cancel.stderr
        assert driver.wait(60) == 128 + signal.SIGTERM
        last_line = driver.stdout.read().splitlines()[-1]
        assert last_line.startswith(f"dlaunch: stopped; `dlaunch run --resume {run_dir}` continues it from ")
    assert ray_cluster.dlaunch("status", str(run_dir)).stdout.split()[1] == "CANCELLED"
    assert all(gone(pid) for pid in pids)
    assert [(run_dir / "logs" / f"rank-{r}.status").read_text() for r in (0, 1)] == ["terminated: SIGTERM\n"] * 2


def test_a_ray_run_stopped_midway_resumes_on_the_cluster_its_plan_names(tmp_path, ray_cluster):
    """Ctrl-C to the driver, then `dlaunch run --resume RUN_DIR` as the stop line says: no
    --address (a resume takes none), the same cluster, from the checkpoint the stop left."""
    recipe, root = write(tmp_path, "stopped", steps=300)
    driver = subprocess.Popen(ray_cluster.loopback.command(
        sys.executable, "-m", "launcher", "run", str(recipe), "--cluster", "ray", "--address", ray_cluster.address,
        "--nodes", "2"), cwd=REPO, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not list(root.glob("*/checkpoints/latest")) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 128 + signal.SIGINT, err[-3000:]
    run_dir = only_run_dir(root)
    checkpoint = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert err.splitlines()[-1] == (f"dlaunch: interrupted; `dlaunch run --resume {run_dir}` continues it "
                                    f"from checkpoint {checkpoint}")

    resumed = ray_cluster.dlaunch("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["checkpoint"] for r in metrics(run_dir, "resume")] == [checkpoint]
    assert metrics(run_dir, "summary")[0]["steps"] == 300
    assert json.loads((run_dir / "ray" / "job.json").read_text())["state"] == "COMPLETED"


def test_a_hangup_to_the_driver_stops_the_job(tmp_path, ray_cluster):
    """SIGHUP (the driver's SSH session closed) stops the job as SIGTERM does, rather than
    leaving its ranks to Ray with no driver: exit 129 and the stop line."""
    with long_job(tmp_path, ray_cluster, "hangup", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as (driver, run_dir):
        pids = [_pid_of_rank(run_dir, rank) for rank in (0, 1)]
        driver.send_signal(signal.SIGHUP)
        _, err = driver.communicate(timeout=60)
    assert driver.returncode == 128 + signal.SIGHUP, err[-3000:]
    assert err.splitlines()[-1].startswith(f"dlaunch: stopped; `dlaunch run --resume {run_dir}` continues it from ")
    assert ray_cluster.dlaunch("status", str(run_dir)).stdout.split()[1] == "CANCELLED"
    assert all(gone(pid) for pid in pids)


def test_without_an_address_a_ray_instance_runs_for_the_command(tmp_path, loopback):
    recipe, root = write(tmp_path, "embedded")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(loopback.command(sys.executable, "-m", "launcher", "run", str(recipe), "--cluster",
                                             "ray", "--nodes", "2"),
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Started a local Ray instance" in result.stderr
    run_dir = only_run_dir(root)
    assert json.loads((run_dir / "ray" / "job.json").read_text())["state"] == "COMPLETED"
    assert len(losses(run_dir)) == 10


def test_every_ray_server_binds_the_loopback_address_alone(ray_cluster):
    listening = ray_cluster.loopback.listening()
    assert int(ray_cluster.address.rpartition(":")[2]) in {port for _, port in listening}  # the GCS
    assert len(listening) > 5, listening  # GCS, raylets, object managers, agents, workers
    assert {str(address) for address, _ in listening} <= {"127.0.0.1", "::1"}, listening
