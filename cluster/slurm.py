"""The Slurm backend: the plan rendered into an sbatch script (slurm/dlaunch.sbatch),
submitted with sbatch, watched with squeue / scontrol, stopped with scancel.

Every value from the recipe reaches the script either as an `#SBATCH` line (which
sbatch reads without a shell; the schema forbids line breaks in them), as a
shell-quoted `export` or as a number; the agent command itself is a constant. The
script restarts the job's agents itself (train.max_restarts), as the local backend does.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cluster.base import JobState
from cluster.failure import LOG_TAIL, first_failure, out_of_restarts_line, rank_failure_report
from cluster.process import agent_module
from launcher.errors import UsageError
from launcher.folds import fold_number
from launcher.plan import LaunchPlan
from launcher.recipe import SlurmConfig
from launcher.rundir import LOGS, PLAN, rank_log, rank_status

# Shipped inside the package (an installed dlaunch has no source tree); slurm/dlaunch.sbatch
# in the repository links here.
TEMPLATE = Path(__file__).resolve().parent / "templates" / "dlaunch.sbatch"
SCRIPT = "slurm/job.sbatch"
JOB_ID = "slurm/job_id"
TASK_LOGS = "slurm/task-logs"
"""In an array job's first run directory: a link per task, named by its index, to that
task's logs folder."""
POLL_S = 2.0

# Slurm's job states, in the protocol's words.
_STATES: dict[str, JobState] = {
    "PENDING": "PENDING", "CONFIGURING": "PENDING", "REQUEUED": "PENDING", "REQUEUE_HOLD": "PENDING",
    "REQUEUE_FED": "PENDING", "RESIZING": "PENDING", "SUSPENDED": "PENDING",
    "RUNNING": "RUNNING", "COMPLETING": "RUNNING", "STAGE_OUT": "RUNNING", "SIGNALING": "RUNNING",
    "COMPLETED": "COMPLETED",
    "CANCELLED": "CANCELLED",
}


def sbatch_options(slurm: SlurmConfig, *, job_name: str, nodes: int, gpus_per_node: int | None,
                   output: str, signal_batch_only: bool = False) -> list[str]:
    """The `#SBATCH` options of a job of ``nodes`` nodes, one task each; with
    ``signal_batch_only`` the preemption signal goes to the batch shell alone (`B:`)."""
    options = [
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--time={slurm.time}",
        f"--output={output}",
        f"--error={output}",
        # A requeued job writes on where it left off instead of truncating its output.
        "--open-mode=append",
    ]
    optional = {"--partition": slurm.partition, "--account": slurm.account, "--qos": slurm.qos,
                "--gpus-per-node": gpus_per_node or None, "--cpus-per-task": slurm.cpus_per_task,
                "--mem": slurm.mem, "--constraint": slurm.constraint}
    options += [f"{flag}={value}" for flag, value in optional.items() if value is not None]
    if slurm.exclusive:
        options.append("--exclusive")
    options.append(f"--signal={'B:' if signal_batch_only else ''}{slurm.signal}@{slurm.signal_grace}")
    if slurm.requeue:
        options.append("--requeue")
    return options + list(slurm.extra_sbatch)


def _sbatch_options(plan: LaunchPlan, output: str) -> list[str]:
    slurm, topo = plan.recipe.cluster.slurm, plan.topology
    gpus = slurm.gpus_per_node
    if gpus is None and topo.device == "cuda":
        gpus = topo.procs_per_node
    return sbatch_options(slurm, job_name=slurm.job_name or plan.name, nodes=topo.nodes, gpus_per_node=gpus,
                          output=output)


def sbatch_line(option: str) -> str:
    """`#SBATCH --flag=value`, the value quoted when it holds spaces or quotes (sbatch
    splits these lines itself, shell-style, without running anything)."""
    flag, sep, value = option.partition("=")
    if sep and (not value or any(c in value for c in " \t'\"\\")):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"#SBATCH {flag}{sep}{value}"


