"""What a training rank's host threads do while it trains: read from /proc (Linux) every
half second while a launch runs, for bench/gpu_trainer_overhead.py's --split rows.

The rank is the process that torchrun's agent started (`dlaunch run` and a plain torchrun
alike start ranks so). Over the steady window (the times of two logged steps) it reports
each busy thread's share of a core and the rank's CPU seconds, minor page faults and
context switches per step: a host that does more work per step shows in CPU seconds,
one that waits more (for the GPU, a lock, the scheduler) in the switches and the share.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    time: float
    threads: dict[str, float]
    """CPU seconds so far by thread, keyed "name/tid"; the rank's main thread's tid is its pid."""
    minor_faults: int
    switches: tuple[int, int]
    """The main thread's voluntary and involuntary context switches so far."""


def _stat_fields(path: Path) -> list[str]:
    text = path.read_text()
    return [text[text.index("(") + 1:text.rindex(")")], *text[text.rindex(")") + 2:].split()]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _rank_of(root: int) -> int | None:
    """The first process under ``root`` (or ``root`` itself) whose parent is a torchrun agent."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents.setdefault(int(_stat_fields(entry / "stat")[2]), []).append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue  # ended while read
    todo = [root]
    while todo:
        pid = todo.pop()
        kids = parents.get(pid, [])
        if kids and ("torch.distributed.run" in _cmdline(pid) or "torchrun" in _cmdline(pid)):
            return min(kids)
        todo += kids
    return None


def _switches(pid: int) -> tuple[int, int]:
    values = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(values.get("voluntary_ctxt_switches", 0)), int(values.get("nonvoluntary_ctxt_switches", 0)))


def _sample(pid: int) -> Sample:
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = _stat_fields(task / "stat")
        except OSError:
            continue
        threads[f"{fields[0]}/{task.name}"] = (int(fields[12]) + int(fields[13])) / TICKS
    return Sample(time.time(), threads, int(_stat_fields(Path(f"/proc/{pid}/stat"))[8]), _switches(pid))


class RankSampler:
    """Samples the rank under ``root`` until stopped (a context manager)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.pid: int | None = None
        self.samples: list[Sample] = []
        self.env_names: list[str] = []
        self.cpus_allowed = ""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> RankSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            try:
                if self.pid is None:
                    rank = _rank_of(self.root)
                    if rank is not None:
                        self._follow(rank)
                if self.pid is not None:
                    self.samples.append(_sample(self.pid))
            except (OSError, ValueError):
                if self.pid is not None and not Path(f"/proc/{self.pid}").exists():
                    return  # the rank ended
                continue  # a process ended between two reads

    def _follow(self, pid: int) -> None:
        self.pid, self.samples = pid, []
        self.env_names = sorted(entry.split(b"=", 1)[0].decode(errors="replace")
                                for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if entry)
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        self.cpus_allowed = next((line.split(":", 1)[1].strip() for line in status
                                  if line.startswith("Cpus_allowed_list")), "")

    def window(self, start: float, end: float, steps: int) -> dict:
        """The rank's threads between the times ``start`` and ``end``, over which it ran
        ``steps`` optimizer steps; empty when fewer than two samples fall inside."""
        times = [s.time for s in self.samples]
        first, last = bisect.bisect_left(times, start), bisect.bisect_right(times, end) - 1
        if last <= first or steps <= 0:
            return {}
        a, b = self.samples[first], self.samples[last]
        seconds = b.time - a.time
        steps_inside = steps * seconds / (end - start)  # the steps between the two samples
        busy = {name: (b.threads[name] - a.threads.get(name, 0.0)) / seconds for name in b.threads}
        main = next(name for name in b.threads if name.endswith(f"/{self.pid}"))
        return {
            "cpu_s_per_step": sum(b.threads[n] - a.threads.get(n, 0.0) for n in b.threads) / steps_inside,
            "main_cpu_s_per_step": (b.threads[main] - a.threads.get(main, 0.0)) / steps_inside,
            "minor_faults_per_step": (b.minor_faults - a.minor_faults) / steps_inside,
            "main_switches_per_step": [(y - x) / steps_inside for x, y in zip(a.switches, b.switches)],
            "threads_busy": {n: round(share, 3) for n, share in sorted(busy.items(), key=lambda kv: -kv[1])
                             if share >= 0.02},
            "threads": len(b.threads),
            "cpus_allowed": self.cpus_allowed,
        }
