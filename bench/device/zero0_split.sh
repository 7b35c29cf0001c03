#!/bin/bash
# On the GPU machine, from the checkout's root with .whl/ beside it: the ZeRO-0 split of
# bench/gpu_trainer_overhead.py (9 rows, one round, about 45 s each), into
# bench/results/gpu_trainer_split_zero0.json, copied with the log into $OUT (the device
# tool's output folder), also when a time limit cuts the run.
#   run(command="bash bench/device/zero0_split.sh", carry=[".whl"], timeout_s=600)
: "${OUT:?set OUT to the folder the results are copied to}"
source bench/device/setup.sh
save() { cp bench/results/gpu_trainer_split_zero0.json "$OUT/" 2>/dev/null; true; }
trap save EXIT
timeout 540 python3 bench/gpu_trainer_overhead.py --split 1 --stage 0 2>&1 | tee "$OUT/split0.log" \
  | grep -v -E "^\[20|WARNING|warn"
