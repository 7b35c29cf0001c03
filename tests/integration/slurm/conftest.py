"""The tests in this folder run on a real Slurm: tests/conftest.py's `slurm_cluster`
(which tests/faults shares) brings up slurmctld and four `slurmd -N nodeK` (node1..node4)
on this host, once per test session, in a loopback-only network namespace of its own.
The daemons, the jobs they start (and the Ray clusters those start), and every command the
tests run against the cluster (`SlurmCluster.run`, `.sbatch`, `.dlaunch`) are in it, so
that every server binds 127.0.0.1 alone.

Every test here is marked `slurm`. If the cluster cannot be installed or started, the
tests using it fail (with the daemons' log tails), they are never skipped: CI must not
go green on a machine where nothing ran.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slurm)
