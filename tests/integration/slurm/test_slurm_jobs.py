"""dlaunch jobs on the real dev Slurm cluster: recipes as multi-node sbatch jobs that
match the local backend, job control, the per-node and port pitfalls, a failing node,
shell injection, and preemption with requeue."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TERMINAL, dlaunch, kill_after, metrics, only_run_dir

SCRIPT_REPORTS_ENV = """\
import json, os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "A", "B",
        "SLURM_JOB_ID"]
out = os.path.join(sys.argv[1], f"rank-{os.environ['RANK']}-{os.environ['SLURM_JOB_ID']}.json")
json.dump({k: os.environ.get(k) for k in keys}, open(out, "w"))
dist.barrier()
dist.destroy_process_group()
"""


def submit(cluster, *args: str) -> str:
    result = cluster.dlaunch("submit", "--cluster", "slurm", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def wait_for(cluster, job_id: str, timeout: float = 600) -> str:
    """Wait until the job has ended; its final state, as `dlaunch status` reports it.
    The wait polls scontrol: `dlaunch status` once a second cost the suite more CPU than
    many of the jobs it waited for."""
    cluster.wait_job(job_id, TERMINAL, timeout=timeout)
    status = cluster.dlaunch("status", job_id)
    assert status.returncode == 0, status.stderr
    return status.stdout.split()[1]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir, "train")]


def local_run(tmp_path, recipe: str, *args: str) -> Path:
    root = tmp_path / "local"
    result = dlaunch("run", recipe, "--set", f"logging.run_root={root}", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run_dir(root)


@pytest.mark.parametrize("nodes,procs,engine", [
    (4, 1, ("--set", "engine.name=deepspeed")),                                 # ZeRO-2, bf16
    (2, 2, ("--set", "engine.name=accelerate", "--set", "engine.zero_stage=0")),  # DDP, bf16
])
def test_quickstart_as_slurm_job_matches_the_local_backend(slurm_cluster, tmp_path, nodes, procs, engine):
    recipe = "recipes/quickstart.yaml"
    # One core a node, as on the local backend, whose nodes share this host's two: the
    # same threads on both (a float sum's order), and four nodes do not oversubscribe them.
    common = ("--nodes", str(nodes), "--procs-per-node", str(procs), "--set", "train.epochs=2",
              "--set", "cluster.slurm.cpus_per_task=1",
              "--set", "logging.progress=false", "--set", "logging.report=false", *engine)
    job_id = submit(slurm_cluster, recipe, "--set", f"logging.run_root={tmp_path / 'slurm'}", *common)
    assert wait_for(slurm_cluster, job_id) == "COMPLETED"
    on_slurm = only_run_dir(tmp_path / "slurm")
    assert (on_slurm / "slurm" / "job_id").read_text().strip() == job_id
    locally = local_run(tmp_path, recipe, *common)
    assert train_losses(on_slurm) == pytest.approx(train_losses(locally), rel=1e-4)
    assert metrics(on_slurm, "summary")[0]["val_acc"] == pytest.approx(
        metrics(locally, "summary")[0]["val_acc"], abs=1e-6)


def test_four_nodes_see_four_node_ranks_and_two_jobs_on_the_same_nodes_do_not_collide(
        slurm_cluster, tmp_path):
    script = tmp_path / "report.py"
    script.write_text(SCRIPT_REPORTS_ENV)
    out = tmp_path / "out"
    out.mkdir()
    # Two 4-node jobs at once on the same four nodes (one host): a fixed port would collide.
    jobs = [submit(slurm_cluster, "--script", str(script), "--nodes", "4", "--procs-per-node", "1",
                   "--set", f"logging.run_root={tmp_path / f'runs{i}'}", "--", str(out)) for i in (1, 2)]
    assert [wait_for(slurm_cluster, job) for job in jobs] == ["COMPLETED", "COMPLETED"]
    for job in jobs:
        seen = [json.loads(p.read_text()) for p in out.glob(f"rank-*-{job}.json")]
        assert sorted(int(s["RANK"]) for s in seen) == [0, 1, 2, 3]
        assert sorted(s["NODE_RANK"] for s in seen) == ["0", "1", "2", "3"]
    ports = {json.loads(p.read_text())["MASTER_PORT"] for p in out.glob("rank-0-*.json")}
    assert len(ports) == 2


def test_a_failing_node_ends_the_job_naming_node_and_rank(slurm_cluster, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import os\nimport torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "if os.environ['RANK'] == '2':\n"
        "    raise RuntimeError('disk on fire')\n"
        "dist.barrier()\n")
    result = slurm_cluster.dlaunch("run", "--cluster", "slurm", "--script", str(script), "--nodes", "4",
                     "--procs-per-node", "1", "--set", f"logging.run_root={tmp_path}",
                     timeout=600)
    assert result.returncode == 1
    assert re.search(r"error: rank 2 \(node \d on node[1-4], local rank 0\) failed: ", result.stderr)
    assert "RuntimeError: disk on fire" in result.stderr


def test_an_unresolvable_rendezvous_host_fails_loudly_naming_it(slurm_cluster, tmp_path):
    # As in a container without scontrol whose fallback name no node knows.
    recipe = tmp_path / "lost.yaml"
    recipe.write_text(json.dumps({"cluster": {"slurm": {
        "setup": ["scontrol() { echo nowhere.invalid; }"]}}}))
    script = tmp_path / "never.py"
    script.write_text("raise SystemExit('the agents must not start')\n")
    result = slurm_cluster.dlaunch("run", str(recipe), "--cluster", "slurm", "--script", str(script), "--nodes", "2",
                     "--set", f"logging.run_root={tmp_path / 'runs'}", timeout=120)
    assert result.returncode == 1
    assert "error: rendezvous host 'nowhere.invalid' does not resolve" in result.stderr


def test_status_logs_and_cancel_of_a_real_job(slurm_cluster, tmp_path):
    script = tmp_path / "sleepy.py"
    script.write_text("import logging, time\nlogging.getLogger('launcher').info('sleeping now')\n"
                      "time.sleep(600)\n")
    job_id = submit(slurm_cluster, "--script", str(script), "--nodes", "2",
                    "--set", f"logging.run_root={tmp_path / 'runs'}")
    run_dir = only_run_dir(tmp_path / "runs")
    deadline = time.monotonic() + 300
    while "sleeping now" not in slurm_cluster.dlaunch("logs", str(run_dir), "--rank", "1").stdout:
        assert time.monotonic() < deadline, "rank 1 never logged"
        time.sleep(1)
    status = slurm_cluster.dlaunch("status", str(run_dir))
    assert status.stdout.split()[:2] == [job_id, "RUNNING"]
    cancelled = slurm_cluster.dlaunch("cancel", job_id)
    assert cancelled.returncode == 0
    assert wait_for(slurm_cluster, job_id) == "CANCELLED"


def test_shell_metacharacters_in_job_name_and_env_run_nothing(slurm_cluster, tmp_path):
    marker = tmp_path / "pwned"
    nasty = f"$(touch {marker}) `touch {marker}` ; touch {marker} \"'"
    recipe = tmp_path / "nasty.yaml"
    recipe.write_text(json.dumps({"cluster": {"slurm": {
        "job_name": f"job {nasty}", "env": {"A": nasty, "B": "it's \\\"quoted\\\""}}}}))
    script = tmp_path / "report.py"
    script.write_text(SCRIPT_REPORTS_ENV)
    out = tmp_path / "out"
    out.mkdir()
    job_id = submit(slurm_cluster, str(recipe), "--script", str(script), "--nodes", "2",
                    "--set", f"logging.run_root={tmp_path / 'runs'}", "--", str(out))
    assert wait_for(slurm_cluster, job_id) == "COMPLETED"
    assert not marker.exists()
    [seen] = [json.loads(p.read_text()) for p in out.glob("rank-0-*.json")]
    assert seen["A"] == nasty
    assert seen["B"] == "it's \\\"quoted\\\""
    name = slurm_cluster.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%j").stdout.rstrip("\n")
    assert name == f"job {nasty}"


PREEMPTIBLE = """
name: preempt
model: {{name: mlp, kwargs: {{hidden: [512, 512]}}}}
data: {{source: synthetic, samples: 4096, num_features: 128, num_classes: 4}}
engine: {{name: deepspeed, zero_stage: 2}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 16, max_steps: 450, eval_every: 150, checkpoint_every: 150,
        early_stopping: {{patience: null}}}}
