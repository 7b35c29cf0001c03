"""Which node agent the local backend starts: launcher/agent.py, which forks its ranks
warm, for the built-in trainer on the CPU; torchrun, whose ranks exec, for a CUDA plan
and for a --script (why: launcher/agent.py). And what a forked rank takes from the
environment torchrun gives it, as an exec'd one would."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import torch

from cluster.local import _agent_command
from launcher import agent as warm_agent
from launcher.data.facts import DataFacts
from launcher.plan import HostFacts, LaunchPlan, build_plan
from launcher.recipe import Recipe

CPU = HostFacts(has_cuda=False, cpus=8, hostname="laptop")
GPU = HostFacts(has_cuda=True, cpus=64, hostname="gpu-node")
DIGITS = DataFacts(num_rows=1797, num_train=1438, num_val=359, input_shape=(1, 8, 8), num_classes=10)


def agent(plan: LaunchPlan) -> list[str]:
    return _agent_command(plan, 29400, "run-1")


def test_the_trainer_on_the_cpu_gets_the_warm_agent_with_torchruns_options():
    command = agent(build_plan(Recipe(), host=CPU, data=DIGITS, run_dir="runs/x", procs_per_node=2))
    assert command[:3] == [sys.executable, "-m", "launcher.agent"]
    assert command[-1] == "runs/x"
    assert command[command.index("--nproc-per-node") + 1] == "2"
    assert command[command.index("--rdzv-endpoint") + 1] == "127.0.0.1:29400"


def test_a_cuda_plan_gets_torchrun_which_execs_its_ranks():
    command = agent(build_plan(Recipe(), host=GPU, data=DIGITS, run_dir="runs/x"))
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[-3:] == ["-m", "launcher.worker", "runs/x"]


def test_a_script_gets_torchrun_which_execs_its_ranks():
    command = agent(build_plan(Recipe(), host=CPU, data=None, run_dir="runs/x", script="train.py"))
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[-3:] == ["-m", "launcher.worker", "runs/x"]


def test_a_forked_rank_runs_the_intra_op_threads_its_environment_gives(tmp_path, monkeypatch):
    # The agent imported torch (and OpenMP read its environment) before torchrun's options
    # set OMP_NUM_THREADS for the ranks, as on a Slurm node with several ranks.
    seen = tmp_path / "threads"

    def fake_main(run_dir: Path, *, forked: bool) -> int:  # stands in for the trainer
        seen.write_text(str(torch.get_num_threads()))
        return 0

    def forked_rank() -> None:
        os.environ["OMP_NUM_THREADS"] = "1"  # what the elastic agent puts in a rank's env
        warm_agent.run_rank(str(tmp_path))

    monkeypatch.setattr(warm_agent.worker, "main", fake_main)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        rank = multiprocessing.get_context("fork").Process(target=forked_rank)
        rank.start()
        rank.join(60)
    finally:
        torch.set_num_threads(threads)
    assert rank.exitcode == 0
    assert seen.read_text() == "1"
