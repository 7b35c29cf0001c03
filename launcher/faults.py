"""Fault injection, for the reliability tests (tests/faults/) and bench/goodput.py.

DLAUNCH_FAULTS holds a JSON list of faults; each names a rank, what happens to it and
when. Steps count completed optimizer steps, as checkpoints do:

    {"kind": "kill", "rank": 1, "step": 5}
        SIGKILL after step 5 is done (and its checkpoint, when one is due), exactly as
        the OOM killer or a lost node would end the rank.
    {"kind": "kill", "rank": 1, "every": 4}
        attempt A of the job is killed after step 4 * (A + 1): a fault every 4 steps
        that a restarted job always gets past.
    {"kind": "kill_in_checkpoint", "rank": 0, "step": 4}
        SIGKILL in the middle of step 4's checkpoint: its files written, not yet renamed.
    {"kind": "hang", "rank": 1, "step": 5, "where": "collective"}
        the rank sleeps forever where it would enter step 5's loss collective
        ("collective"), or while loading step 5's batch ("data").

A fault fires in the first attempt of the job (DLAUNCH_ATTEMPT, set by the backends at
each restart) unless it names another with "attempt"; "every" fires in all of them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass

FAULTS_VAR = "DLAUNCH_FAULTS"
ATTEMPT_VAR = "DLAUNCH_ATTEMPT"
"""The job's attempt, 0 for the first; each restart after a failure adds one."""


def attempt() -> int:
    return int(os.environ.get(ATTEMPT_VAR, "0"))


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int | None = None
    every: int | None = None
    where: str = "collective"
    attempt: int = 0

    def due(self, kind: str, step: int, rank: int, attempt_now: int) -> bool:
        if kind != self.kind or rank != self.rank:
            return False
        if self.every is not None:
            return step == self.every * (attempt_now + 1)
        return attempt_now == self.attempt and step == self.step


class Faults:
    """The faults this rank is to suffer in this attempt."""

    def __init__(self, faults: list[Fault], rank: int, attempt_now: int) -> None:
        self.faults = faults
        self.rank = rank
        self.attempt = attempt_now

    @classmethod
    def from_env(cls, rank: int) -> Faults:
        spec = json.loads(os.environ.get(FAULTS_VAR, "[]"))
        return cls([Fault(**fault) for fault in spec], rank, attempt())

    def _due(self, kind: str, step: int, where: str | None = None) -> bool:
        return any(f.due(kind, step, self.rank, self.attempt) and (where is None or f.where == where)
                   for f in self.faults)

    def after_step(self, step: int) -> None:
        if self._due("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)

    def in_checkpoint(self, step: int) -> None:
        if self._due("kill_in_checkpoint", step):
            os.kill(os.getpid(), signal.SIGKILL)

    def hang(self, step: int, where: str) -> None:
        if self._due("hang", step, where):
            while True:
                time.sleep(3600)


def spec(*faults: dict) -> dict[str, str]:
    """The environment that injects ``faults``: ``env=spec({"kind": "kill", ...})``."""
    return {FAULTS_VAR: json.dumps(list(faults))}