logging: {{run_root: {root}, progress: false, report: false, log_every: 5}}
cluster: {{slurm: {{cpus_per_task: 1}}}}  # one thread a rank, as the local run's
"""


def records(run_dir: Path, kind: str) -> list[dict]:
    return metrics(run_dir, kind) if (run_dir / "metrics.jsonl").exists() else []


def wait_until(condition, what: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_preempted_twice_requeues_resumes_and_ends_with_the_unpreempted_weights(slurm_cluster, tmp_path):
    recipe = tmp_path / "preempt.yaml"
    recipe.write_text(PREEMPTIBLE.format(root=tmp_path / "slurm"))
    job_id = submit(slurm_cluster, str(recipe), "--nodes", "2", "--procs-per-node", "1")
    run_dir = only_run_dir(tmp_path / "slurm")
    preempted_at = 0
    # The configured signal first (what --signal sends before the time limit), then
    # Slurm's own requeue (SIGTERM to every process, SIGKILL after KillWait).
    for count, preempt in ((1, ("scancel", "--signal=USR2", job_id)), (2, ("scontrol", "requeue", job_id))):
        # Mid-training: this attempt has run 50 steps past the last preemption.
        wait_until(lambda after=preempted_at: max((r["step"] for r in records(run_dir, "train")), default=0)
                   > after + 50,
                   f"no training progress before preemption {count}")
        slurm_cluster.run(*preempt)
        wait_until(lambda n=count: len(records(run_dir, "preempted")) == n, f"preemption {count} not recorded")
        preempted_at = records(run_dir, "preempted")[-1]["step"]
    assert wait_for(slurm_cluster, job_id, timeout=600) == "COMPLETED"
    assert int(slurm_cluster.job(job_id)["Restarts"]) == 2
    # Each requeued attempt went on from the checkpoint its preemption wrote.
    assert ([r["checkpoint"] for r in metrics(run_dir, "resume")]
            == [f"step-{r['step']:08d}" for r in metrics(run_dir, "preempted")])
    assert metrics(run_dir, "summary")[-1]["steps"] == 450
    # The processes of a preempted attempt end on Slurm's SIGTERM rather than wait for its
    # SIGKILL KillWait seconds later, which delayed each requeue by as much and left every
    # task "Killed". One task may still end "Killed" (seen once in CI): srun SIGKILLs a
    # step's tasks once one has exited non-zero (--kill-on-bad-exit). So what each
    # attempt must show is a task that exited on its own.
    job_output = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert len(re.findall(r"task \d+: Exited with exit code", job_output)) >= 2

    plain = tmp_path / "plain.yaml"
    plain.write_text(PREEMPTIBLE.format(root=tmp_path / "local"))
    result = dlaunch("run", str(plain), "--nodes", "2", "--procs-per-node", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = torch.load(only_run_dir(tmp_path / "local") / "model.pt")
    actual = torch.load(run_dir / "model.pt")
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs after two preemptions"


def test_a_run_whose_slurm_job_is_still_queued_refuses_a_resume(slurm_cluster, tmp_path):
    """No rank of a pending job runs to hold a life lock: Slurm says it is not over."""
    script = tmp_path / "sleepy.py"
    script.write_text("import time\ntime.sleep(600)\n")
    first = submit(slurm_cluster, "--script", str(script), "--set", f"logging.run_root={tmp_path / 'a'}")
    waiting = submit(slurm_cluster, "--script", str(script), "--dependency", f"afterok:{first}",
                     "--set", f"logging.run_root={tmp_path / 'b'}")
    try:
        run_dir = only_run_dir(tmp_path / "b")
        resumed = slurm_cluster.dlaunch("run", "--resume", str(run_dir))
        assert (resumed.returncode, resumed.stderr) == (
            2, f"error: --resume: {run_dir} is still Slurm job {waiting}'s (PENDING); wait for it to end, "
               f"or `dlaunch cancel {run_dir}`\n")
    finally:
        slurm_cluster.run("scancel", first, waiting)
    assert [wait_for(slurm_cluster, job) for job in (first, waiting)] == ["CANCELLED", "CANCELLED"]


def test_dependency_chains_jobs(slurm_cluster, tmp_path):
    first = tmp_path / "first.py"
    first.write_text("import pathlib, sys, time\ntime.sleep(3)\n"
                     "pathlib.Path(sys.argv[1], 'first-done').write_text('yes')\n")
    second = tmp_path / "second.py"
    second.write_text("import pathlib, sys\n"
                      "assert pathlib.Path(sys.argv[1], 'first-done').exists(), 'ran before the first job'\n")
    job_a = submit(slurm_cluster, "--script", str(first), "--set", f"logging.run_root={tmp_path / 'a'}",
                   "--", str(tmp_path))
    job_b = submit(slurm_cluster, "--script", str(second), "--dependency", f"afterok:{job_a}",
                   "--set", f"logging.run_root={tmp_path / 'b'}", "--", str(tmp_path))
    assert slurm_cluster.job(job_b)["JobState"] == "PENDING"
    assert [wait_for(slurm_cluster, job) for job in (job_a, job_b)] == ["COMPLETED", "COMPLETED"]


def test_array_job_trains_each_grid_point_in_its_own_run_dir(slurm_cluster, tmp_path):
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(json.dumps({
        "name": "grid", "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
        "data": {"source": "synthetic", "samples": 640, "num_features": 16, "num_classes": 4},
        "precision": {"dtype": "fp32"}, "engine": {"name": "accelerate"},
        "train": {"micro_batch_size": 16, "max_steps": 20},
        "logging": {"run_root": str(tmp_path / "runs"), "progress": False},
        "cluster": {"slurm": {"cpus_per_task": 1}}}))
    jobs = submit(slurm_cluster, str(recipe), "--nodes", "2", "--array", "optim.lr=[0.001, 0.01]").split()
    assert len(jobs) == 2 and jobs[0].endswith("_0") and jobs[1].endswith("_1")
    assert [wait_for(slurm_cluster, job) for job in jobs] == ["COMPLETED", "COMPLETED"]
    for index, lr in enumerate((0.001, 0.01)):
        [run_dir] = (tmp_path / "runs").glob(f"grid-*-a{index}")
        plan = json.loads((run_dir / "plan.json").read_text())
        assert plan["recipe"]["optim"]["lr"] == lr
        assert metrics(run_dir, "summary")[0]["steps"] == 20
        assert (run_dir / "logs" / f"slurm-{jobs[index]}.out").exists()


def test_folds_that_failed_on_slurm_resume_as_one_array_job_from_their_checkpoints(slurm_cluster, tmp_path):
    """Every fold's rank 0 killed after step 5: the folds directory's resume runs what is
    left (fold 0 was resumed on its own meanwhile) as one array job, and so does its
    --dry-run's script, which once all are done has nothing left to show."""
    recipe = tmp_path / "folds.yaml"
    recipe.write_text(json.dumps({
        "name": "cv", "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
        "data": {"source": "synthetic", "samples": 400, "num_features": 8, "num_classes": 3},
        "precision": {"dtype": "fp32"}, "engine": {"name": "accelerate"},
        "train": {"micro_batch_size": 16, "max_steps": 10, "checkpoint_every": 5, "max_restarts": 0,
                  "early_stopping": {"patience": None}},
        "logging": {"run_root": str(tmp_path / "runs"), "progress": False, "report": False},
        "cluster": {"slurm": {"cpus_per_task": 1}}}))
    failed = slurm_cluster.dlaunch("run", "--cluster", "slurm", str(recipe), "--folds", "3", env=kill_after(5))
    assert failed.returncode == 1, failed.stderr[-3000:]
    group = only_run_dir(tmp_path / "runs")
    assert failed.stderr.splitlines()[-1] == (f"dlaunch: folds 0, 1, 2 failed; `dlaunch run --resume {group}` "
                                              "continues the folds with fold 0 from checkpoint step-00000005, "
                                              "then folds 1, 2")
    assert slurm_cluster.dlaunch("run", "--resume", str(group / "fold-0")).returncode == 0

    dry = slurm_cluster.dlaunch("run", "--resume", str(group), "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "#SBATCH --array=1-2" in dry.stdout and str(group / "fold-0") not in dry.stdout
    assert all(str(group / f"fold-{fold}") in dry.stdout for fold in (1, 2))

    resumed = slurm_cluster.dlaunch("run", "--resume", str(group))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.splitlines()[0] == (f"dlaunch: resuming {group}: fold 1 from checkpoint "
                                              "step-00000005, then fold 2")
    tasks = [(group / f"fold-{fold}" / "slurm" / "job_id").read_text().strip() for fold in (1, 2)]
    assert len({task.split("_")[0] for task in tasks}) == 1, f"the folds ran as separate jobs {tasks}"
    assert [task.split("_")[1] for task in tasks] == ["1", "2"], "a task not numbered by its fold"
    # Each task wrote its output into its own run directory, which its job id names.
    assert all((group / f"fold-{fold}" / "logs" / f"slurm-{task}.out").exists() for fold, task in zip((1, 2), tasks))
    assert slurm_cluster.dlaunch("status", tasks[1]).stdout.split() == [tasks[1], "COMPLETED", str(group / "fold-2")]
    for fold in (0, 1, 2):
        assert [r["step"] for r in metrics(group / f"fold-{fold}", "resume")] == [5]
        assert metrics(group / f"fold-{fold}", "summary")[0]["steps"] == 10
    assert "over 3 folds" in resumed.stdout and (group / "folds.json").exists()

    done = slurm_cluster.dlaunch("run", "--resume", str(group), "--dry-run")
    assert (done.returncode, done.stdout) == (0, ""), done.stderr[-3000:]
    assert done.stderr == f"dlaunch: {group}: all 3 folds finished; nothing to resume\n"


def tracked_job(slurm_cluster, tmp_path: Path, max_steps: int, env: dict[str, str] | None = None):
    """A job that logs to an MLflow store of its own: its job id, run dir and client."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path}/mlflow.db"
    recipe = tmp_path / "tracked.yaml"
    recipe.write_text(json.dumps({
        "name": "tracked", "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "data": {"source": "synthetic", "samples": 400, "num_features": 8, "num_classes": 3},
        "precision": {"dtype": "fp32"}, "engine": {"name": "accelerate"},
        "train": {"micro_batch_size": 16, "max_steps": max_steps, "early_stopping": {"patience": None}},
        "logging": {"run_root": str(tmp_path / "runs"), "progress": False, "report": False, "log_every": 1,
                    "mlflow": {"enabled": True, "tracking_uri": store}},
        "cluster": {"slurm": {"cpus_per_task": 1}}}))
    submitted = slurm_cluster.dlaunch("submit", "--cluster", "slurm", str(recipe), env=env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    return submitted.stdout.strip(), only_run_dir(tmp_path / "runs"), MlflowClient(tracking_uri=store)


def mlflow_run(client):
    [run] = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    return run


def test_a_job_whose_rank_0_is_killed_is_failed_in_mlflow_by_its_batch_script(slurm_cluster, tmp_path):
    """Rank 0 SIGKILLed tells MLflow nothing, and `dlaunch submit` does not wait to: the
    batch script ends the run that would otherwise show as RUNNING for good."""
    job_id, _, client = tracked_job(slurm_cluster, tmp_path, 20, env=kill_after(3))
    assert wait_for(slurm_cluster, job_id) == "FAILED"
    run = mlflow_run(client)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert run.info.status == "FAILED"


def test_a_training_job_that_dlaunch_cancel_ends_stays_cancelled_and_is_killed_in_mlflow(slurm_cluster, tmp_path):
    """scancel SIGTERMs the ranks as a preemption does, and they checkpoint; but a
    cancelled job is not requeued (Slurm would requeue it), and its MLflow run ends."""
    job_id, run_dir, client = tracked_job(slurm_cluster, tmp_path, 100000)
    try:
        wait_until(lambda: records(run_dir, "train"), "the job never trained")
        assert mlflow_run(client).info.status == "RUNNING"
    finally:
        cancelled = slurm_cluster.dlaunch("cancel", str(run_dir))
    assert cancelled.returncode == 0, cancelled.stderr
    assert wait_for(slurm_cluster, job_id, timeout=120) == "CANCELLED"
    assert slurm_cluster.job(job_id)["Restarts"] == "0"
    assert not records(run_dir, "resume")
    assert mlflow_run(client).info.status == "KILLED"


def test_logs_follow_prints_the_output_until_the_job_ends(slurm_cluster, tmp_path):
    script = tmp_path / "ticks.py"
    script.write_text("import time\nfor i in range(5):\n    print(f'tick {i}', flush=True)\n    time.sleep(1)\n")
    job_id = submit(slurm_cluster, "--script", str(script), "--set", f"logging.run_root={tmp_path / 'runs'}")
    followed = slurm_cluster.dlaunch("logs", "-f", job_id, timeout=400)
    assert followed.returncode == 0
    assert [line for line in followed.stdout.splitlines() if line.startswith("tick")] == \
        [f"tick {i}" for i in range(5)]
    assert slurm_cluster.job(job_id)["JobState"] == "COMPLETED"


def test_ctrl_c_stops_the_wait_and_the_follow_not_the_slurm_job(slurm_cluster, tmp_path):
    """`dlaunch run --cluster slurm` waits for its job; Ctrl-C ends the wait (exit 130,
    one line naming the job and how to follow or cancel it), not the job. So does Ctrl-C
    to `dlaunch logs -f`."""
    script = tmp_path / "sleepy.py"
    script.write_text("import time\nprint('sleeping now', flush=True)\ntime.sleep(600)\n")
    root = tmp_path / "runs"

    def interrupted(*args: str) -> tuple[int, str]:
        process = subprocess.Popen(slurm_cluster.command(sys.executable, "-m", "launcher", *args), cwd=REPO,
                                   env=slurm_cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
        try:
            deadline = time.monotonic() + 300
            while not (root.exists() and list(root.glob("*/logs/slurm-*.out"))
                       and "sleeping now" in next(root.glob("*/logs/slurm-*.out")).read_text()):
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
            time.sleep(1)  # `logs -f` has printed and sleeps; `run` polls the job
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=60)
        finally:
            process.kill()  # no-op once it has ended
            process.wait()
        return process.returncode, err

    code, err = interrupted("run", "--cluster", "slurm", "--script", str(script), "--set", f"logging.run_root={root}")
    run_dir = only_run_dir(root)
    job_id = (run_dir / "slurm" / "job_id").read_text().strip()
    try:
        assert code == 130 and "Traceback" not in err, err
        assert err.splitlines()[-1] == (f"dlaunch: stopped waiting; Slurm job {job_id} keeps running: "
                                        f"`dlaunch logs -f {run_dir}` follows it, `dlaunch cancel {run_dir}` ends it")
        assert slurm_cluster.job(job_id)["JobState"] == "RUNNING"
        code, err = interrupted("logs", "-f", str(run_dir))
        assert code == 130 and err == ""
        assert slurm_cluster.job(job_id)["JobState"] == "RUNNING"
    finally:
        slurm_cluster.dlaunch("cancel", job_id)
    assert wait_for(slurm_cluster, job_id) == "CANCELLED"
