"""The local backend: real torch elastic agents, a real c10d rendezvous, real workers.

Every job here is a small torchrun-style script written into the test's directory.
A job that hangs would hang the suite, so every wait() runs under a watchdog that
fails the test instead, and every job is cancelled when its test ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.local import LocalBackend, LocalJob
from launcher.plan import HostFacts, LaunchPlan, build_plan
from launcher.recipe import Recipe
from launcher.rundir import LOGS, PLAN, rank_status
from tests.conftest import dlaunch, gone, processes_holding

HOST = socket.gethostname()

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HANG_S = 120
"""Far beyond any job here: reaching it means a hang, not a slow machine."""

PRELUDE = """\
import json, os, signal, sys, time
from pathlib import Path
import torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
out = Path(sys.argv[1])
"""


def make_plan(tmp_path: Path, body: str, nodes: int, procs: int,
              args: tuple[str, ...] = ()) -> LaunchPlan:
    """A plan for ``body`` (after PRELUDE) with its run dir made as the CLI makes it.
    The script's first argument is an output directory for what the ranks report."""
    script = tmp_path / "job.py"
    script.write_text(PRELUDE + body)
    out = tmp_path / "out"
    out.mkdir()
    plan = build_plan(Recipe(), host=HostFacts(has_cuda=False, cpus=2, hostname="h"), data=None,
                      run_dir=str(tmp_path / "run"), nodes=nodes, procs_per_node=procs,
                      script=str(script), script_args=[str(out), *args])
    (tmp_path / "run" / LOGS).mkdir(parents=True)
    (tmp_path / "run" / PLAN).write_text(plan.to_json())
    return plan


@pytest.fixture
def submit():
    """LocalBackend().submit, with whatever a failed test leaves running cancelled."""
    jobs: list[LocalJob] = []

    def submit(plan: LaunchPlan) -> LocalJob:
        jobs.append(LocalBackend().submit(plan))
        return jobs[-1]

    yield submit
    for job in jobs:
        job.cancel()


def wait(job: LocalJob) -> int:
    result: list[int] = []
    waiter = threading.Thread(target=lambda: result.append(job.wait()), daemon=True)
    waiter.start()
    waiter.join(HANG_S)
    if waiter.is_alive():
        pytest.fail(f"wait() still blocked after {HANG_S}s: the job hangs")
    return result[0]


def wait_until_running(plan: LaunchPlan, out: Path) -> list[dict]:
    """Block until every rank is `running` and has written out/pids-R.json; its contents."""
    world = plan.topology.world_size
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        statuses = [rank_status(plan.run_dir, r) for r in range(world)]
        pid_files = [out / f"pids-{r}.json" for r in range(world)]
        if all(p.exists() for p in pid_files) and all(
                s.exists() and s.read_text().strip() == "running" for s in statuses):
            return [json.loads(p.read_text()) for p in pid_files]
        time.sleep(0.1)
    pytest.fail("the ranks never all reported running")


REPORT_ENV = """\
t = torch.tensor([rank])
dist.all_reduce(t)
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"]
report = {k: os.environ[k] for k in keys}
report.update(sum=int(t), argv=sys.argv)
(out / f"rank-{rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("nodes,procs", [(1, 2), (2, 1), (2, 2)], ids=["1x2", "2x1", "2x2"])
def test_every_rank_gets_torchrun_env_joins_the_group_and_gets_the_script_args(
        tmp_path, submit, nodes, procs):
    plan = make_plan(tmp_path, REPORT_ENV, nodes, procs, args=("--lr", "0.1", "a b"))
    job = submit(plan)
    assert wait(job) == 0
    assert job.status() == "COMPLETED"
    world = nodes * procs
    reports = [json.loads((tmp_path / "out" / f"rank-{r}.json").read_text()) for r in range(world)]
    for rank, env in enumerate(reports):
        assert int(env["RANK"]) == rank
        assert int(env["WORLD_SIZE"]) == world
        assert int(env["NODE_RANK"]) * procs + int(env["LOCAL_RANK"]) == rank
        assert env["sum"] == sum(range(world))
        assert env["argv"] == [str(tmp_path / "job.py"), str(tmp_path / "out"), "--lr", "0.1", "a b"]
        assert rank_status(plan.run_dir, rank).read_text() == "done\n"
    assert {(env["MASTER_ADDR"], env["MASTER_PORT"]) for env in reports} == {
        ("127.0.0.1", reports[0]["MASTER_PORT"])}


def test_a_rank_that_raises_is_named_with_its_traceback_and_its_peer_does_not_hang(
        tmp_path, submit, capfd):
    # Rank 0 waits in a barrier rank 1 never reaches; on another node, so the backend
    # must stop a second agent.
    plan = make_plan(tmp_path, """\
