#!/usr/bin/env bash
# QLoRA's memory above libtorch's baseline, on SmolLM2-135M on the CPU at a
# small batch, where the frozen weights and what autograd keeps of them
# dominate: LoRA r=16 all-linear, batch BATCH x LEN tokens, STEPS steps, the
# base in fp32 against nf4 + double quantization (fp32 compute), with and
# without gradient checkpointing. Each run is a fresh process; its peak RSS
# minus the peak of a process that only loaded libtorch (`peft-rs env`) is
# what the run itself costs. Prints each, and nf4's cost against fp32's.
#   ./bench/qlora_memory.sh [BATCH] [LEN] [STEPS]
set -euo pipefail
. "$(dirname "$0")/common.sh"
B=${1:-1}; LEN=${2:-64}; STEPS=${3:-8}
cargo build --release --quiet --bin peft-rs
bin=target/release/peft-rs
alpaca_records $((B * STEPS)) "$out/data.json"
peak() { # name command...: peak RSS in KiB into $out/name.kib
  local name=$1; shift
  /usr/bin/time -f '%M' -o "$out/$name.kib" "$@" > /dev/null 2> "$out/$name.err" \
    || { tail -3 "$out/$name.err" >&2; exit 1; }
}
train() { # name flags...
  local name=$1; shift
  peak "$name" "$bin" train --model "$model" --data "$out/data.json" --output "$out/run-$name" --device cpu \
    --dtype fp32 --lora-rank 16 --target-modules all-linear --batch-size "$B" --max-seq-len "$LEN" \
    --max-steps "$STEPS" "$@"
}
for round in 1 2; do # alternated, twice; the smaller peak of each is kept
  peak "baseline-$round" "$bin" env
  train "fp32-$round" --gradient-checkpointing false
  train "fp32-ckpt-$round" --gradient-checkpointing true
  train "nf4-$round" --quantize nf4 --bnb-4bit-use-double-quant --gradient-checkpointing false
  train "nf4-ckpt-$round" --quantize nf4 --bnb-4bit-use-double-quant
done
"$PYTHON" - "$out" "$B" "$LEN" "$STEPS" <<'PY'
import sys, pathlib
d = pathlib.Path(sys.argv[1])
mib = lambda name: min(int((d / f"{name}-{r}.kib").read_text().split()[-1]) for r in (1, 2)) / 1024
base = mib("baseline")
print(f"QLoRA memory: SmolLM2-135M, LoRA r=16 all-linear, batch {sys.argv[2]} x {sys.argv[3]}, {sys.argv[4]} steps, "
      f"CPU, fp32 compute; baseline (libtorch loaded) {base:.0f} MiB")
rows = [("fp32", "fp32 base"), ("fp32-ckpt", "fp32 base, checkpointing"),
        ("nf4", "nf4 + dq, no checkpointing"), ("nf4-ckpt", "nf4 + dq (default: checkpointing)")]
above = {k: mib(k) - base for k, _ in rows}
print(f"{'':36}{'peak MiB':>10}{'above baseline':>16}{'vs fp32':>9}")
for k, name in rows:
    print(f"{name:36}{mib(k):10.0f}{above[k]:16.0f}{above[k] / above['fp32']:8.2f}x")
PY
