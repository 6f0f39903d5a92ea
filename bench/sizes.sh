#!/usr/bin/env bash
# Real model sizes: random-weight checkpoints of real shapes (bf16
# safetensors, sharded as the Hub shards them, the default model's
# tokenizer), measured for peft-rs and for transformers + PEFT on this
# machine, in the same run, alternated, each measurement a fresh process:
#   * LoRA r=16 (alpha 32, dropout 0) on all linear layers, bf16 base, AdamW,
#     batch 1 x TOKENS of text, STEPS steps, with and without gradient
#     checkpointing; adapters' matmuls in fp32 (PEFT's eager default) and in
#     bf16 (Trainer's bf16 autocast): tokens/s, peak RSS (anonymous and
#     file-backed), MFU against this machine's measured bf16 matmul rate;
#     and peft-rs's checkpointing that keeps the MLP's frozen products
#     (--gradient-checkpointing-keep-mlp, bf16 adapters) and every frozen
#     product (with --gradient-checkpointing-keep-attention too) beside them;
#   * QLoRA: nf4 + double quant, bf16 compute, checkpointing (both stacks'
#     defaults for it): load peak and tokens/s at the first TOKENS;
#   * merge of the trained adapter into the base: time, peak RSS;
#   * generate: load time and peak, greedy tokens/s at batch 1 and 8.
# Next to each training peak, a theoretical one: weights + adapters with
# their gradients and AdamW moments + activations by formula + the
# baseline of a process that loaded libtorch (`peft-rs env`).
#
#   ./bench/sizes.sh [SHAPE...]      (default: llama-3.2-1b llama-3.1-8b)
# SHAPE: llama-3.2-1b, qwen3-1.7b, llama-2-7b, llama-3.1-8b, qwen3-moe-small,
# gpt-oss-small (bench/make_checkpoint.py).
# Environment: SIZES_TOKENS ("512 2048"), SIZES_STEPS (3), SIZES_CACHE (where
# checkpoints are kept and reused: ~/.cache/peft-rs/bench-checkpoints; each
# takes its bf16 size on disk: 2.5 GB for 1B, 13.5 GB for 7B, 16 GB for 8B,
# plus as much again while its merged copy exists), SIZES_KEEP=0 deletes each
# checkpoint after use, SIZES_SKIP ("" or words: hf, qlora, merge, generate,
# lora-fp32, lora-bf16, no-ckpt, keep-mlp, keep-all) leaves parts out, SIZES_BIN (another
# peft-rs binary, an older build say, for a before/after in one run), SIZES_TARGETS (all-linear, or a
# comma list such as q_proj,k_proj,v_proj,o_proj: the LoRA targets of both
# stacks; all-linear on Qwen3-MoE adapts the router and experts too, as PEFT does).
set -euo pipefail
. "$(dirname "$0")/common.sh"
shapes=${*:-llama-3.2-1b llama-3.1-8b}
tokens=${SIZES_TOKENS:-512 2048}
steps=${SIZES_STEPS:-3}
cache=${SIZES_CACHE:-$HOME/.cache/peft-rs/bench-checkpoints}
skip=" ${SIZES_SKIP:-} "
cargo build --release --quiet
bin=${SIZES_BIN:-$PWD/target/release/peft-rs}
mkdir -p "$cache" "$out/results"
skipped() { [[ "$skip" == *" $1 "* ]]; }

# STEPS texts of at least the largest TOKENS tokens each: Alpaca answers, joined.
max_tokens=$(tr ' ' '\n' <<< "$tokens" | sort -n | tail -1)
"$PYTHON" - "$shared/data/alpaca_5000.json" "$model" "$steps" "$max_tokens" "$out/texts.jsonl" <<'PY'
import json, sys
from transformers import AutoTokenizer
records, tok = json.load(open(sys.argv[1])), AutoTokenizer.from_pretrained(sys.argv[2])
steps, need = int(sys.argv[3]), int(sys.argv[4])
with open(sys.argv[5], "w") as f:
    it = iter(records)
    for _ in range(steps):
        text = ""
        while len(tok(text)["input_ids"]) < need + 8:
            r = next(it)
            text += r["instruction"] + "\n" + r["output"] + "\n\n"
        f.write(json.dumps({"text": text}) + "\n")
PY
printf '{"prompt": "Write a short story about the number %d."}\n' $(seq 0 7) > "$out/prompts8.jsonl"
head -n 1 "$out/prompts8.jsonl" > "$out/prompts1.jsonl"

# measure NAME COMMAND...: runs it under /usr/bin/time (peak RSS KiB, wall s),
# stdout and stderr kept beside.
measure() {
  local name=$1; shift
  echo "   $name" >&2
  /usr/bin/time -f '%M %e' -o "$out/results/$name.time" "$@" > "$out/results/$name.out" 2> "$out/results/$name.err" \
    || { echo "   $name failed:" >&2; tail -5 "$out/results/$name.err" >&2; }
}
measure baseline "$bin" env
"$bin" env | grep '^cpu' > "$out/results/cpu.txt"

