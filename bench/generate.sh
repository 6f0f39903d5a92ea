#!/usr/bin/env bash
# Generation benchmark: greedy answers to the demo's 100 held-out chat prompts
# (data/dates/test.jsonl), one prompt at a time and in batches, in peft-rs and
# in transformers' batched generate, in one run. Prints prompts/s and the
# speed-ups.
#   ./bench/generate.sh [BATCH] [MAX_NEW_TOKENS]
set -euo pipefail
. "$(dirname "$0")/common.sh"
B=${1:-16}; M=${2:-24}
data=data/dates/test.jsonl
cargo build --release --quiet
for b in 1 "$B"; do
  target/release/peft-rs eval --data "$data" --exact-match --batch-size "$b" --max-new-tokens "$M" \
    --device cpu --json 2>/dev/null > "$out/rust-$b.json"
done
"$PYTHON" bench/generate_hf.py "$model" "$data" "$B" "$M" > "$out/python.json"
"$PYTHON" - "$out" "$B" "$M" <<'PY'
import json, sys, pathlib
d, b = pathlib.Path(sys.argv[1]), sys.argv[2]
one = json.loads((d / "rust-1.json").read_text())
many = json.loads((d / f"rust-{b}.json").read_text())
py = json.loads((d / "python.json").read_text())
print(f"greedy generation, 100 chat prompts of data/dates/test.jsonl, up to {sys.argv[3]} new tokens, SmolLM2-135M fp32 CPU")
print(f"{'':34}{'prompts/s':>10}{'exact match':>13}")
print(f"{'peft-rs, one prompt at a time':34}{one['prompts_per_second']:10.2f}{100 * one['exact_match']:12.0f}%")
print(f"{'peft-rs, batches of ' + b:34}{many['prompts_per_second']:10.2f}{100 * many['exact_match']:12.0f}%")
print(f"{'transformers, batches of ' + b:34}{py['prompts_per_second']:10.2f}")
print(f"batching speed-up: {many['prompts_per_second'] / one['prompts_per_second']:.1f}x; "
      f"peft-rs / transformers at batch {b}: {many['prompts_per_second'] / py['prompts_per_second']:.2f}x")
PY