if rank == 1:
    raise ValueError("bad batch on rank 1")
dist.barrier()
""", nodes=2, procs=1)
    job = submit(plan)
    assert wait(job) == 1
    assert job.status() == "FAILED"
    err = capfd.readouterr().err
    assert f"error: rank 1 (node 1 on {HOST}, local rank 0) failed: ValueError: bad batch on rank 1" in err
    report = err[err.index("error: rank 1"):]
    assert 'raise ValueError("bad batch on rank 1")' in report  # the tail of its log
    assert "failed: ValueError" in rank_status(plan.run_dir, 1).read_text()


def test_a_rank_killed_hard_is_named_though_its_peer_fails_after_it(tmp_path, submit, capfd):
    # Rank 0's barrier fails with a gloo error when rank 1 dies, so rank 0 also says
    # `failed`; the report still names rank 1, which had no chance to say anything.
    plan = make_plan(tmp_path, """\
if rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
dist.barrier()
""", nodes=1, procs=2)
    job = submit(plan)
    assert wait(job) == 1
    err = capfd.readouterr().err
    assert f"error: rank 1 (node 0 on {HOST}, local rank 1) failed: " in err
    assert "SIGKILL" in err[err.index("error: rank 1"):].splitlines()[0]
    assert rank_status(plan.run_dir, 1).read_text() == "running\n"


SLEEP = """\
(out / f"pids-{rank}.json").write_text(json.dumps({"worker": os.getpid(), "agent": os.getppid()}))
time.sleep(600)
"""


def test_cancel_stops_every_agent_and_worker(tmp_path, submit):
    plan = make_plan(tmp_path, SLEEP, nodes=2, procs=1)
    job = submit(plan)
    pids = wait_until_running(plan, tmp_path / "out")
    threading.Thread(target=job.cancel).start()
    assert wait(job) == 128 + signal.SIGTERM  # once the cancel is done
    assert job.status() == "CANCELLED"
    for rank, p in enumerate(pids):
        assert gone(p["worker"]) and gone(p["agent"])
        assert rank_status(plan.run_dir, rank).read_text() == "terminated: SIGTERM\n"


def test_cancel_stops_ranks_stuck_in_a_collective(tmp_path, submit):
    # Blocked in C++, a rank runs no Python signal handler: its agent SIGKILLs it.
    plan = make_plan(tmp_path, """\
(out / f"pids-{rank}.json").write_text(json.dumps({"worker": os.getpid(), "agent": os.getppid()}))
if rank == 0:
    dist.all_reduce(torch.ones(1))  # which rank 1 never joins
else:
    dist.recv(torch.ones(1), src=0)  # which rank 0 never sends
""", nodes=1, procs=2)
    job = submit(plan)
    pids = wait_until_running(plan, tmp_path / "out")
    job.cancel()
    assert job.status() == "CANCELLED"
    for p in pids:
        assert gone(p["worker"]) and gone(p["agent"])


def test_a_node_agent_killed_hard_takes_its_workers_and_the_job_down_naming_it(tmp_path, submit, capfd):
    plan = make_plan(tmp_path, SLEEP, nodes=2, procs=1)
    job = submit(plan)
    pids = wait_until_running(plan, tmp_path / "out")
    os.kill(pids[1]["agent"], signal.SIGKILL)
    assert wait(job) == 1  # train.max_restarts is 0: no restart
    err = capfd.readouterr().err
    assert (f"error: the agent of node 1 on {HOST} (pid {pids[1]['agent']}) was killed by SIGKILL; "
            "rank 1 died with it\n") in err
    assert "restarting" not in err
    for p in pids:
        assert gone(p["worker"]) and gone(p["agent"])


CLI = """\
import sys
from cluster.local import LocalBackend
from launcher.plan import LaunchPlan
plan = LaunchPlan.from_json(open(sys.argv[1]).read())
sys.exit(LocalBackend().submit(plan).wait())
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_to_the_launcher_stops_the_job(tmp_path, sig, code):
    """Ctrl-C, a SIGTERM or a hangup (the SSH session closed) to the launching process:
    the job stops, nothing stays."""
    plan = make_plan(tmp_path, SLEEP, nodes=1, procs=2)
    launcher = subprocess.Popen([sys.executable, "-c", CLI, str(Path(plan.run_dir) / PLAN)],
                                cwd=REPO)
    try:
        pids = wait_until_running(plan, tmp_path / "out")
        launcher.send_signal(sig)
        assert launcher.wait(HANG_S) == code
    finally:
        launcher.terminate()  # no-op when it has ended; else it stops its job
        launcher.wait(HANG_S)
    for p in pids:
        assert gone(p["worker"]) and gone(p["agent"])