def setup_block(slurm: SlurmConfig) -> str:
    """cluster.slurm.setup, run as written, in braces (one block for shellcheck)."""
    if not slurm.setup:
        return ""
    return ("\n# Set-up from cluster.slurm.setup, run as written.\n"
            "# shellcheck disable=SC1091  # files of the user's, not ours to follow\n"
            "{\n" + "\n".join(slurm.setup) + "\n}\n")


def _container(plan: LaunchPlan, cwd: str) -> tuple[list[str], str, str]:
    """(exports, srun options, the prefix of the agent command) for the container."""
    container = plan.recipe.cluster.slurm.container
    if container is None:
        return [], "", ""
    runs = str(Path(plan.run_dir).parent)  # the run root: every run dir of an array job
    mounts = ",".join([f"{runs}:{runs}", f"{cwd}:{cwd}", *container.mounts])
    exports = [f"export DLAUNCH_CONTAINER_IMAGE={shlex.quote(container.image)}",
               f"export DLAUNCH_CONTAINER_MOUNTS={shlex.quote(mounts)}"]
    if container.runtime == "pyxis":
        srun = ('--container-image="$DLAUNCH_CONTAINER_IMAGE" '
                '--container-mounts="$DLAUNCH_CONTAINER_MOUNTS" --container-workdir="$PWD" ')
        return exports, srun, ""
    return exports, "", 'apptainer exec --nv --bind "$DLAUNCH_CONTAINER_MOUNTS" "$DLAUNCH_CONTAINER_IMAGE" '


def array_tasks(plans: list[LaunchPlan]) -> list[int]:
    """Each plan's task id in its array job: a fold's number, so that a resume's array,
    which runs only the folds left, names each fold as the first array did; otherwise
    its grid point's."""
    folds = [fold_number(plan.run_dir) for plan in plans]
    if None in folds:  # the points of an --array grid
        return list(range(len(plans)))
    return [int(fold) for fold in folds]


def _array_option(tasks: list[int]) -> str:
    """`--array=0-3`, or `--array=1-2,4` for the folds a resume has left."""
    ranges: list[list[int]] = []
    for task in tasks:
        if ranges and task == ranges[-1][1] + 1:
            ranges[-1][1] = task
        else:
            ranges.append([task, task])
    return "--array=" + ",".join(f"{first}-{last}" if last > first else str(first) for first, last in ranges)


def _run_dir_export(plan: LaunchPlan, array: list[LaunchPlan]) -> tuple[str, str]:
    """(the lines that set DLAUNCH_RUN_DIR, the --output path) for a job or an array."""
    if not array:
        return f"export DLAUNCH_RUN_DIR={shlex.quote(plan.run_dir)}", f"{plan.run_dir}/logs/slurm-%j.out"
    dirs = " ".join(f"[{task}]={shlex.quote(p.run_dir)}" for task, p in zip(array_tasks(array), array, strict=True))
    lines = ("# An array job: task N trains grid point (or fold) N, in a run directory of its own.\n"
             f"RUN_DIRS=({dirs})\n"
             'export DLAUNCH_RUN_DIR="${RUN_DIRS[$SLURM_ARRAY_TASK_ID]}"')
    # sbatch expands %a (the task) but no shell variable, and the tasks' run dirs are
    # named as they come (grid points, folds, the unfinished folds a resume runs): each
    # task's output goes through its link into its own run dir's logs.
    return lines, f"{plan.run_dir}/{TASK_LOGS}/%a/slurm-%A_%a.out"


