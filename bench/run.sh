#!/usr/bin/env bash
# Training-step benchmark: peft-rs against transformers + PEFT in one run, on
# the same model, batch shape and settings (LoRA r=16 all-linear, AdamW,
# NEFTune alpha 5, fp32 on CPU). Prints tokens/s, peak memory and the ratios.
#   ./bench/run.sh [BATCH] [SEQ] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
. scripts/env.sh
B=${1:-4}; T=${2:-256}; N=${3:-3}
model=models/SmolLM2-135M-Instruct
cargo build --release --quiet --example bench_train_step
out=$(mktemp -d)
run() { # name, command...
  local name=$1; shift
  /usr/bin/time -f '%M' -o "$out/$name.mem" "$@" > "$out/$name.json"
}
run rust target/release/examples/bench_train_step "$model" "$B" "$T" "$N"
run python "$PYTHON" bench/train_step.py "$model" "$B" "$T" "$N"
"$PYTHON" - "$out" "$B" "$T" <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
r = {k: json.loads((d / f"{k}.json").read_text()) for k in ("rust", "python")}
m = {k: int((d / f"{k}.mem").read_text().split()[-1]) / 1024 for k in ("rust", "python")}
print(f"LoRA r=16 all-linear training step, batch {sys.argv[2]} x {sys.argv[3]} tokens, SmolLM2-135M fp32, NEFTune alpha 5")
print(f"{'':22}{'tokens/s':>12}{'s/step':>10}{'peak RSS MiB':>14}")
for k, name in (("rust", "peft-rs"), ("python", "transformers+peft")):
    print(f"{name:22}{r[k]['tokens_per_second']:12.1f}{r[k]['seconds_per_step']:10.2f}{m[k]:14.0f}")
print(f"speed ratio (peft-rs / python): {r['rust']['tokens_per_second'] / r['python']['tokens_per_second']:.2f}x")
print(f"memory ratio (peft-rs / python): {m['rust'] / m['python']:.2f}x")
PY
rm -rf "$out"
