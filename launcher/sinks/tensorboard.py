"""RUN_DIR/tb: TensorBoard event files. Every number of every record as a scalar
(`train/loss`, `eval/val_acc`), the recipe as text, and at the end the hyperparameters
with the run's final metrics, for the HParams dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from launcher.rundir import TENSORBOARD
from launcher.sinks import Status, as_text, scalars

# The records whose latest numbers the HParams dashboard shows beside the hyperparameters.
_FINAL_KINDS = ("eval", "summary")


class TensorBoardSink:
    def __init__(self, run_dir: Path) -> None:
        self._writer = SummaryWriter(str(run_dir / TENSORBOARD))
        self._params: dict[str, Any] = {}
        self._final: dict[str, float] = {}

    def start(self, params: dict[str, Any], recipe_text: str) -> None:
        # The HParams plugin takes numbers, strings and flags; lists and nulls go as text.
        self._params = {key: value if isinstance(value, (bool, int, float, str)) else as_text(value)
                        for key, value in params.items()}
        self._writer.add_text("recipe", f"```yaml\n{recipe_text}```")

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        numbers = scalars(kind, values)
        for tag, value in numbers.items():
            self._writer.add_scalar(tag, value, step)
        if kind in _FINAL_KINDS:
            self._final.update(numbers)

    def close(self, status: Status) -> None:
        # Written into this run's own event file, beside the scalars it names as metrics
        # (SummaryWriter.add_hparams would start a run of its own in a subfolder).
        writer = self._writer._get_file_writer()
        for summary in hparams(self._params, self._final):
            writer.add_summary(summary)
        self._writer.close()

