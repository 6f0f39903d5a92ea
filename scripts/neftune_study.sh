#!/usr/bin/env bash
# What NEFTune does, measured: LoRA fine-tuning of the default model on the
# shared Alpaca records under identical settings, with and without noise, then
# for every run:
#   - the training loss (noise on) and the held-out Alpaca loss (noise off),
#   - greedy answers to instructions nobody trained on (data/instructions),
#     described by length, distinct-2, repetition and truncation,
#   - ROUGE-L of answers to training instructions against the training answers
#     (the paper's measure of overfitting).
# Writes $STUDY_DIR/report.md, report.json and curves.png. Finished runs are
# reused, so the study can be stopped and started again, or extended with more
# seeds (SEEDS="1 2 3").
#
# Settings (environment): SEEDS ("1 2"), RUNS (names from the table below),
# N_TRAIN (96 records), EPOCHS (3), N_EVAL (32), N_PROBE (16), MAX_NEW (128),
# LR (5e-4), MODEL (default model), DEVICE (auto), STUDY_DIR (runs/neftune-study),
# PEFT_RS_BIN (a peft-rs binary to use instead of building one).
# On a GPU with a 7B base: MODEL=/path/to/Llama-2-7b-hf N_TRAIN=5000 EPOCHS=3 \
#   LR=2e-4 MAX_NEW=512 ./scripts/neftune_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh > /dev/null
. scripts/env.sh
[ -n "${PEFT_RS_BIN:-}" ] || cargo build --release --quiet
bin=${PEFT_RS_BIN:-$PWD/target/release/peft-rs}

study=${STUDY_DIR:-runs/neftune-study}
seeds=${SEEDS:-1 2}
n_train=${N_TRAIN:-96}
epochs=${EPOCHS:-3}
n_eval=${N_EVAL:-32}
n_probe=${N_PROBE:-16}
max_new=${MAX_NEW:-128}
lr=${LR:-5e-4}
device=${DEVICE:-auto}
model_args=()
[ -n "${MODEL:-}" ] && model_args=(--model "$MODEL")
data=${PEFT_RS_SHARED:-../shared}/data/alpaca_5000.json
heldout=data/instructions/heldout.jsonl
[ -f "$data" ] || { echo "error: $data not found: the study trains on the shared Alpaca records (set PEFT_RS_SHARED to the folder that holds data/alpaca_5000.json)" >&2; exit 1; }

# name | what the report calls it | train flags
runs_table="alpha0|no noise|--neftune-alpha 0
paper5|alpha 5, paper|--neftune-alpha 5 --neftune-mode paper
paper10|alpha 10, paper|--neftune-alpha 10 --neftune-mode paper
hf5|alpha 5, hf|--neftune-alpha 5 --neftune-mode hf
gauss5|alpha 5, paper, gaussian|--neftune-alpha 5 --neftune-mode paper --neftune-noise gaussian
paper15|alpha 15, paper|--neftune-alpha 15 --neftune-mode paper"
selected=${RUNS:-alpha0 paper5 paper10 hf5 gauss5}

mkdir -p "$study"
# The same records for every run: the first N_TRAIN for training, the next
# N_EVAL held out for the loss, the first N_PROBE training records as probes.
"$PYTHON" - "$data" "$study" "$n_train" "$n_eval" "$n_probe" "$heldout" <<'PY'
import json, sys, pathlib
data, study, n_train, n_eval, n_probe, heldout = sys.argv[1], pathlib.Path(sys.argv[2]), *map(int, sys.argv[3:6]), sys.argv[6]
records = json.load(open(data))
train, held = records[:n_train], records[n_train:n_train + n_eval]
def write(name, rows):
    text = json.dumps(rows, ensure_ascii=False, indent=0)
    path = study / name
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
write("train.json", train)
write("eval.json", held)
write("train_probe.json", train[:n_probe])
seen = {r["instruction"].strip().lower() for r in records}
for line in open(heldout):
    ins = json.loads(line)["instruction"].strip().lower()
    if ins in seen:
        sys.exit(f"error: {heldout}: instruction {ins!r} is also in the training data")