def render(plan: LaunchPlan, *, python: str | None = None, cwd: str | None = None,
           array: list[LaunchPlan] = ()) -> str:
    """The sbatch script for ``plan``; for an array job, ``array`` holds the plans of
    all its tasks (``plan`` is the first), which differ in nothing but their recipes'
    training keys and their run directories."""
    slurm, topo = plan.recipe.cluster.slurm, plan.topology
    cwd = cwd or os.getcwd()
    exports, srun_options, container_exec = _container(plan, cwd)
    if python is None:
        python = slurm.python or ("python" if slurm.container else sys.executable)
    env = {**plan.env, **slurm.env}
    exports += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    for index, other in enumerate(array[1:], start=1):
        if render(other, python=python, cwd=cwd).replace(other.run_dir, plan.run_dir) != \
                render(plan, python=python, cwd=cwd):
            raise UsageError(f"grid point {index} changes the sbatch script (nodes, GPUs, time, "
                             "env...); an array varies training keys only", key="--array")
    run_dir_export, output = _run_dir_export(plan, list(array))
    module, worker = agent_module(plan)
    options = _sbatch_options(plan, output) + ([_array_option(array_tasks(list(array)))] if array else [])
    values = {
        "job_title": (slurm.job_name or plan.name).replace("\n", " "),
        "run_dir_comment": plan.run_dir.replace("\n", " "),
        "sbatch_options": "\n".join(sbatch_line(o) for o in options),
        "procs_per_node": str(topo.procs_per_node),
        "agent_module": module,
        "worker": "".join(f"{arg} " for arg in worker),
        "run_dir_export": run_dir_export,
        "python": shlex.quote(python),
        "env_exports": "\n".join(exports),
        "setup": setup_block(slurm),
        "nodes": str(topo.nodes),
        "srun_options": srun_options,
        "container_exec": container_exec,
        "rdzv_timeout": str(topo.rdzv_timeout),
        "max_restarts": str(plan.recipe.train.max_restarts),
        "end_mlflow_run": "1" if plan.recipe.logging.mlflow.enabled else "0",
        "signal": slurm.signal,
        "requeue": "1" if slurm.requeue else "0",
        # SIG_IGN survives exec; SIGTERM is the agent's to forward, so it stays.
        "agent_trap": "" if slurm.signal == "TERM" else f'trap "" {slurm.signal}; ',
    }
    return fill(TEMPLATE, values)


def fill(template: Path, values: dict[str, str]) -> str:
    """The template with each {{key}} replaced by its value."""
    script = template.read_text()
    for key, value in values.items():
        script = script.replace("{{" + key + "}}", value)
    return script


