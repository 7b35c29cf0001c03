"""Reading metrics.jsonl back: as written, and as the run stands after its resumes."""

from __future__ import annotations

import json

from launcher.monitor import read_records, read_resumed_records
from launcher.rundir import METRICS


def _write(run_dir, records: list[dict]) -> None:
    lines = [json.dumps(r) for r in records]
    (run_dir / METRICS).write_text("\n".join(lines) + "\n" + '{"kind": "eval", "step": 9')  # one line half written


def test_a_resume_drops_what_was_recorded_past_its_checkpoint_and_is_recorded_again(tmp_path):
    # Killed after step 55's evaluation, before its checkpoint: resumed from step 50.
    evals = [{"kind": "eval", "step": s, "val_acc": s / 100} for s in range(5, 60, 5)]
    trains = [{"kind": "train", "step": s} for s in range(10, 60, 10)]
    again = [{"kind": "eval", "step": 55, "val_acc": 0.56}, {"kind": "eval", "step": 60, "val_acc": 0.6}]
    _write(tmp_path, [*evals, *trains, {"kind": "resume", "step": 50, "checkpoint": "step-00000050"},
                      *again, {"kind": "train", "step": 60}])
    assert len(read_records(tmp_path, "eval")) == 13  # as written: step 55 twice
    resumed = read_resumed_records(tmp_path, "eval")
    assert [r["step"] for r in resumed] == list(range(5, 65, 5))
    assert resumed[-2]["val_acc"] == 0.56  # the resumed run's step 55, not the killed one's
    assert [r["step"] for r in read_resumed_records(tmp_path, "train")] == [10, 20, 30, 40, 50, 60]


def test_a_run_that_never_resumed_reads_as_written(tmp_path):
    records = [{"kind": "eval", "step": s} for s in (5, 10, 15)]
    _write(tmp_path, records)
    assert read_resumed_records(tmp_path, "eval") == read_records(tmp_path, "eval") == records
    assert read_resumed_records(tmp_path / "missing", "eval") == []
