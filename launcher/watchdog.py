"""The built-in trainer's hang watchdog: a rank that has been in one phase of a step
(launcher/progress.py) for longer than train.hang_timeout (train.start_timeout for the
start) ends the run, naming the ranks that did not arrive.

Left to themselves, gloo and NCCL wait out their own timeouts (DeepSpeed's 10 minutes,
torch's 30) and then, if they say anything, name no rank; users report NCCL's silent
wait as a hang (deepspeedai/DeepSpeed#4781). Here every rank runs a daemon thread that
looks, every few seconds, at the phase its rank is in (in memory: nothing is read while
training runs). Once the rank has been in it too long, the thread reads every rank's
progress file and decides:

  - ranks behind the furthest (step, phase) did not arrive there: "rank 1 (node 0,
    loading step 5's batch) did not arrive at step 5's forward/backward within 600 s";
  - every rank in the same phase: all arrived, and the hang is inside it.

then ends its rank with that line as its status. The ranks waiting for a stuck one time
out as it does, and all read the same files, so they reach the same verdict; the first
to decide also writes it to logs/hang-verdict, which the others then report, a rank whose
collective broke because a timed-out peer ended included. Whichever rank a failure report
names, its status says the same thing.

A user's --script writes no progress files: it has no watchdog, only the process group's
timeout.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, NoReturn

from launcher import build_lock
from launcher.plan import LaunchPlan
from launcher.progress import Phase, Position, RankProgress, read_position
from launcher.rundir import hang_verdict
from launcher.worker import write_status

log = logging.getLogger("launcher.watchdog")

PROCESS_GROUP_MARGIN_S = 60
"""How much longer than the watchdog's timeouts the process group's own timeout is, so
that the watchdog, which names ranks, fires first: it needs one wake-up (5 s at most) and
a read of every rank's progress file."""
EXIT_CODE = 1

# What a rank is doing in each phase, and the phase as the place others wait at.
_DOING: dict[Phase, str] = {
    "start": "starting (engine start or resume)",
    "data": "loading step {step}'s batch",
    "compute": "computing step {step}",
    "collective": "in step {step}'s loss collective",
    "update": "applying step {step}'s optimizer update",
    "eval": "evaluating at step {step}",
    "snapshot": "saving step {step}'s snapshot",
    "checkpoint": "writing step {step}'s checkpoint",
    "report": "waiting for Ray Tune to take step {step}'s evaluation",
    "finish": "finishing (the final weights' gather)",
}
_AT: dict[Phase, str] = {
    "start": "the start of training (engine start or resume)",
    "data": "step {step}'s data loading",
    "compute": "step {step}'s forward/backward",
    "collective": "step {step}'s loss collective",
    "update": "step {step}'s optimizer update",
    "eval": "step {step}'s evaluation",
    "snapshot": "step {step}'s snapshot",
    "checkpoint": "step {step}'s checkpoint",
    "report": "Ray Tune's decision on step {step}'s evaluation",
    "finish": "the end of training (the final weights' gather)",
}


class HangTimeout(RuntimeError):
    """A rank waited in one phase longer than train.hang_timeout."""


class Timeouts(NamedTuple):
    """Seconds a rank may spend in one phase: train.hang_timeout, train.start_timeout."""

    hang: float
    start: float | None = None
    """The start's; None: the same as any phase's."""

    @classmethod
    def of(cls, plan: LaunchPlan) -> Timeouts:
        return cls(plan.recipe.train.hang_timeout, plan.recipe.train.start_timeout)

    def seconds(self, phase: Phase) -> float:
        return self.start if phase == "start" and self.start is not None else self.hang

    def describe(self, phase: Phase) -> str:
        key = "start_timeout" if phase == "start" and self.start is not None else "hang_timeout"
        return f"{self.seconds(phase):g} s (train.{key})"


def process_group_timeout(plan: LaunchPlan) -> timedelta:
    """The timeout to give the torch process group: above the watchdog's."""
    timeouts = Timeouts.of(plan)
    return timedelta(seconds=max(timeouts.hang, timeouts.start or 0) + PROCESS_GROUP_MARGIN_S)


