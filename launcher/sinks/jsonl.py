"""RUN_DIR/metrics.jsonl, the run's own record: one JSON object a line,
{"kind", "step", "time", ...values}, the first of kind "hparams"."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from launcher.rundir import METRICS
from launcher.sinks import Status


class JsonlSink:
    def __init__(self, run_dir: Path) -> None:
        self._file = open(run_dir / METRICS, "a", buffering=1)  # noqa: SIM115 (closed in close)

    def start(self, params: dict[str, Any], recipe_text: str) -> None:
        if self._file.tell() == 0:  # a resumed run has its hparams record already
            self.write("hparams", 0, {"params": params})

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")

    def close(self, status: Status) -> None:
        self._file.close()
