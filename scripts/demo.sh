#!/usr/bin/env bash
# The main job, end to end, on the embedded default model (SmolLM2-135M-Instruct):
#   set up -> base answers -> LoRA training without and with NEFTune ->
#   before/after scores -> both loss curves -> merge -> merged answers ==
#   base+adapter answers -> summary of both runs.
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

# Two runs, identical but for NEFTune: alpha 0 and alpha 5.
for alpha in 0 5; do
  dir="$run/lora-r16-neftune$alpha"
  echo
  if [ -f "$dir/adapter_model.safetensors" ]; then
    echo "== reusing the adapter trained earlier in $dir (delete it to train again)"
  else
    echo "== training: LoRA r=16 on all linear layers, NEFTune alpha $alpha, $steps steps"
    rm -rf "$dir"
    $bin train --data "$train" --eval-data "$test" --eval-steps 20 --output "$dir" \
      --lora-rank 16 --neftune-alpha "$alpha" --batch-size 8 --lr 1e-3 --max-steps "$steps" --max-seq-len 128
  fi
  $bin eval --data "$test" --adapter "$dir" --exact-match --json > "$run/eval_after_neftune$alpha.json"
done

echo
echo "== the NEFTune-trained model on the same held-out prompts"
$bin eval --data "$run/show.jsonl" --adapter "$run/lora-r16-neftune5" --exact-match --show 5 > /dev/null

echo
echo "== loss curves of both runs"
$bin plot "$run/lora-r16-neftune0" "$run/lora-r16-neftune5" --labels "no NEFTune,NEFTune alpha 5" --output "$run/loss.png" \
  --title "SmolLM2-135M-Instruct, LoRA r=16, dates task: without and with NEFTune" > /dev/null
echo "   $run/loss.png"

echo
echo "== merging the adapter into the base weights"
# In fp32, so that the merged weights equal base + adapter to float
# rounding: a bf16 merge rounds W + ΔW to bf16, which can flip a near-tie in
# a greedy answer (`merge --verify` measures that).
$bin merge --adapter "$run/lora-r16-neftune5" --output "$run/merged" --overwrite --dtype fp32 > /dev/null
$bin generate --prompts "$run/show.jsonl" --adapter "$run/lora-r16-neftune5" --max-new-tokens 24 --json --dtype fp32 2>/dev/null > "$run/answers_adapter.jsonl"
$bin generate --prompts "$run/show.jsonl" --model "$run/merged" --max-new-tokens 24 --json --dtype fp32 2>/dev/null > "$run/answers_merged.jsonl"
"$PYTHON" - "$run" <<'PY'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
ids = lambda f: [json.loads(l)["token_ids"] for l in (run / f).read_text().splitlines()]
same = ids("answers_adapter.jsonl") == ids("answers_merged.jsonl")
print(f"   merged model's greedy answers {'equal' if same else 'DIFFER FROM'} base+adapter's on {len(ids('answers_merged.jsonl'))} prompts (both fp32)")
sys.exit(0 if same else 1)
PY

"$PYTHON" - "$run" "$start" <<'PY'
import json, sys, time, pathlib
run, start = pathlib.Path(sys.argv[1]), float(sys.argv[2])
load = lambda f: json.loads((run / f).read_text())
b, a0, a5 = load("eval_before.json"), load("eval_after_neftune0.json"), load("eval_after_neftune5.json")
print()
print("== summary: held-out dates (100 examples, never seen in training)")
print(f"   {'':16}{'base':>10}{'alpha 0':>10}{'alpha 5':>10}")
print(f"   {'exact match':16}" + "".join(f"{100 * r['exact_match']:>9.1f}%" for r in (b, a0, a5)))
print(f"   {'eval loss':16}" + "".join(f"{r['loss']:>10.4f}" for r in (b, a0, a5)))
print(f"   {'answer tokens':16}" + "".join(f"{r['mean_tokens']:>10.1f}" for r in (b, a0, a5)))
gap = abs(a5["exact_match"] - a0["exact_match"])
if gap < 0.05:
    print("   NEFTune: this task does not separate the two runs (both learn it); it shows the workflow, not")
    print("   NEFTune's effect. For that, see ./scripts/neftune_study.sh and the README's \"What NEFTune does here\".")
else:
    print(f"   NEFTune changed exact match by {100 * (a5['exact_match'] - a0['exact_match']):+.1f} points on this one seed;")
    print("   one seed on one small task is not evidence of an effect: see ./scripts/neftune_study.sh.")
print(f"   time taken: {time.time() - start:.0f} s")
print(f"   adapters (PEFT format): {run}/lora-r16-neftune0, {run}/lora-r16-neftune5")
print(f"   loss plot (both runs): {run}/loss.png   merged model (alpha 5): {run}/merged")
PY
