#!/usr/bin/env bash
# Equal-work training-step benchmark: peft-rs against transformers + PEFT on
# the same model, fixed random batch and settings (LoRA r=16 all-linear,
# AdamW, NEFTune alpha 5, every token labelled, the frozen base in DTYPE:
# fp32, or bf16 for both), alternating the two stacks RUNS times. Prints tokens/s, peak memory, the model-FLOPs
# utilisation of each against this machine's measured matmul peak, and the
# ratios (median and every run).
#   ./bench/run.sh [BATCH] [SEQ] [STEPS] [RUNS] [DTYPE]
set -euo pipefail
. "$(dirname "$0")/common.sh"
B=${1:-4}; T=${2:-256}; N=${3:-3}; RUNS=${4:-1}; DTYPE=${5:-fp32}
cargo build --release --quiet --example bench_train_step
run() { # name, command...
  local name=$1; shift
  /usr/bin/time -f '%M' -o "$out/$name.mem" "$@" > "$out/$name.json"
}
for r in $(seq 1 "$RUNS"); do
  run "rust-$r" target/release/examples/bench_train_step "$model" "$B" "$T" "$N" --dtype "$DTYPE"
  run "python-$r" "$PYTHON" bench/train_step.py "$model" "$B" "$T" "$N" --dtype "$DTYPE"
done
"$PYTHON" - "$out" "$B" "$T" "$RUNS" "$DTYPE" <<'PY'
import json, statistics, sys, pathlib
d, runs = pathlib.Path(sys.argv[1]), int(sys.argv[4])
res = {k: [json.loads((d / f"{k}-{i}.json").read_text()) for i in range(1, runs + 1)] for k in ("rust", "python")}
mem = {k: [int((d / f"{k}-{i}.mem").read_text().split()[-1]) / 1024 for i in range(1, runs + 1)] for k in ("rust", "python")}
flops = res["rust"][0]["flops_per_step"]
peak = statistics.median(x["matmul_peak_flops"] for x in res["rust"])
med = statistics.median
print(f"LoRA r=16 all-linear training step, batch {sys.argv[2]} x {sys.argv[3]} tokens, SmolLM2-135M {sys.argv[5]} base, NEFTune alpha 5, {runs} run(s)")
print(f"model FLOPs per step {flops / 1e9:.0f} GFLOP; this machine's matmul peak on these shapes {peak / 1e9:.0f} GFLOP/s")
print(f"{'':22}{'tokens/s':>12}{'s/step':>10}{'peak RSS MiB':>14}{'MFU':>8}")
for k, name in (("rust", "peft-rs"), ("python", "transformers+peft")):
    sps = med(x["seconds_per_step"] for x in res[k])
    print(f"{name:22}{med(x['tokens_per_second'] for x in res[k]):12.1f}{sps:10.2f}{med(mem[k]):14.0f}{100 * flops / sps / peak:7.0f}%")
speed = [a["tokens_per_second"] / b["tokens_per_second"] for a, b in zip(res["rust"], res["python"])]
memr = [a / b for a, b in zip(mem["rust"], mem["python"])]
each = lambda v: "" if runs == 1 else " (runs: " + ", ".join(f"{x:.2f}" for x in v) + ")"
print(f"speed ratio (peft-rs / python): {med(speed):.2f}x{each(speed)}")
print(f"memory ratio (peft-rs / python): {med(memr):.2f}x{each(memr)}")
PY
