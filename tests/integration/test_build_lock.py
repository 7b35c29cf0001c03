"""torch's lock on a C++ extension build (launcher/build_lock.py): a rank stopped while it
builds leaves none behind, and a run that waits for one left behind says which file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, dlaunch, gone, processes_holding

pytestmark = pytest.mark.integration

# A rank (the worker's stop handlers) that builds a real extension: torch writes the
# sources, takes the lock and runs ninja, whose compilers take seconds over torch's headers.
BUILDING_RANK = """
import sys
from pathlib import Path
from launcher import worker
worker._stop_on_signal(Path(sys.argv[1]), 0)
from torch.utils.cpp_extension import load_inline
load_inline("dlaunch_test_op", cpp_sources="#include <torch/extension.h>\\nint one() { return 1; }",
            functions=["one"])
"""


def test_a_rank_stopped_mid_build_ends_the_build_and_removes_its_lock(tmp_path):
    extensions = tmp_path / "extensions"
    lock = extensions / "dlaunch_test_op" / "lock"
    (tmp_path / "run" / "logs").mkdir(parents=True)
    rank = subprocess.Popen([sys.executable, "-c", BUILDING_RANK, str(tmp_path / "run")], cwd=REPO,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)})
    try:
        deadline = time.monotonic() + 120
        # Compiling: the lock is taken and a compiler names the build folder's source.
        while not (lock.exists() and [pid for pid in processes_holding(str(extensions)) if pid != rank.pid]):
            assert rank.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        build = [pid for pid in processes_holding(str(extensions)) if pid != rank.pid]
        rank.send_signal(signal.SIGTERM)
        assert rank.wait(60) == 128 + signal.SIGTERM
    finally:
        rank.kill()  # no-op once it has ended
        rank.wait()
    assert not lock.exists()
    assert all(gone(pid) for pid in build)
    assert not (extensions / "dlaunch_test_op" / "dlaunch_test_op.so").exists()


def test_a_start_that_waits_for_a_left_lock_names_it(tmp_path):
    """DeepSpeed's CPU Adam (ZeRO offload) in a build folder whose lock a stopped build
    left: the start times out, and the report names the file to delete. (No `cpu_adam`
    mark: the ranks wait in a folder of the test's own, and never build.)"""
    extensions = tmp_path / "extensions"
    lock = extensions / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{name: mlp, kwargs: {{hidden: [8]}}}}
data: {{source: synthetic, samples: 64, num_features: 4, num_classes: 2}}
engine: {{name: deepspeed, zero_stage: 2, offload_optimizer: true}}
train: {{micro_batch_size: 8, max_steps: 2, start_timeout: 10}}
logging: {{run_root: {tmp_path / 'runs'}, progress: false, report: false}}
""")
    result = dlaunch("run", str(recipe), "--procs-per-node", "2", env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert result.returncode == 1
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    # Whichever rank's watchdog fires first names the lock: both wait for it.
    assert re.search(f"; rank [01] waits for the lock {re.escape(str(lock))} of a C\\+\\+ extension build that "
                     "no process on this host holds: a build stopped midway left it; delete it, unless a "
                     "process on another host builds in that folder$", error), error
    assert lock.exists()  # named, not removed: a build on another host may hold it
