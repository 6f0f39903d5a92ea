#!/usr/bin/env bash
# End-to-end benchmark: training as a user runs it, peft-rs with its default
# settings against transformers' Trainer + PEFT with theirs, on the same Alpaca
# records (LoRA r=16 all-linear, NEFTune alpha 5, batch 4, one epoch,
# completion-only loss, sequences cut at MAX_LEN tokens). Prints wall time,
# real (non-padding) tokens/s and peak RSS of each, and the ratios; with
# RUNS > 1, the median and the spread.
#   ./bench/e2e.sh [RECORDS] [MAX_LEN] [RUNS] [EXTRA peft-rs FLAGS...]
set -euo pipefail
. "$(dirname "$0")/common.sh"
N=${1:-160}; LEN=${2:-256}; RUNS=${3:-1}; shift $(( $# < 3 ? $# : 3 ))
EXTRA=("$@")
cargo build --release --quiet
alpaca_records "$N" "$out/data.json"
for r in $(seq 1 "$RUNS"); do
  /usr/bin/time -f '%M %e' -o "$out/rust-$r.time" target/release/peft-rs train --data "$out/data.json" \
    --output "$out/rust-run-$r" --model "$model" --device cpu --lora-rank 16 --neftune-alpha 5 \
    --batch-size 4 --max-seq-len "$LEN" "${EXTRA[@]}" > /dev/null 2> "$out/rust-$r.log"
  cp "$out/rust-run-$r/train_summary.json" "$out/rust-$r.json"
  /usr/bin/time -f '%M %e' -o "$out/python-$r.time" "$PYTHON" bench/e2e_hf.py "$model" "$out/data.json" "$LEN" \
    "$out/python-$r.json" > /dev/null 2> "$out/python-$r.log"
done
"$PYTHON" - "$out" "$RUNS" "$N" "$LEN" "${EXTRA[*]:-defaults}" <<'PY'
import json, statistics, sys, pathlib
d, runs = pathlib.Path(sys.argv[1]), int(sys.argv[2])
def load(stack):
    rows = []
    for r in range(1, runs + 1):
        kib, wall = (d / f"{stack}-{r}.time").read_text().split()[-2:]
        j = json.loads((d / f"{stack}-{r}.json").read_text())
        tps = j["tokens_per_second"] if stack == "rust" else j["real_tokens"] / j["train_seconds"]
        rows.append({"wall": float(wall), "mib": int(kib) / 1024, "tps": tps})
    return rows
rust, py = load("rust"), load("python")
med = lambda rows, k: statistics.median(x[k] for x in rows)
span = lambda rows, k: f"{min(x[k] for x in rows):.0f}-{max(x[k] for x in rows):.0f}" if runs > 1 else ""
print(f"end to end: {sys.argv[3]} Alpaca records, max length {sys.argv[4]}, batch 4, one epoch, "
      f"SmolLM2-135M on the CPU, LoRA r=16 all-linear, NEFTune 5; peft-rs flags: {sys.argv[5]}; {runs} run(s)")
print(f"{'':20}{'wall s':>10}{'(range)':>12}{'real tok/s':>12}{'peak RSS MiB':>14}{'(range)':>12}")
for name, rows in (("peft-rs", rust), ("transformers+peft", py)):
    print(f"{name:20}{med(rows,'wall'):10.1f}{span(rows,'wall'):>12}{med(rows,'tps'):12.1f}{med(rows,'mib'):14.0f}{span(rows,'mib'):>12}")
speed = [p["wall"] / r["wall"] for r, p in zip(rust, py)]
mem = [r["mib"] / p["mib"] for r, p in zip(rust, py)]
fmt = lambda v: f"{statistics.median(v):.2f}x" + (f" (runs: {', '.join(f'{x:.2f}' for x in v)})" if runs > 1 else "")
print(f"speed (python wall / peft-rs wall): {fmt(speed)}")
print(f"memory (peft-rs peak / python peak): {fmt(mem)}")
PY
