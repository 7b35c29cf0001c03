"""Where metrics go: metrics.jsonl (the record), TensorBoard, and rank 0's progress bar."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from launcher.rundir import METRICS, TENSORBOARD


def read_records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The records of ``kind`` in RUN_DIR/metrics.jsonl, oldest first; a line still being
    written (no closing brace yet) is left out."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r for r in records if r["kind"] == kind]


class MetricsLog:
    """Rank 0's sinks. Each record is one JSON line: {"kind", "step", "time", ...values}."""

    def __init__(self, run_dir: Path, *, tensorboard: bool) -> None:
        self._file = open(run_dir / METRICS, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / TENSORBOARD))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        # JSON has no NaN or Infinity: a skipped step's loss is written as null.
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar with loss, LR, samples/s; tqdm supplies the ETA."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=0.5, smoothing=0.1)

    def update(self, values: dict[str, str]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
