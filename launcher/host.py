"""Facts about the launching host, read without importing torch (the CLI must stay fast)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from launcher.plan import HostFacts


def _has_cuda() -> bool:
    # CUDA_VISIBLE_DEVICES="" hides every GPU, as it does for torch.
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def detect_host() -> HostFacts:
    return HostFacts(has_cuda=_has_cuda(), cpus=len(os.sched_getaffinity(0)),
                     hostname=socket.gethostname())
