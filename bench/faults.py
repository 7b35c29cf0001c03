"""The fault campaign behind docs/reliability.md's table: each fault of tests/faults/,
injected N times at a random rank and step (seeded), each outcome checked.

    .venv/bin/python bench/faults.py [--times 5] [--seed 0] [--out bench/results/faults.json]

Every run is the recipe below on 2 emulated nodes of one process (4 for a lost node),
DeepSpeed ZeRO-2, fp32 on CPU, 12 steps with a checkpoint every 4, train.max_restarts 1.
An outcome is "resumed, identical" when the run ends with exit 0 and every tensor of its
model.pt equal to the uninterrupted run's; "clear error" when it ends non-zero with the
report the fault promises; anything else is counted as a failure and printed. Steps lost:
the steps trained again, from the resumed checkpoint to where the fault struck.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.progress import read_position  # noqa: E402

STEPS, CHECKPOINT_EVERY = 12, 4
RECIPE = """
name: fault
model: {name: mlp, kwargs: {hidden: [32], dropout: 0.1}}
data: {source: synthetic, samples: 400, num_features: 8, num_classes: 3, val_fraction: 0.2}
optim: {lr: 1.0e-2}
schedule: {name: cosine, warmup_steps: 3}
engine: {name: deepspeed, zero_stage: 2}
precision: {dtype: fp32}
train: {micro_batch_size: 8, max_steps: 12, eval_every: 4, checkpoint_every: 4, keep_last: 2,
        max_restarts: 1, hang_timeout: 5, start_timeout: 120, early_stopping: {patience: null}}
logging: {progress: false, report: false}
"""


class Runs:
    """Runs of the recipe under one temporary root, and the uninterrupted ones to compare with."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "recipe.yaml").write_text(RECIPE)
        self.count = 0
        self.straight = {nodes: self.finish(self.start(nodes, {}))[1] for nodes in (2, 4)}

    def start(self, nodes: int, faults: list[dict], *overrides: str) -> tuple[subprocess.Popen, Path]:
        """`dlaunch run` of the recipe on ``nodes`` nodes, with ``faults`` injected."""
        self.count += 1
        runs = self.root / f"run-{self.count}"
        command = [sys.executable, "-m", "launcher", "run", str(self.root / "recipe.yaml"), "--nodes", str(nodes),
                   "--procs-per-node", "1", "--set", f"logging.run_root={runs}", *overrides]
        return self._popen(command, faults), runs

    def resume(self, run_dir: Path) -> subprocess.CompletedProcess:
        process = self._popen([sys.executable, "-m", "launcher", "run", "--resume", str(run_dir)], [])
        _, stderr = process.communicate(timeout=600)
        return subprocess.CompletedProcess(process.args, process.returncode, "", stderr)

    @staticmethod
    def _popen(command: list[str], faults: list[dict]) -> subprocess.Popen:
        env = {**os.environ, "DLAUNCH_FAULTS": json.dumps(faults)}
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    @staticmethod
    def finish(started: tuple[subprocess.Popen, Path]) -> tuple[subprocess.CompletedProcess, Path]:
        process, runs = started
        _, stderr = process.communicate(timeout=600)
        [run_dir] = [p for p in runs.iterdir() if not p.name.startswith(".")]
        return subprocess.CompletedProcess(process.args, process.returncode, "", stderr), run_dir

    def identical(self, run_dir: Path, nodes: int) -> bool:
        expected = torch.load(self.straight[nodes] / "model.pt")
        actual = torch.load(run_dir / "model.pt")
        return expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _resumed_from(run_dir: Path) -> int:
    resumes = _records(run_dir, "resume")
    return resumes[-1]["step"] if resumes else 0


def _outcome(runs: Runs, result: subprocess.CompletedProcess, run_dir: Path, nodes: int, struck_after: int) -> dict:
    if result.returncode == 0 and runs.identical(run_dir, nodes):
        return {"outcome": "resumed, identical", "steps_lost": struck_after - _resumed_from(run_dir)}
    return {"outcome": "FAILED", "detail": result.stderr[-2000:]}


def kill_a_rank(runs: Runs, rng: random.Random) -> dict:
    rank, step = rng.randrange(2), rng.randrange(1, STEPS)
    result, run_dir = runs.finish(runs.start(2, [{"kind": "kill", "rank": rank, "step": step}]))
    return {"rank": rank, "step": step, **_outcome(runs, result, run_dir, 2, step)}


def kill_in_checkpoint(runs: Runs, rng: random.Random) -> dict:
    rank, step = rng.randrange(2), rng.choice(range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY))
    result, run_dir = runs.finish(runs.start(2, [{"kind": "kill_in_checkpoint", "rank": rank, "step": step}]))
    return {"rank": rank, "step": step, **_outcome(runs, result, run_dir, 2, step)}


