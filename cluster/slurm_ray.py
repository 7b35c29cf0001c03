"""A Ray cluster across a Slurm allocation, for sweeps: the sbatch script
(templates/ray-cluster.sbatch) starts Ray on every node of the job (cluster/ray_node.py),
then runs a driver against it in the batch shell.

As for training jobs (cluster/slurm.py), every value from the recipe reaches the script
as an `#SBATCH` line or a shell-quoted `export`; the driver command is the caller's.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from cluster.slurm import JOB_ID, SCRIPT, fill, run_command, sbatch_line, sbatch_options, setup_block
from launcher.errors import UsageError
from launcher.recipe import Recipe

TEMPLATE = Path(__file__).resolve().parent / "templates" / "ray-cluster.sbatch"
# The driver `dlaunch sweep --cluster slurm` submits; a requeued job resumes the sweep
# with the same command.
SWEEP_DRIVER = ('"$DLAUNCH_PYTHON" -m launcher.cli sweep --resume "$DLAUNCH_SWEEP_DIR" '
                '--address "$DLAUNCH_RAY_ADDRESS"')
# Straight in the sweep directory: sbatch creates no directories, and a job whose output
# cannot be opened fails without a word.
OUTPUT = "slurm-%j.out"


def render_ray_cluster(recipe: Recipe, *, sweep_dir: str, nodes: int | None = None,
                       driver: str = SWEEP_DRIVER, python: str | None = None) -> str:
    """The sbatch script that starts Ray on ``nodes`` nodes (default: cluster.nodes) with
    the recipe's `cluster.slurm` options, waits for all of them, then runs ``driver``, a
    shell command run as written (never a value from a recipe). The driver sees
    DLAUNCH_RAY_ADDRESS, DLAUNCH_SWEEP_DIR and DLAUNCH_PYTHON; the job ends with its exit
    status, after Ray has stopped."""
    slurm = recipe.cluster.slurm
    if slurm.container is not None:
        raise UsageError("a sweep on Slurm runs Ray outside containers; unset cluster.slurm.container "
                         "and set cluster.slurm.python (or setup) to a Python with dlaunch and Ray",
                         key="cluster.slurm.container")
    gpus = slurm.gpus_per_node
    if gpus is None and recipe.cluster.device == "cuda":
        gpus = recipe.cluster.procs_per_node
    # Signalled alone, the batch shell passes the preemption signal on to the driver;
    # signalled with the steps, Ray's processes would get it as well.
    options = sbatch_options(slurm, job_name=slurm.job_name or recipe.name, nodes=nodes or recipe.cluster.nodes,
                             gpus_per_node=gpus, output=f"{sweep_dir}/{OUTPUT}", signal_batch_only=True)
    values = {
        "job_title": (slurm.job_name or recipe.name).replace("\n", " "),
        "sweep_dir_comment": sweep_dir.replace("\n", " "),
        "sbatch_options": "\n".join(sbatch_line(o) for o in options),
        "sweep_dir": shlex.quote(sweep_dir),
        "python": shlex.quote(python or slurm.python or sys.executable),
        "signal": slurm.signal,
        "signal_grace": str(slurm.signal_grace),
        "requeue": "1" if slurm.requeue else "0",
        "env_exports": "\n".join(f"export {name}={shlex.quote(value)}" for name, value in slurm.env.items()),
        "setup": setup_block(slurm),
        "join_timeout": str(recipe.cluster.rdzv_timeout),
        "driver": driver,
    }
    return fill(TEMPLATE, values)


def submit_sweep(recipe: Recipe, sweep_dir: Path, nodes: int) -> str:
    """Write the sweep's sbatch script into SWEEP_DIR/slurm/ and submit it; the job id."""
    script = sweep_dir / SCRIPT
    script.parent.mkdir(exist_ok=True)
    script.write_text(render_ray_cluster(recipe, sweep_dir=str(sweep_dir), nodes=nodes))
    job_id = run_command(["sbatch", "--parsable", str(script)]).stdout.strip().split(";")[0]
    (sweep_dir / JOB_ID).write_text(job_id + "\n")
    return job_id