PY

steps_per_epoch=$(( (n_train + 3) / 4 ))
total=0
for seed in $seeds; do for name in $selected; do total=$((total + 1)); done; done
echo "== NEFTune study: ${total} runs ($selected; seeds $seeds), $n_train records x $epochs epochs, LoRA r=16, lr $lr"
start=$(date +%s)

answer_stats() { # adapter-or-empty, data, output json
  local adapter=() ; [ -n "$1" ] && adapter=(--adapter "$1")
  "$bin" eval "${model_args[@]}" "${adapter[@]}" --device "$device" --data "$2" --exact-match \
    --max-new-tokens "$max_new" --max-seq-len 512 --json --answers-out "${3%.json}_answers.jsonl" > "$3.tmp"
  mv "$3.tmp" "$3"
}

if [ ! -f "$study/base/heldout.json" ] || [ ! -f "$study/base/train_probe.json" ]; then
  echo "-- the base model without adapter"
  mkdir -p "$study/base"
  answer_stats "" "$heldout" "$study/base/heldout.json"
  answer_stats "" "$study/train_probe.json" "$study/base/train_probe.json"
fi

done_runs=0
for seed in $seeds; do
  for name in $selected; do
    line=$(grep "^$name|" <<< "$runs_table") || { echo "error: RUNS names unknown run '$name' (known: $(cut -d'|' -f1 <<< "$runs_table" | tr '\n' ' '))" >&2; exit 1; }
    flags=$(cut -d'|' -f3 <<< "$line")
    dir="$study/$name-seed$seed"
    done_runs=$((done_runs + 1))
    if [ -f "$dir/train_probe.json" ]; then
      echo "-- [$done_runs/$total] $name seed $seed: reusing $dir"
      continue
    fi
    echo "-- [$done_runs/$total] $name seed $seed ($(( $(date +%s) - start )) s so far)"
    if [ ! -f "$dir/adapter_model.safetensors" ]; then
      rm -rf "$dir"
      # shellcheck disable=SC2086
      if ! "$bin" train "${model_args[@]}" --device "$device" --data "$study/train.json" --eval-data "$study/eval.json" \
        --output "$dir" --lora-rank 16 --lora-alpha 32 --lr "$lr" --epochs "$epochs" --batch-size 4 \
        --max-seq-len 256 --eval-steps "$(( (steps_per_epoch + 1) / 2 ))" --logging-steps 1 --seed "$seed" $flags \
        > "$study/$name-seed$seed.log" 2>&1; then
        tail -n 5 "$study/$name-seed$seed.log" >&2
        echo "error: training $name seed $seed failed (log: $study/$name-seed$seed.log)" >&2
        exit 1
      fi
      grep -E "^step .*eval|eval loss" "$study/$name-seed$seed.log" | tail -n 1 || true
      [ -f "$dir/adapter_model.safetensors" ] || { echo "error: training $name seed $seed failed" >&2; exit 1; }
    fi
    answer_stats "$dir" "$heldout" "$dir/heldout.json"
    answer_stats "$dir" "$study/train_probe.json" "$dir/train_probe.json"
  done
done

"$PYTHON" scripts/neftune_report.py "$study" "$selected" "$seeds" "$runs_table" \
  "$n_train records x $epochs epochs, LoRA r=16 alpha 32 on all linear layers, lr $lr, batch 4, max length 256"

plot_runs=() plot_labels=()
for name in $selected; do
  for seed in $seeds; do
    plot_runs+=("$study/$name-seed$seed")
    plot_labels+=("$name s$seed")
  done
done
"$bin" plot "${plot_runs[@]}" --labels "$(IFS=,; echo "${plot_labels[*]}")" --log-y \
  --title "NEFTune study: train (noise on) and held-out (noise off) loss" --output "$study/curves.png" > /dev/null
echo "== report: $study/report.md   plot: $study/curves.png   ($(( $(date +%s) - start )) s)"