WAIT_FOR_GO = """\
(out / f"pids-{rank}.json").write_text(json.dumps({"worker": os.getpid(), "agent": os.getppid()}))
while not (out / "go").exists():
    time.sleep(0.05)
"""


def test_under_nohup_a_hangup_leaves_the_job_running(tmp_path):
    """`nohup dlaunch run ...` ignores SIGHUP, and so does the job: it runs to its end."""
    plan = make_plan(tmp_path, WAIT_FOR_GO, nodes=1, procs=2)
    launcher = subprocess.Popen(["nohup", sys.executable, "-c", CLI, str(Path(plan.run_dir) / PLAN)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_running(plan, tmp_path / "out")
        launcher.send_signal(signal.SIGHUP)
        (tmp_path / "out" / "go").touch()
        assert launcher.wait(HANG_S) == 0
    finally:
        launcher.terminate()  # no-op once it has ended; else it stops its job
        launcher.wait(HANG_S)


def forking_agents(root: str) -> bool:
    """Whether a launcher.agent --fork-nodes of a run under ``root`` is alive."""
    for pid in processes_holding(root):
        try:
            if b"--fork-nodes" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:  # ended meanwhile
            pass
    return False


def test_ctrl_c_while_the_nodes_agents_are_being_forked_leaves_no_process(tmp_path):
    """Two CPU nodes: one process imports, then forks both agents (cluster/local.py). A
    Ctrl-C while it imports stops it, and no agent it may have forked outlives the CLI."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
data: {{source: synthetic, samples: 64, num_features: 4, num_classes: 2}}
model: {{name: mlp, kwargs: {{hidden: [8]}}}}
train: {{micro_batch_size: 8, max_steps: 1000}}
logging: {{run_root: {tmp_path / 'runs'}, progress: false, report: false}}
""")
    launcher = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(recipe), "--nodes", "2",
                                 "--procs-per-node", "1"], cwd=REPO)
    try:
        deadline = time.monotonic() + HANG_S
        while not forking_agents(str(tmp_path)):
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(HANG_S) != 0
    finally:
        launcher.kill()  # no-op once it has ended
        launcher.wait()
    deadline = time.monotonic() + 30  # SIGKILL is delivered, not waited for
    while processes_holding(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_holding(str(tmp_path)) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_running_run_refuses_a_resume_and_once_stopped_names_the_command_that_resumes_it(tmp_path, sig):
    """While it runs, a `--resume` of the run is refused before anything starts. Ctrl-C or
    SIGTERM to `dlaunch run` once a checkpoint exists: exit 128+signal, no agent's
    traceback, and a last line naming the resume command and its checkpoint."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
data: {{source: synthetic, samples: 64, num_features: 4, num_classes: 2}}
model: {{name: mlp, kwargs: {{hidden: [8]}}}}
train: {{micro_batch_size: 8, max_steps: 100000, checkpoint_every: 5, eval_every: 5,
        early_stopping: {{patience: null}}}}
logging: {{run_root: {tmp_path / 'runs'}, progress: false, report: false}}
""")
    launcher = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(recipe), "--nodes", "2",
                                 "--procs-per-node", "1"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + HANG_S
        while not list(tmp_path.glob("runs/*/checkpoints/latest")):
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        run_dir = next(tmp_path.glob("runs/*"))
        second = dlaunch("run", "--resume", str(run_dir))
        assert (second.returncode, second.stderr) == (2, f"error: --resume: {run_dir} is running: rank 0's "
                                                         "process holds logs/rank-0.lock; stop that run first\n")
        launcher.send_signal(sig)
        _, err = launcher.communicate(timeout=HANG_S)
    finally:
        launcher.terminate()  # no-op once it has ended; else it stops its job
        launcher.wait(HANG_S)
    assert launcher.returncode == 128 + sig, err
    assert "Traceback" not in err, err
    checkpoint = (run_dir / "checkpoints" / "latest").read_text().strip()
    how = "interrupted" if sig == signal.SIGINT else "stopped"
    assert err.splitlines()[-1] == (f"dlaunch: {how}; `dlaunch run --resume {run_dir}` "
                                    f"continues it from checkpoint {checkpoint}")
