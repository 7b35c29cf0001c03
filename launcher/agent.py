"""A node agent whose ranks start warm: ``python -m launcher.agent [torchrun options]
RUN_DIR``.

It is torchrun's own elastic agent (same options, rendezvous, restarts and shutdown),
with one difference: the ranks are forked from this process after it has imported what
every rank of the plan imports, instead of each starting a Python of its own. On a CPU
host those imports are most of a short run: torch, DeepSpeed or Accelerate, and the
torch._dynamo that torch.optim pulls in on first use, 6 to 7 s of CPU a rank on a
2-core machine. Here a node pays them once.

The local and Slurm backends start this agent for the built-in trainer on the CPU
(cluster/process.py). A CUDA plan keeps torchrun, whose ranks exec: a fork carries no
CUDA driver state a child can use. So does a ``--script`` plan: a forked child ends
without the interpreter's exit, and a user's script may count on its atexit handlers.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import torch
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.launcher.api import elastic_launch
from torch.distributed.run import config_from_args, parse_args

from launcher import worker
from launcher.plan import LaunchPlan
from launcher.rundir import PLAN


def import_what_ranks_import(plan: LaunchPlan) -> None:
    """Import, before any rank is forked, the modules each rank of ``plan`` would import."""
    from launcher.engines.imports import import_engine

    import_engine(plan)
    import torch._dynamo  # noqa: F401  (an optimizer's first add_param_group imports it)

    if plan.recipe.data.loader == "dali":
        import launcher.data.dali_loader  # noqa: F401


def run_rank(run_dir: str) -> None:
    """One forked rank: the worker's main, its exit code raised as SystemExit (the
    elastic agent reads a forked rank's failure from its exit code)."""
    # OpenMP read OMP_NUM_THREADS when this agent imported torch, before torchrun's
    # options set it (1 for several ranks a node, unless the environment says) in the
    # environment each rank gets: a rank that execs reads it at start, a forked one is told.
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    code = worker.main(Path(run_dir), forked=True)
    if code:
        raise SystemExit(code)


@record
def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.start_method = "fork"
    run_dir = args.training_script  # the one positional argument torchrun's parser takes
    config, _, _ = config_from_args(args)
    import_what_ranks_import(_plan(run_dir))
    elastic_launch(config=config, entrypoint=run_rank)(run_dir)


def _plan(run_dir: str) -> LaunchPlan:
    return LaunchPlan.from_json((Path(run_dir) / PLAN).read_text())


def fork_agents(nodes: int, pids_fd: int, argv: list[str]) -> None:
    """``python -m launcher.agent --fork-nodes N FD [options] RUN_DIR``: the local
    backend's N emulated nodes as N agents forked from this process once it has imported
    what their ranks import, where N agents started apart would each import it all. Each
    agent leads a session of its own, as the local backend starts them. Their pids go to
    the pipe FD, one a line, and this process exits, leaving them to its parent (a child
    subreaper: cluster/local.py), which supervises them as the agents it starts itself."""
    import_what_ranks_import(_plan(argv[-1]))
    for _ in range(nodes):
        pid = os.fork()
        if pid == 0:
            os.close(pids_fd)
            os.setsid()
            _run_agent(argv)
        os.write(pids_fd, f"{pid}\n".encode())


def _run_agent(argv: list[str]) -> NoReturn:
    try:
        main(argv)
    except SignalException:
        # Stopped (Ctrl-C or SIGTERM to dlaunch, Slurm ending the job): torch has logged
        # it and stopped the ranks; torchrun's traceback of where the agent slept says
        # nothing more. Exit 1, as torchrun does.
        _exit(1)
    except BaseException:  # a failed rank (ChildFailedError): torchrun prints it and exits 1
        traceback.print_exc()
        _exit(1)
    _exit(0)


def _exit(code: int) -> NoReturn:
    """End the agent without the interpreter's teardown of all it imported for its ranks
    (seconds, as launcher/worker.py says of a rank), once its output is flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fork-nodes"]:
        fork_agents(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
        _exit(0)
    _run_agent(sys.argv[1:])