def decide(positions: Sequence[Position | None], procs_per_node: int, timeouts: Timeouts) -> str:
    """The verdict on a hang, from every rank's position (None: it has not started
    training), at least one of them known: which ranks did not arrive where the
    furthest ones wait, or, when none is behind, that all have been stuck together."""
    furthest = max(positions, key=_order)
    behind = [rank for rank, position in enumerate(positions) if _order(position) < _order(furthest)]
    limit = timeouts.describe(furthest.phase)
    if not behind:
        who = "rank 0 has" if len(positions) == 1 else f"all {len(positions)} ranks have"
        return (f"{who} been {_doing(furthest)} for over {limit}; every rank arrived, so the hang is "
                "inside it (a collective or the engine)")
    groups: dict[str, list[int]] = {}  # the ranks doing the same thing, in rank order
    for rank in behind:
        groups.setdefault(_doing(positions[rank]), []).append(rank)
    where = "; ".join(f"{_span(ranks)} ({_nodes(ranks, procs_per_node)}, {doing})"
                      for doing, ranks in groups.items())
    return (f"{'rank' if len(behind) == 1 else 'ranks'} {where} did not arrive at "
            f"{_AT[furthest.phase].format(step=furthest.step)} within {limit}")


def _order(position: Position | None) -> tuple[int, int]:
    return (-1, -1) if position is None else position.order()


def _doing(position: Position | None) -> str:
    return "not started training" if position is None else _DOING[position.phase].format(step=position.step)


def _span(numbers: Sequence[int]) -> str:
    """Sorted numbers as runs: 0-3, 8."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def _nodes(ranks: Sequence[int], procs_per_node: int) -> str:
    nodes = sorted({rank // procs_per_node for rank in ranks})
    return f"{'node' if len(nodes) == 1 else 'nodes'} {_span(nodes)}"


class Watchdog:
    """Ends this rank with the verdict once it has been in one phase longer than its
    timeout. Used around the training: leaving the block stops the watch, and turns the
    error of a collective that broke because a peer timed out into the peer's verdict."""

    def __init__(self, plan: LaunchPlan, rank: int, progress: RankProgress) -> None:
        self.run_dir = Path(plan.run_dir)
        self.rank = rank
        self.world_size = plan.topology.world_size
        self.procs_per_node = plan.topology.procs_per_node
        self.timeouts = Timeouts.of(plan)
        self.interval = min(5.0, self.timeouts.hang / 10, self.timeouts.seconds("start") / 10)
        self.progress = progress
        self.started = time.time()  # a verdict written before is a previous attempt's
        self._stopped = False
        # Held from the decision to os._exit: the training cannot finish in between.
        self._ending = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dlaunch-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._ending:
            self._stopped = True
        self._wake.set()
        if isinstance(exc, Exception) and not isinstance(exc, HangTimeout):
            verdict = self._verdict_of_peer()
            if verdict is not None:
                raise HangTimeout(verdict) from exc

    def _watch(self) -> None:
        while not self._wake.wait(self.interval):
            position = self.progress.position
            if position is not None and time.time() - position.since > self.timeouts.seconds(position.phase):
                with self._ending:
                    if not self._stopped:
                        self._end()

    def _end(self) -> NoReturn:
        main = sys._current_frames().get(threading.main_thread().ident or 0)
        verdict = self._verdict_of_peer()
        if verdict is None:
            positions = [read_position(self.run_dir, rank) for rank in range(self.world_size)]
            verdict = decide(positions, self.procs_per_node, self.timeouts)
            lock = build_lock.awaited(main)
            if lock is not None:  # a hang no collective explains, and the fix is a file's name
                verdict += f"; rank {self.rank} {lock.describe()}"
            verdict = self._publish(verdict)
        if main is not None:  # where this rank stood: for the stuck rank, where it is stuck
            log.error("the main thread at the hang timeout (most recent call last):\n%s",
                      "".join(traceback.format_stack(main)).rstrip())
        log.error("HangTimeout: %s", verdict)
        write_status(self.run_dir, self.rank, f"failed: HangTimeout: {verdict}")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # The main thread may be inside a collective that never returns: only an exit
        # that does not wait for it ends the rank. The agent then sees it fail.
        os._exit(EXIT_CODE)

    def _verdict_of_peer(self) -> str | None:
        """The verdict another rank of this attempt wrote, if one did."""
        path = hang_verdict(self.run_dir)
        try:
            if path.stat().st_mtime < self.started:
                return None
            return path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def _publish(self, verdict: str) -> str:
        # A temporary name of this rank's own: ranks that time out together write at once
        # (the same line, decided from the same files).
        temporary = hang_verdict(self.run_dir).with_name(f".hang-verdict.{self.rank}.tmp")
        temporary.write_text(verdict + "\n")
        os.replace(temporary, hang_verdict(self.run_dir))
        return verdict
