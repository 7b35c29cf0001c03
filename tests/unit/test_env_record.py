"""env.json's environment: the variables that change how a run behaves, never a credential."""

from __future__ import annotations

import json

from launcher.plan import HostFacts, build_plan
from launcher.recipe import Recipe
from launcher.rundir import ENV, create


def test_env_json_keeps_what_changes_a_run_and_leaves_credentials_out(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the allocator: a CPU step's speed
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("NCCL_IB_TOKEN", "not-for-the-run-dir")  # a kept prefix, a credential's name
    monkeypatch.setenv("EDITOR", "vi")  # changes nothing about a run
    plan = build_plan(Recipe(), host=HostFacts(has_cuda=False, cpus=2, hostname="h"), data=None,
                      run_dir=str(tmp_path / "run"), script="train.py")
    environment = json.loads((create(plan, ["dlaunch", "run"]) / ENV).read_text())["environment"]
    assert environment["MALLOC_ARENA_MAX"] == "2"
    assert environment["LD_PRELOAD"] == "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    assert environment["NCCL_DEBUG"] == "INFO"
    assert "NCCL_IB_TOKEN" not in environment and "EDITOR" not in environment
