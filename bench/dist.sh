#!/usr/bin/env bash
# Data-parallel cost on this machine: `peft-rs train --nproc 2` (c10d over
# Gloo, 127.0.0.1) on the default model, LoRA r=16 all-linear (4.9 M adapter
# parameters, one 19.6 MB fp32 bucket per step), against one process with the
# same global batch. Prints the share of each step spent in the all-reduce
# (including waiting for the slower rank) and both runs' throughput.
#   ./bench/dist.sh [STEPS] [BATCH_PER_RANK] [MAX_LEN]
set -euo pipefail
. "$(dirname "$0")/common.sh"
S=${1:-6}; B=${2:-2}; LEN=${3:-256}
cargo build --release --quiet
alpaca_records 200 "$out/data.json"
common=(--data "$out/data.json" --device cpu --lora-rank 16 --max-steps "$S" --max-seq-len "$LEN" --group-by-length false)
# Two ranks on two cores: each gets one thread, as torchrun would arrange.
OMP_NUM_THREADS=1 target/release/peft-rs train "${common[@]}" --output "$out/two" --batch-size "$B" --nproc 2 > /dev/null 2>&1
target/release/peft-rs train "${common[@]}" --output "$out/one" --batch-size $((2 * B)) > /dev/null 2>&1
"$PYTHON" - "$out" "$S" <<'PY'
import json, sys, pathlib
d, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
two, one = (json.loads((d / r / "train_summary.json").read_text()) for r in ("two", "one"))
print(f"LoRA r=16 all-linear on SmolLM2-135M, {steps} steps, the same global batch in both runs")
print(f"2 ranks (Gloo, 1 thread each): {two['seconds']:.1f} s; all-reduce of the 19.6 MB bucket "
      f"{two['all_reduce_seconds']:.2f} s = {100 * two['all_reduce_seconds'] / two['seconds']:.1f}% of the run, "
      f"waiting for the slower rank {two['wait_for_ranks_seconds']:.2f} s = {100 * two['wait_for_ranks_seconds'] / two['seconds']:.1f}%")
print(f"1 process (2 threads):        {one['seconds']:.1f} s")
print(f"per step: all-reduce {1000 * two['all_reduce_seconds'] / steps:.0f} ms, wait {1000 * two['wait_for_ranks_seconds'] / steps:.0f} ms, "
      f"step {1000 * two['seconds'] / steps:.0f} ms")
PY
