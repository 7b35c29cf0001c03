"""Scaling on the local backend: samples/s of the same job at 1, 2 and 4 ranks (one
emulated node, the micro-batch per rank fixed, so the global batch grows with the ranks).

    .venv/bin/python bench/scaling.py [--repeats 3] [--steps 60] [--out bench/results/scaling.json]

On a machine with fewer cores than ranks this measures overhead, not speed-up: the ranks
share the cores (dlaunch gives each rank cores // ranks intra-op threads, at least one),
so the ideal is flat samples/s, and what falls below it is the cost of the collectives,
the processes and the sharding. The job is bench/trainer_overhead.py's, under DeepSpeed
ZeRO-2 and ZeRO-3; the median of each run's logged windows past the first, then of the
repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import launchers  # noqa: E402
from trainer_overhead import LOG_EVERY, measure  # noqa: E402

RANKS = (1, 2, 4)
STAGES = (2, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="bench/results/scaling.json")
    args = parser.parse_args()

    rates: dict[tuple[int, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="dlaunch-scaling-") as tmp:
        for repeat in range(args.repeats):
            for stage in STAGES:
                for ranks in RANKS if repeat % 2 == 0 else reversed(RANKS):
                    launch = launchers.dlaunch(Path(tmp), f"z{stage}-n{ranks}-r{repeat}",
                                               f"{{name: deepspeed, zero_stage: {stage}}}", args.steps, LOG_EVERY,
                                               ranks=ranks)
                    rates.setdefault((stage, ranks), []).append(measure(launch))

    rows = []
    for (stage, ranks), values in sorted(rates.items()):
        median = statistics.median(values)
        single = statistics.median(rates[(stage, 1)])
        rows.append({"zero_stage": stage, "ranks": ranks, "samples_per_s": median, "min": min(values),
                     "max": max(values), "vs_1_rank": median / single, "runs": values})
    print(f"{os.cpu_count()} CPU cores")
    print(f"{'engine':<18} {'ranks':>5} {'samples/s':>10} {'spread':>15} {'vs 1 rank':>9}")
    for row in rows:
        print(f"{'DeepSpeed ZeRO-' + str(row['zero_stage']):<18} {row['ranks']:>5} {row['samples_per_s']:>10.1f} "
              f"{row['min']:>7.1f}-{row['max']:<7.1f} {row['vs_1_rank']:>9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "steps": args.steps,
                               "shape": launchers.SHAPE, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
