"""The one protocol every backend implements (after submitit's executor/job split).

A backend turns a LaunchPlan, whose run directory already exists and holds plan.json,
into a Job. The CLI only ever talks to these two types.
"""

from __future__ import annotations

from typing import Literal, Protocol

from launcher.plan import LaunchPlan

JobState = Literal["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"]


class Job(Protocol):
    job_id: str
    run_dir: str

    def status(self) -> JobState: ...

    def logs(self, rank: int = 0) -> str:
        """The log of one rank so far."""
        ...

    def cancel(self) -> None:
        """Stop every process of the job."""
        ...

    def wait(self) -> int:
        """Block until the job ends; its exit code (0 on success). A failure is
        reported on stderr naming the rank, its node and its last log lines."""
        ...


class Backend(Protocol):
    def submit(self, plan: LaunchPlan) -> Job: ...