rust_train() { # name ckpt_dir T checkpointing lora_dtype [extra...]
  local name=$1 ckpt=$2 t=$3 gc=$4 ld=$5; shift 5
  rm -rf "$out/run-$name"
  measure "$name" "$bin" train --model "$ckpt" --data "$out/texts.jsonl" --output "$out/run-$name" \
    --device cpu --dtype bf16 --batch-size 1 --max-seq-len "$t" --max-steps "$steps" --lr 2e-4 \
    --lora-rank 16 --lora-alpha 32 --lora-dropout 0 --target-modules "${SIZES_TARGETS:-all-linear}" --warmup-steps 0 \
    --gradient-checkpointing "$gc" --lora-compute-dtype "$ld" "$@"
  cp "$out/run-$name/train_summary.json" "$out/results/$name.json" 2>/dev/null || true
  cp "$out/run-$name/training_args.json" "$out/results/$name.args.json" 2>/dev/null || true
}
hf_train() { # name ckpt_dir T checkpointing(0/1) lora_bf16(0/1) quantize
  skipped hf && return 0
  measure "$1" "$PYTHON" bench/sizes_hf.py train "$2" "$out/texts.jsonl" "$3" "$steps" "$4" "$5" "$6" "$out/results/$1.json"
}

for shape in $shapes; do
  ckpt=$cache/$shape
  echo "== $shape"
  "$PYTHON" bench/make_checkpoint.py "$shape" "$ckpt" "$model" >&2
  cp "$ckpt/config.json" "$out/results/$shape.config.json"
  cp "$ckpt/model.safetensors.index.json" "$out/results/$shape.index.json"
  for t in $tokens; do
    for gc in true false; do
      [ "$gc" = false ] && skipped no-ckpt && continue
      g=$([ "$gc" = true ] && echo 1 || echo 0)
      if ! skipped lora-fp32; then
        rust_train "$shape.train.$t.gc$g.fp32" "$ckpt" "$t" "$gc" fp32
        hf_train "$shape.hf-train.$t.gc$g.fp32" "$ckpt" "$t" "$g" 0 none
      fi
      skipped lora-bf16 && continue
      rust_train "$shape.train.$t.gc$g.bf16" "$ckpt" "$t" "$gc" bf16
      hf_train "$shape.hf-train.$t.gc$g.bf16" "$ckpt" "$t" "$g" 1 none
      if [ "$gc" = true ] && ! skipped keep-mlp; then
        rust_train "$shape.train.$t.gc1.bf16.keep" "$ckpt" "$t" true bf16 --gradient-checkpointing-keep-mlp
      fi
      if [ "$gc" = true ] && ! skipped keep-all; then
        rust_train "$shape.train.$t.gc1.bf16.keepall" "$ckpt" "$t" true bf16 \
          --gradient-checkpointing-keep-mlp --gradient-checkpointing-keep-attention
      fi
    done
  done
  t0=$(tr ' ' '\n' <<< "$tokens" | sort -n | head -1)
  if ! skipped qlora; then
    rust_train "$shape.qlora.$t0" "$ckpt" "$t0" true bf16 --quantize nf4 --bnb-4bit-use-double-quant \
      --bnb-4bit-compute-dtype bf16
    hf_train "$shape.hf-qlora.$t0" "$ckpt" "$t0" 1 1 nf4
  fi
  adapter=$out/run-$shape.train.$t0.gc1.fp32
  [ -d "$adapter" ] || adapter=$out/run-$shape.train.$t0.gc1.bf16
  if ! skipped merge && [ -f "$adapter/adapter_model.safetensors" ]; then
    measure "$shape.merge" "$bin" merge --model "$ckpt" --adapter "$adapter" --output "$out/merged" --overwrite
    rm -rf "$out/merged"
    if ! skipped hf; then
      measure "$shape.hf-merge" "$PYTHON" bench/sizes_hf.py merge "$ckpt" "$adapter" "$out/merged" \
        "$out/results/$shape.hf-merge.json"
      rm -rf "$out/merged"
    fi
  fi
  if ! skipped generate; then
    for b in 1 8; do
      measure "$shape.generate.$b" "$bin" generate --model "$ckpt" --prompts "$out/prompts$b.jsonl" \
        --device cpu --dtype bf16 --max-new-tokens 32 --batch-size "$b"
      skipped hf || measure "$shape.hf-generate.$b" "$PYTHON" bench/sizes_hf.py generate "$ckpt" 32 "$b" \
        "$out/results/$shape.hf-generate.$b.json"
    done
  fi
  [ "${SIZES_KEEP:-1}" = 0 ] && rm -rf "$ckpt"
done

"$PYTHON" bench/sizes_report.py "$out/results" "$steps" $shapes