def corrupt_checkpoint(runs: Runs, rng: random.Random) -> dict:
    """A run stopped after step 8 (no restart: the fault is on disk, not in a process);
    a random file of its step-8 checkpoint damaged; `dlaunch run --resume`."""
    rank = rng.randrange(2)
    _, run_dir = runs.finish(runs.start(2, [{"kind": "kill", "rank": rank, "step": 8}], "--set", "train.max_restarts=0"))
    files = sorted(p for p in (run_dir / "checkpoints" / "step-00000008").rglob("*")
                   if p.is_file() and p.name != "manifest.json")
    victim = rng.choice(files)
    data = bytearray(victim.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = runs.resume(run_dir)
    rejected = [r["checkpoint"] for r in _records(run_dir, "checkpoint_rejected")]
    row = {"rank": rank, "step": 8, "file": str(victim.relative_to(run_dir)), **_outcome(runs, result, run_dir, 2, 8)}
    if rejected != ["step-00000008"]:
        row.update(outcome="FAILED", detail=f"rejected {rejected}")
    return row


def kill_a_node_agent(runs: Runs, rng: random.Random) -> dict:
    node, step = rng.randrange(4), rng.randrange(2, STEPS)
    process, runs_dir = runs.start(4, [])
    run_dir = _wait_for(lambda: next((p for p in runs_dir.iterdir() if not p.name.startswith(".")), None)
                        if runs_dir.exists() else None)
    position = _wait_for(lambda: (p := read_position(run_dir, node)) is not None and p.step >= step and p)
    os.kill(_agent_of(run_dir, node), signal.SIGKILL)
    result, _ = runs.finish((process, runs_dir))
    return {"node": node, "step": position.step, **_outcome(runs, result, run_dir, 4, position.step - 1)}


def hang(where: str) -> Callable[[Runs, random.Random], dict]:
    def inject(runs: Runs, rng: random.Random) -> dict:
        rank, step = rng.randrange(2), rng.randrange(1, STEPS + 1)
        started = time.monotonic()
        result, run_dir = runs.finish(runs.start(2, [{"kind": "hang", "rank": rank, "step": step, "where": where}]))
        named = f"rank {rank} (node {rank}, " in result.stderr and "HangTimeout" in result.stderr
        row = {"rank": rank, "step": step, "seconds": round(time.monotonic() - started, 1),
               **_outcome(runs, result, run_dir, 2, step - 1)}
        if not named:
            row.update(outcome="FAILED", detail="the report does not name the rank\n" + result.stderr[-2000:])
        return row
    return inject


def _wait_for(condition: Callable[[], object], timeout: float = 300) -> object:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError("the run never got there")
        time.sleep(0.05)
    return value


def _agent_of(run_dir: Path, rank: int) -> int:
    """The torch elastic agent of ``rank``: its worker's parent (by pid, never by name)."""
    pid = re.findall(rf"rank {rank} of \d+ on node \d+, pid (\d+)$", (run_dir / "logs" / f"rank-{rank}.log").read_text(),
                     re.MULTILINE)[-1]
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


FAULTS: dict[str, Callable[[Runs, random.Random], dict]] = {
    "SIGKILL of a random rank after a random step": kill_a_rank,
    "SIGKILL of a random rank inside a checkpoint write": kill_in_checkpoint,
    "a byte flipped in a random file of the latest checkpoint": corrupt_checkpoint,
    "SIGKILL of a random node's agent (4 nodes)": kill_a_node_agent,
    "a random rank asleep before a step's collective": hang("collective"),
    "a random rank stuck loading a step's batch": hang("data"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--times", type=int, default=5, help="injections of each fault")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/faults.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    table = {}
    with tempfile.TemporaryDirectory(prefix="dlaunch-faults-") as tmp:
        runs = Runs(Path(tmp))
        for name, inject in FAULTS.items():
            table[name] = [inject(runs, rng) for _ in range(args.times)]
            for row in table[name]:
                if row["outcome"] == "FAILED":
                    print(f"{name}: {json.dumps(row)}", file=sys.stderr)
    print("| fault | injected | outcome | steps lost (each) |\n| --- | --- | --- | --- |")
    for name, rows in table.items():
        outcomes = sorted({row["outcome"] for row in rows})
        lost = ", ".join(str(row.get("steps_lost", "-")) for row in rows)
        counted = "; ".join(f"{outcome}: {sum(row['outcome'] == outcome for row in rows)}" for outcome in outcomes)
        print(f"| {name} | {len(rows)} | {counted} | {lost} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seed": args.seed, "faults": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
