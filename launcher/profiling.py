"""A window of training steps under torch.profiler (`logging.profile`): where a step's
time goes, on the CPU and, on a GPU, in its kernels.

Each rank writes RUN_DIR/profile/rank-N.trace.json (a Chrome trace: open it in Perfetto
or chrome://tracing) and rank-N.txt, the operators that took the most time over the
window (torch's key_averages table). Each step of the window is a `ProfilerStep#K` span
in the trace, K the optimizer step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from launcher.recipe import ProfileConfig

TABLE_ROWS = 40


class StepProfiler:
    """Profiles steps ``start_step`` .. ``start_step + steps - 1`` (1-based optimizer
    steps) of one rank. A run stopped early inside the window writes the steps it
    recorded; a run resumed past ``start_step`` profiles nothing."""

    def __init__(self, cfg: ProfileConfig | None, out: Path, rank: int, on_gpu: bool) -> None:
        self.cfg, self.out, self.rank, self.on_gpu = cfg, out, rank, on_gpu
        self.active: profile | None = None
        self.span: record_function | None = None
        self.steps_recorded = 0

    def before_step(self, step: int) -> None:
        """``step``: the optimizer step about to run."""
        if self.cfg is None:
            return
        if self.active is None and step == self.cfg.start_step:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_gpu else [])
            self.active = profile(activities=activities)
            self.active.start()
        if self.active is not None:
            self.span = record_function(f"ProfilerStep#{step}")
            self.span.__enter__()

    def after_step(self, step: int) -> None:
        """``step``: the optimizer step just finished."""
        if self.active is None:
            return
        self._end_span()
        self.steps_recorded += 1
        if step >= self.cfg.start_step + self.cfg.steps - 1:
            self.close()

    def _end_span(self) -> None:
        if self.span is not None:
            span, self.span = self.span, None
            span.__exit__(None, None, None)

    def close(self) -> None:
        """Stop and write, if the window is open (the trainer calls it when it stops)."""
        if self.active is None:
            return
        self._end_span()  # a step cut short by the end of the run
        active, self.active = self.active, None
        if self.on_gpu:
            torch.cuda.synchronize()  # the window's kernels finish inside it
        active.stop()
        if self.steps_recorded == 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        active.export_chrome_trace(str(self.out / f"rank-{self.rank}.trace.json"))
        sort_by = "self_device_time_total" if self.on_gpu else "self_cpu_time_total"
        table = active.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS)
        (self.out / f"rank-{self.rank}.txt").write_text(
            f"rank {self.rank}: {self.steps_recorded} steps from step {self.cfg.start_step}, by {sort_by}\n{table}\n")