def run_command(command: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UsageError(f"{command[0]} not found: is this a Slurm login node?", key="--cluster") from None
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed: {result.stderr.strip()}")
    return result


class SlurmJob:
    def __init__(self, plan: LaunchPlan, job_id: str) -> None:
        self.plan = plan
        self.run_dir = plan.run_dir
        self.job_id = job_id

    def _state(self) -> str:
        # scontrol knows recent jobs, finished ones included (for MinJobAge), with no
        # accounting database; sacct is the fallback for older ones.
        shown = run_command(["scontrol", "show", "job", "--oneliner", self.job_id], check=False)
        for field in shown.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        accounted = run_command(["sacct", "-n", "-X", "-P", "-o", "State", "-j", self.job_id], check=False)
        states = accounted.stdout.split()
        return states[0].split()[0] if states else "UNKNOWN"

    def status(self) -> JobState:
        return _STATES.get(self._state(), "FAILED")

    def logs(self, rank: int = 0) -> str:
        path = rank_log(self.run_dir, rank)
        return path.read_text(errors="replace") if path.exists() else ""

    def output(self) -> str:
        """The job's stdout and stderr (rank 0's progress, the agents, Slurm's own)."""
        path = Path(self.run_dir) / "logs" / f"slurm-{self.job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def cancel(self) -> None:
        run_command(["scancel", self.job_id])

    def wait(self) -> int:
        while (state := self.status()) in ("PENDING", "RUNNING"):
            time.sleep(POLL_S)
        if state == "COMPLETED":
            return 0
        failure = first_failure(self.run_dir, self.plan.topology.world_size)
        if failure is not None:
            print(rank_failure_report(self.run_dir, self.plan.topology, *failure), file=sys.stderr)
            # The batch script itself gave up (not Slurm's time limit or a cancel) on a
            # failure other than a preemption or a final one: its restarts are spent.
            max_restarts = self.plan.recipe.train.max_restarts
            if max_restarts and self._state() == "FAILED" and not failure[1].startswith(("preempted", "stopped")):
                print(out_of_restarts_line(max_restarts), file=sys.stderr)
        else:  # no rank got to run: the batch script itself stopped
            tail = self.output().splitlines()[-LOG_TAIL:]
            print("\n".join([f"error: Slurm job {self.job_id} ended {self._state()} before any rank "
                             f"ran; last lines of {self.run_dir}/logs/slurm-{self.job_id}.out:",
                             *(f"  {line}" for line in tail)]), file=sys.stderr)
        return 1


class SlurmBackend:
    def __init__(self, sbatch_args: list[str] = ()) -> None:
        self.sbatch_args = list(sbatch_args)

    def _sbatch(self, script_text: str, plans: list[LaunchPlan]) -> str:
        """Write the script into each run dir, sbatch it once; the job id."""
        for plan in plans:
            for rank in range(plan.topology.world_size):
                rank_status(plan.run_dir, rank).unlink(missing_ok=True)
            (Path(plan.run_dir) / "slurm").mkdir(exist_ok=True)
            (Path(plan.run_dir) / SCRIPT).write_text(script_text)
        result = run_command(["sbatch", "--parsable", *self.sbatch_args, str(Path(plans[0].run_dir) / SCRIPT)])
        return result.stdout.strip().split(";")[0]

    def submit(self, plan: LaunchPlan) -> SlurmJob:
        job_id = self._sbatch(render(plan), [plan])
        (Path(plan.run_dir) / JOB_ID).write_text(job_id + "\n")
        return SlurmJob(plan, job_id)

    def submit_array(self, plans: list[LaunchPlan]) -> list[SlurmJob]:
        """One array job, a task a plan (``array_tasks`` numbers them)."""
        tasks = array_tasks(plans)
        links = Path(plans[0].run_dir) / TASK_LOGS
        links.mkdir(parents=True, exist_ok=True)
        for task, plan in zip(tasks, plans, strict=True):  # a resume's array may replace an earlier one's
            (links / str(task)).unlink(missing_ok=True)
            (links / str(task)).symlink_to(Path(plan.run_dir) / LOGS, target_is_directory=True)
        job_id = self._sbatch(render(plans[0], array=plans), plans)
        jobs = []
        for task, plan in zip(tasks, plans, strict=True):
            (Path(plan.run_dir) / JOB_ID).write_text(f"{job_id}_{task}\n")
            jobs.append(SlurmJob(plan, f"{job_id}_{task}"))
        return jobs


def unfinished_job(plan: LaunchPlan) -> tuple[str, JobState] | None:
    """The id and state of the run's last Slurm job (slurm/job_id) while Slurm has it
    pending or running: one requeued, or held in the queue, has no rank running to show it."""
    try:
        job_id = (Path(plan.run_dir) / JOB_ID).read_text().strip()
    except FileNotFoundError:
        return None
    state = SlurmJob(plan, job_id).status()
    return (job_id, state) if state in ("PENDING", "RUNNING") else None


def _run_dir_of(job_id: str) -> Path:
    """The run directory of a job, from where Slurm writes its output."""
    shown = run_command(["scontrol", "show", "job", "--oneliner", job_id], check=False)
    for field in shown.stdout.split():
        if field.startswith("StdOut="):  # RUN_DIR/logs/..., or an array task's link to it
            return Path(field.split("=", 1)[1]).parent.resolve().parent
    raise UsageError(f"Slurm does not know job {job_id} (any more)", key="JOB")


def find_job(target: str) -> SlurmJob:
    """A job named by its run directory or its Slurm job id."""
    run_dir = Path(target)
    if re.fullmatch(r"\d+(_\d+)?", target) and not run_dir.is_dir():  # 1234, or 1234_5 in an array
        job_id, run_dir = target, _run_dir_of(target)
    else:
        try:
            job_id = (run_dir / JOB_ID).read_text().strip()
        except FileNotFoundError:
            raise UsageError(f"{target!r} is neither a Slurm job id nor the run directory of one",
                             key="JOB") from None
    try:
        plan = LaunchPlan.from_json((run_dir / PLAN).read_text())
    except FileNotFoundError:
        raise UsageError(f"{str(run_dir)!r} holds no plan.json", key="JOB") from None
    return SlurmJob(plan, job_id)
