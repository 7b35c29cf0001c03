"""A rank's stop handler (launcher/worker.py) runs once. The stop signal reaches a forked
rank twice as a rule: once in its agent's process group, then from the agent. A second
run of the handler inside the first, after the first has closed the logging handlers,
printed a `--- Logging error ---` traceback on rank 0's terminal (a CI run caught it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.conftest import REPO

# The rank's handlers, and a log on stderr as rank 0 has it. The second SIGTERM is sent
# at the worst moment, just after the handler has shut logging down, by wrapping that
# call: the handler's own order decides everything else.
RANK = """
import logging, os, signal, sys, time
from pathlib import Path
from launcher import worker
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
shutdown = logging.shutdown
def shutdown_then_signalled_again():
    logging.shutdown = shutdown
    shutdown()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)  # a handler still installed runs here, and logs again
logging.shutdown = shutdown_then_signalled_again
worker._stop_on_signal(Path(sys.argv[1]), 0)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_second_stop_signal_during_the_stop_is_ignored(tmp_path):
    (tmp_path / "logs").mkdir()
    rank = subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert rank.stdout.readline() == "ready\n"
        rank.send_signal(signal.SIGTERM)
        _, err = rank.communicate(timeout=60)
    finally:
        rank.kill()  # no-op once it has ended
        rank.wait()
    assert rank.returncode == 128 + signal.SIGTERM
    assert err.splitlines() == ["WARNING:launcher:stopped by SIGTERM"]
    assert (tmp_path / "logs" / "rank-0.status").read_text() == "terminated: SIGTERM\n"
