"""Where metrics go: rank 0's sinks (metrics.jsonl, the record; TensorBoard, MLflow, W&B) and
its progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from launcher.plan import LaunchPlan
from launcher.rundir import METRICS
from launcher.sinks import Status, hyperparameters, open_sinks, recipe_text


def _all_records(run_dir: Path) -> list[dict[str, Any]]:
    """RUN_DIR/metrics.jsonl's records, oldest first; a line still being written (no
    closing brace yet) is left out."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def read_records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The records of ``kind`` in RUN_DIR/metrics.jsonl, oldest first, as written."""
    return [r for r in _all_records(run_dir) if r["kind"] == kind]


def read_resumed_records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The records of ``kind`` of the run as it stands. A run killed after recording
    step N's evaluation but before checkpointing step N resumes from an earlier
    checkpoint and records step N again: a resume from step S drops what was recorded
    past S before it."""
    kept: list[dict[str, Any]] = []
    for record in _all_records(run_dir):
        if record["kind"] == "resume":
            kept = [r for r in kept if r.get("step", 0) <= record["step"]]
        elif record["kind"] == kind:
            kept.append(record)
    return kept


class MetricsLog:
    """Rank 0's sinks (launcher/sinks): metrics.jsonl, and TensorBoard, MLflow and W&B as
    the recipe says. Each gets the hyperparameters when the run starts, every record, and
    how the run ended."""

    def __init__(self, plan: LaunchPlan) -> None:
        self._sinks = open_sinks(plan)
        params, text = hyperparameters(plan), recipe_text(plan)
        for sink in self._sinks:
            sink.start(params, text)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        # JSON has no NaN or Infinity: a skipped step's loss is written as null.
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        for sink in self._sinks:
            sink.write(kind, step, values)

    def close(self, status: Status = "finished") -> None:
        """End every sink once; a second call (training failed after the end) does nothing."""
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close(status)


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
