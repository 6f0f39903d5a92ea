#!/usr/bin/env bash
# QLoRA benchmark: one LoRA training run on SmolLM2-135M on the CPU three
# ways, on the same Alpaca records and settings (LoRA r=16 all-linear,
# NEFTune alpha 5, batch 4, one epoch, completion-only loss, sequences cut at
# MAX_LEN tokens, gradient checkpointing on in all three, as QLoRA's
# prepare_model_for_kbit_training sets it):
#   peft-rs fp32 base, peft-rs --quantize nf4 --bnb-4bit-use-double-quant,
#   transformers' Trainer + PEFT on a bitsandbytes nf4 + double-quant base.
# Prints peak RSS, real (non-padding) tokens/s, the bytes of the frozen weights
# and the bytes per parameter of the 4-bit layers, and the ratios.
#   ./bench/qlora.sh [RECORDS] [MAX_LEN]
set -euo pipefail
. "$(dirname "$0")/common.sh"
N=${1:-80}; LEN=${2:-256}
cargo build --release --quiet
alpaca_records "$N" "$out/data.json"
run_rust() {
  local name=$1; shift
  /usr/bin/time -f '%M %e' -o "$out/$name.time" target/release/peft-rs train --data "$out/data.json" \
    --output "$out/$name-run" --model "$model" --device cpu --dtype fp32 --lora-rank 16 --neftune-alpha 5 \
    --batch-size 4 --max-seq-len "$LEN" --gradient-checkpointing "$@" > /dev/null 2> "$out/$name.log"
  cp "$out/$name-run/train_summary.json" "$out/$name.json"
}
run_rust fp32
run_rust nf4 --quantize nf4 --bnb-4bit-use-double-quant
/usr/bin/time -f '%M %e' -o "$out/python.time" "$PYTHON" bench/qlora_hf.py "$model" "$out/data.json" "$LEN" \
  "$out/python.json" > /dev/null 2> "$out/python.log"
"$PYTHON" - "$out" "$N" "$LEN" <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
rows = {}
for name in ("fp32", "nf4", "python"):
    kib, wall = (d / f"{name}.time").read_text().split()[-2:]
    j = json.loads((d / f"{name}.json").read_text())
    tps = j["tokens_per_second"] if name != "python" else j["real_tokens"] / j["train_seconds"]
    rows[name] = dict(wall=float(wall), mib=int(kib) / 1024, tps=tps,
                      frozen=j["frozen_weight_bytes"] / 2**20, bpp=j.get("quantized_bytes_per_param"))
print(f"QLoRA: {sys.argv[2]} Alpaca records, max length {sys.argv[3]}, batch 4, one epoch, SmolLM2-135M on the CPU, "
      "LoRA r=16 all-linear, NEFTune 5, gradient checkpointing")
print(f"{'':34}{'wall s':>8}{'real tok/s':>12}{'peak RSS MiB':>14}{'frozen MiB':>12}{'4-bit B/param':>15}")
names = {"fp32": "peft-rs fp32", "nf4": "peft-rs nf4 + double quant", "python": "PEFT + bitsandbytes nf4 + dq"}
for k, r in rows.items():
    bpp = f"{r['bpp']:.4f}" if r["bpp"] else "-"
    print(f"{names[k]:34}{r['wall']:8.1f}{r['tps']:12.1f}{r['mib']:14.0f}{r['frozen']:12.1f}{bpp:>15}")
f, q, p = rows["fp32"], rows["nf4"], rows["python"]
print(f"peft-rs nf4 vs fp32: peak RSS {q['mib'] / f['mib']:.2f}x, frozen weights {q['frozen'] / f['frozen']:.2f}x, "
      f"tokens/s {q['tps'] / f['tps']:.2f}x")
print(f"peft-rs nf4 vs PEFT + bitsandbytes: peak RSS {q['mib'] / p['mib']:.2f}x, tokens/s {q['tps'] / p['tps']:.2f}x")
PY
