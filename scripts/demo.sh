#!/usr/bin/env bash
# The main job, end to end, on the embedded default model (SmolLM2-135M-Instruct):
#   set up -> base answers -> LoRA + NEFTune training -> before/after scores ->
#   loss plot -> merge -> merged answers == base+adapter answers -> summary.
# Running it again reuses the trained adapter and the set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
./scripts/setup.sh
. scripts/env.sh
echo "== building the release binary"
cargo build --release --quiet
bin=target/release/peft-rs
run=${DEMO_RUN:-runs/demo}
steps=${DEMO_STEPS:-100}
train=data/dates/train.jsonl
test=data/dates/test.jsonl
mkdir -p "$run"
$bin env | sed 's/^/   /'

echo
echo "== the base model on held-out prompts (the task: rewrite a date as YYYY-MM-DD)"
head -n 5 "$test" > "$run/show.jsonl"
$bin eval --data "$run/show.jsonl" --exact-match --show 5 > /dev/null

echo
echo "== scoring the base model on all $(wc -l < "$test") held-out examples"
$bin eval --data "$test" --exact-match --json > "$run/eval_before.json"

echo
if [ -f "$run/lora-r16-neftune5/adapter_model.safetensors" ]; then
  echo "== reusing the adapter trained earlier in $run/lora-r16-neftune5 (delete it to train again)"
else
  echo "== training: LoRA r=16 on all linear layers, NEFTune alpha 5, $steps steps"
  rm -rf "$run/lora-r16-neftune5"
  $bin train --data "$train" --eval-data "$test" --eval-steps 20 --output "$run/lora-r16-neftune5" \
    --lora-rank 16 --neftune-alpha 5 --batch-size 8 --lr 1e-3 --max-steps "$steps" --max-seq-len 128
fi

echo
echo "== the trained model on the same held-out prompts"
$bin eval --data "$run/show.jsonl" --adapter "$run/lora-r16-neftune5" --exact-match --show 5 > /dev/null
$bin eval --data "$test" --adapter "$run/lora-r16-neftune5" --exact-match --json > "$run/eval_after.json"

echo
echo "== loss curves"
$bin plot "$run/lora-r16-neftune5" --output "$run/loss.png" --title "SmolLM2-135M-Instruct, LoRA r=16 + NEFTune (alpha 5), dates task" > /dev/null
echo "   $run/loss.png"

echo
echo "== merging the adapter into the base weights"
$bin merge --adapter "$run/lora-r16-neftune5" --output "$run/merged" --overwrite > /dev/null
$bin generate --prompts "$run/show.jsonl" --adapter "$run/lora-r16-neftune5" --max-new-tokens 24 --json 2>/dev/null > "$run/answers_adapter.jsonl"
$bin generate --prompts "$run/show.jsonl" --model "$run/merged" --max-new-tokens 24 --json 2>/dev/null > "$run/answers_merged.jsonl"
"$PYTHON" - "$run" <<'PY'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
ids = lambda f: [json.loads(l)["token_ids"] for l in (run / f).read_text().splitlines()]
same = ids("answers_adapter.jsonl") == ids("answers_merged.jsonl")
print(f"   merged model's greedy answers {'equal' if same else 'DIFFER FROM'} base+adapter's on {len(ids('answers_merged.jsonl'))} prompts")
sys.exit(0 if same else 1)
PY

"$PYTHON" - "$run" "$start" <<'PY'
import json, sys, time, pathlib
run, start = pathlib.Path(sys.argv[1]), float(sys.argv[2])
b = json.loads((run / "eval_before.json").read_text())
a = json.loads((run / "eval_after.json").read_text())
print()
print("== summary: held-out dates (100 examples, never seen in training)")
print(f"   {'':16}{'before':>10}{'after':>10}")
print(f"   {'exact match':16}{100 * b['exact_match']:>9.1f}%{100 * a['exact_match']:>9.1f}%")
print(f"   {'eval loss':16}{b['loss']:>10.4f}{a['loss']:>10.4f}")
print(f"   {'perplexity':16}{b['perplexity']:>10.3f}{a['perplexity']:>10.3f}")
print(f"   time taken: {time.time() - start:.0f} s")
print(f"   adapter (PEFT format): {run}/lora-r16-neftune5   metrics: {run}/lora-r16-neftune5/metrics.jsonl")
print(f"   loss plot: {run}/loss.png   merged model: {run}/merged")
PY
