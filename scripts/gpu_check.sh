#!/usr/bin/env bash
# The GPU check, in one shot. Two halves:
#
#   ./scripts/gpu_check.sh prepare     (here, on the CPU build machine)
#       builds the release binaries and gathers what the GPU machine needs
#       into .gpu-carry/ (ignored by git, under 64 MiB): peft-rs, the
#       benchmark and parity examples (stripped), two tiny transformers-made
#       models with transformers' fp32 logits for them, and a Llama-2-7B config.
#
#   ./scripts/gpu_check.sh run         (on the GPU machine, with .gpu-carry/)
#       runs everything below against that machine's torch 2.11 libraries
#       (TORCH_LIB, default /opt/torch/.venv/lib/python3.12/site-packages/torch/lib)
#       and writes $OUT/report.md plus the raw outputs. Each step has its own
#       time limit and a failing step does not stop the others; the whole run
#       stays under ten minutes on one H200.
#
# Steps, the most telling first (GPU_CHECK_BUDGET seconds in all, default
# 540; steps that would start after it are skipped and say so;
# GPU_CHECK_STEPS=REGEX runs only the steps whose names match):
# driver/capability/kernels (`peft-rs env`), the CUDA link and c10d's NCCL
# symbols; logits parity fp32 and bf16 against transformers' CPU logits and
# greedy generation against our CPU path; `peft-rs train` on the GPU against
# the CPU (fp32, no noise: the loss curves must agree); a bf16 LoRA step of
# the Llama-3.1-8B shape of bench/sizes.sh (T=512 and 2048, with and without
# checkpointing) and of a Llama-2-7B shape (T=2048, batch 1, 2, 4) with
# tokens/s, MFU and peak memory, next to transformers + PEFT on the same
# steps when the machine has them; a QLoRA adapter's greedy answers on the
# GPU against the CPU's; QLoRA training and the 8B step in nf4; NCCL with one
# rank; placement (with two GPUs a 2-process NCCL run and a 2-process --fsdp
# run against one process, and a Llama-3.1-8B-shaped run sharded over two
# GPUs with each GPU's peak, bf16 and nf4; with one, two local processes
# refused); the packed (masked attention) path, LoRA compute dtype bf16 and
# TF32; generation tokens/s at batch 1 and 16.
#
# Where only a few files come back from the GPU machine, pack the rest, e.g.
#   OUT=$OUT ./scripts/gpu_check.sh run; cd $OUT && tar czf /tmp/all.tgz --exclude='*.safetensors' . \
#     && find . -mindepth 1 ! -name report.md -delete; mv /tmp/all.tgz $OUT/
set -uo pipefail
cd "$(dirname "$0")/.."
carry=.gpu-carry

prepare() {
  set -e
  . scripts/env.sh
  cargo build --release --quiet --bins --example bench_train_step --example device_parity
  fixtures=$(ls -d target/test-fixtures/reference-*/ 2>/dev/null | head -n 1)
  if [ -z "$fixtures" ]; then
    echo "== building the parity fixtures (cargo test --test model_parity)"
    cargo test --quiet --test model_parity logits > /dev/null
    fixtures=$(ls -d target/test-fixtures/reference-*/ | head -n 1)
  fi
  rm -rf "$carry"
  mkdir -p "$carry/bin" "$carry/models" "$carry/reference"
  cp target/release/peft-rs target/release/examples/bench_train_step target/release/examples/device_parity "$carry/bin/"
  strip "$carry"/bin/*
  # The tiny Mistral (grouped-query heads and a sliding window: the masked
  # attention path) with transformers' logits for three of its five padded
  # rows, which keeps the carried folder under 64 MiB.
  for m in mistral; do
    cp -r "$fixtures/models/$m" "$carry/models/"
    mkdir -p "$carry/reference/$m"
    cp "$fixtures/$m/prompts.jsonl" "$carry/reference/$m/"
    "$PYTHON" - "$fixtures/$m/logits.safetensors" "$carry/reference/$m/logits.safetensors" <<'PY'
import sys
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1])
save_file({k: v[:3].contiguous() for k, v in t.items()}, sys.argv[2])
PY
  done
  mkdir -p "$carry/models/llama2-7b-shape"
  cat > "$carry/models/llama2-7b-shape/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
 "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "hidden_act": "silu",
 "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"}
JSON
  # The Llama-3.1-8B shape of bench/sizes.sh (grouped-query heads, a
  # 128k vocabulary, llama3 RoPE), for the same step side by side.
  mkdir -p "$carry/models/llama3.1-8b-shape"
  cat > "$carry/models/llama3.1-8b-shape/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
 "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "hidden_act": "silu", "tie_word_embeddings": false,
 "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                     "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
 "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}
JSON
  # A real tokenizer for peft-rs train on that shape (its ids fit the big vocabulary).
  cp models/SmolLM2-135M-Instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja} "$carry/models/llama3.1-8b-shape/"
  du -sh "$carry"
  echo "carry: $carry   then: ./scripts/gpu_check.sh run   (OUT=<folder for the report>)"
}

run() {
  out=${OUT:-runs/gpu-check}
  mkdir -p "$out"
  lib=${TORCH_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/torch/lib}
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  py=${GPU_PYTHON:-$(dirname "$(dirname "$(dirname "$(dirname "$lib")")")")/../bin/python}
  [ -x "$py" ] || py=python3
  bin=$carry/bin
  report=$out/report.md
  : > "$report"
  say() { echo "$*" | tee -a "$report"; }
  # The whole run stays inside GPU_CHECK_BUDGET seconds (default 540, for a
  # call of at most ten minutes): a step gets what is left of it, at most its
  # own limit, and steps that would start with under 15 s left are skipped
  # (and say so), so a hang costs its own step, not the report.
  deadline=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-540} ))
  # GPU_CHECK_STEPS=REGEX runs only the steps whose names match (a rerun of
  # some steps on a later machine).
  wanted() { [ -z "${GPU_CHECK_STEPS:-}" ] || [[ $1 =~ $GPU_CHECK_STEPS ]]; }
  step() { # name, seconds, command...: output to $out/name.txt, summary line in the report
    local name=$1 secs=$2; shift 2
    wanted "$name" || return 125
    local t0; t0=$(date +%s)
    local left=$(( deadline - t0 ))
    if [ "$left" -lt 15 ]; then
      say "- $name: skipped, the check's time budget is spent"
      return 124
    fi
    [ "$secs" -gt "$left" ] && secs=$left
    timeout "$secs" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    say "- $name: exit $rc in $(( $(date +%s) - t0 )) s (output: $name.txt)"
    return $rc
  }
  # Peak GPU memory of a command (the largest GPU's), from nvidia-smi every
  # 100 ms; $out/name.mem keeps "index, MiB" lines for each GPU.
  with_memory() { # name, seconds, command...
    local name=$1; shift
    wanted "$name" || return 125
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 100 > "$out/$name.mem" 2>/dev/null &
    local poll=$!
    step "$name" "$@"
    local rc=$?
    kill "$poll" 2>/dev/null; wait "$poll" 2>/dev/null
    say "  peak GPU memory: $(cut -d, -f2 "$out/$name.mem" | sort -n | tail -n 1) MiB"
    return $rc
  }

  for i in $(seq 1 16); do echo "{\"prompt\": \"Count from $i to $((i + 20)):\"}"; done > "$out/prompts.jsonl"
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
  [ -n "${GPU_CHECK_SMOKE:-}" ] && gpus=0
  say "# GPU check, $(date -u +%FT%TZ)"
  say
  say "## Machine"
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv | tee -a "$report"
  say "- Python stack: $("$py" -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")' 2>&1 | tail -n 1)"
  step env 60 "$bin/peft-rs" env
  sed 's/^/    /' "$out/env.txt" >> "$report"
  # libtorch_cuda is loaded at run time where a driver is (src/cuda_library.rs), not linked.
  say "- $(grep -m1 '^libtorch_cuda:' "$out/env.txt")"
  nm -D --defined-only "$lib/libtorch_cuda.so" 2>/dev/null | grep -c "ProcessGroupNCCL" > "$out/nccl_symbols.txt"
  say "- c10d ProcessGroupNCCL symbols exported by libtorch_cuda.so: $(cat "$out/nccl_symbols.txt")"

  say
  say "## Logits and greedy generation (against transformers' fp32 CPU logits and our CPU answers)"
  for m in mistral; do
    step "parity-$m" 180 "$bin/device_parity" "$carry/models/$m" "$carry/reference/$m"
    grep '^{' "$out/parity-$m.txt" | sed 's/^/    /' >> "$report"
  done

  say
  say "## Training on the GPU against the CPU (tiny Mistral, fp32, no noise, no dropout: the same arithmetic)"
  eq=(--model "$carry/models/mistral" --data data/dates/train.jsonl --max-steps 8 --batch-size 4 --max-seq-len 128
      --lora-dropout 0 --neftune-alpha 0 --dtype fp32 --seed 3 --lr 1e-3 --group-by-length false)
  for dev in cpu cuda; do
    [ "$dev" = cuda ] && [ "$gpus" -lt 1 ] && continue
    step "train-fp32-$dev" 120 "$bin/peft-rs" train "${eq[@]}" --device "$dev" --output "$out/train-fp32-$dev"
    grep -E "^training on|peak" "$out/train-fp32-$dev.txt" | sed 's/^/    /' >> "$report"
  done
  "$py" - "$out/train-fp32-cpu/metrics.jsonl" "$out/train-fp32-cuda/metrics.jsonl" <<'PY' | tee -a "$report"
import json, os, sys
if all(os.path.exists(p) for p in sys.argv[1:]):
    a, b = ([json.loads(l)["loss"] for l in open(p) if '"loss"' in l] for p in sys.argv[1:])
    print(f"- {len(a)}/{len(b)} steps; losses cuda vs cpu, largest difference {max(abs(x - y) for x, y in zip(a, b)):.2e} "
          f"(cpu {a[0]:.5f} -> {a[-1]:.5f}, cuda {b[0]:.5f} -> {b[-1]:.5f})")
else:
    print("- not compared: a run is missing")
PY

  m7=$carry/models/llama2-7b-shape m8=$carry/models/llama3.1-8b-shape T=2048
  # GPU_CHECK_SMOKE=1: the same steps on the tiny model with short rows, to try the script on a CPU.
  [ -n "${GPU_CHECK_SMOKE:-}" ] && m7=$carry/models/mistral m8=$carry/models/mistral T=64
  hf=false
  "$py" -c "import transformers, peft" 2>/dev/null && hf=true
  # transformers + PEFT on the same step; its peak is read the same way (nvidia-smi).
  hf_step() { # name, model, batch, seq, extra...
    local name=$1 model=$2 b=$3 t=$4; shift 4
    if $hf; then
      with_memory "$name" 240 "$py" bench/train_step.py "$model" "$b" "$t" 3 --random-weights "$@"
      grep '^{' "$out/$name.txt" | sed 's/^/    /' >> "$report"
    else
      say "- $name: not run, this machine's Python has no transformers/peft"
    fi
  }
  say
  say "## bf16 LoRA step (r=16 all-linear, NEFTune 5), random weights: the Llama-3.1-8B shape of bench/sizes.sh (batch 1, T=512 and 2048; with checkpointing at 2048)"
  for t in 512 $T; do
    with_memory "step-8b-t$t" 150 "$bin/bench_train_step" "$m8" 1 "$t" 3 --random-weights
    grep '^{' "$out/step-8b-t$t.txt" | sed 's/^/    /' >> "$report"
  done
  with_memory "step-8b-checkpointing" 150 "$bin/bench_train_step" "$m8" 1 "$T" 3 --random-weights --gradient-checkpointing
  grep '^{' "$out/step-8b-checkpointing.txt" | sed 's/^/    /' >> "$report"
  for t in 512 $T; do hf_step "hf-step-8b-t$t" "$m8" 1 "$t"; done

  say
  say "## The same step, Llama-2-7B shape, T=2048, batch 1, 2, 4"
  for b in 1 2 4; do
    with_memory "step-7b-b$b" 150 "$bin/bench_train_step" "$m7" "$b" "$T" 3 --random-weights
    grep '^{' "$out/step-7b-b$b.txt" | sed 's/^/    /' >> "$report"
  done
  with_memory "step-7b-b4-checkpointing" 150 "$bin/bench_train_step" "$m7" 4 "$T" 3 --random-weights --gradient-checkpointing
  grep '^{' "$out/step-7b-b4-checkpointing.txt" | sed 's/^/    /' >> "$report"
  for b in 1 4; do hf_step "hf-step-7b-b$b" "$m7" "$b" "$T"; done
  say "MFU = flops_per_step / seconds_per_step / peak; H200 dense bf16 peak 989 TFLOP/s; matmul_peak_flops is measured on the step's shapes."

  say
  say "## QLoRA generation keeps the adapter (as on the CPU)"
  step qlora-adapter 300 "$bin/peft-rs" train --model "$carry/models/mistral" --data data/dates/train.jsonl \
    --output "$out/qlora-adapter" --quantize nf4 --max-steps 30 --batch-size 4 --max-seq-len 128 --lr 3e-3 --device cpu
  for dev in cpu cuda; do
    [ "$dev" = cuda ] && [ "$gpus" -lt 1 ] && continue
    for with in base adapter; do
      extra=(); [ "$with" = adapter ] && extra=(--adapter "$out/qlora-adapter")
      step "qlora-generate-$dev-$with" 120 "$bin/peft-rs" generate --model "$carry/models/mistral" --quantize nf4 \
        --device "$dev" --prompts "$out/prompts.jsonl" --max-new-tokens 16 --json "${extra[@]}"
    done
  done
  "$py" - "$out" <<'PY' | tee -a "$report"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def ids(name):
    p = out / f"qlora-generate-{name}.txt"
    return [json.loads(l)["token_ids"] for l in p.read_text().splitlines() if l.startswith("{")] if p.exists() else None
for dev in ("cpu", "cuda"):
    base, ad = ids(f"{dev}-base"), ids(f"{dev}-adapter")
    if base and ad:
        changed = [i for i, (x, y) in enumerate(zip(base, ad)) if x != y]
        print(f"- {dev}: the adapter changes {len(changed)} of {len(base)} greedy answers: {changed}")
cpu, cuda = ids("cpu-adapter"), ids("cuda-adapter")
if cpu and cuda:
    print(f"- cuda vs cpu answers with the adapter: {sum(x == y for x, y in zip(cpu, cuda))} of {len(cpu)} identical")
PY


  say
  say "## QLoRA and NCCL (one rank)"
  if "$bin/peft-rs" train --help 2>/dev/null | grep -q -- "--quantize"; then
    with_memory qlora-tiny 120 "$bin/peft-rs" train --model "$carry/models/mistral" --data data/dates/train.jsonl \
      --output "$out/qlora-tiny" --quantize nf4 --max-steps 5 --batch-size 4 --max-seq-len 128
    grep -E "^training on|tok/s|peak" "$out/qlora-tiny.txt" | tail -n 3 | sed 's/^/    /' >> "$report"
    # The 8B shape's step with its linear layers in nf4 (quantized on the device at load).
    with_memory step-8b-qlora 200 "$bin/bench_train_step" "$m8" 1 "$T" 3 --random-weights --quantize nf4
    grep '^{' "$out/step-8b-qlora.txt" | sed 's/^/    /' >> "$report"
  else
    say "- QLoRA: not in this build"
  fi
  if "$bin/peft-rs" train --help 2>/dev/null | grep -q -- "--nproc"; then
    step nccl-world1 180 "$bin/peft-rs" train --model "$carry/models/mistral" --data data/dates/train.jsonl \
      --output "$out/nccl-world1" --nproc 1 --dist-backend nccl --max-steps 5 --batch-size 4 --max-seq-len 128
    tail -n 3 "$out/nccl-world1.txt" | sed 's/^/    /' >> "$report"
  else
    say "- NCCL: not in this build"
  fi

  say
  say "## Placement: each process on its own GPU"
  say "- visible GPUs: $gpus"
  same=(--model "$carry/models/mistral" --data data/dates/train.jsonl --max-steps 6 --max-seq-len 128
        --lora-dropout 0 --neftune-alpha 5 --group-by-length false --seed 3 --lr 1e-3)
  if [ "$gpus" -ge 2 ]; then
    # 2 ranks x batch 2 on cuda:0 and cuda:1 against one process with batch 4: the same curve.
    step nccl-one 180 "$bin/peft-rs" train "${same[@]}" --output "$out/nccl-one" --batch-size 4
    step nccl-two 180 "$bin/peft-rs" train "${same[@]}" --output "$out/nccl-two" --batch-size 2 --nproc 2
    "$py" - "$out/nccl-one/metrics.jsonl" "$out/nccl-two/metrics.jsonl" <<'PY' | tee -a "$report"
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(p) if '"loss"' in l] for p in sys.argv[1:])
print(f"- 2 ranks x 2 (NCCL) vs 1 x 4: {len(a)} steps, largest loss difference {max(abs(x - y) for x, y in zip(a, b)):.2e}"
      " (bf16 base; attention's backward is not deterministic on CUDA, so expect ~1e-3, not 0)")
PY
    # The base sharded over the two GPUs (--fsdp, NCCL all-gathers): the same curve again.
    step nccl-fsdp 180 "$bin/peft-rs" train "${same[@]}" --output "$out/nccl-fsdp" --batch-size 2 --nproc 2 --fsdp
    "$py" - "$out/nccl-one/metrics.jsonl" "$out/nccl-fsdp/metrics.jsonl" "$out/nccl-fsdp/train_summary.json" <<'PY' | tee -a "$report"
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(p) if '"loss"' in l] for p in sys.argv[1:3])
f = json.load(open(sys.argv[3])).get("fsdp") or {}
print(f"- 2 sharded ranks x 2 (--fsdp, NCCL) vs 1 x 4: {len(a)} steps, largest loss difference "
      f"{max(abs(x - y) for x, y in zip(a, b)):.2e}; rank 0 holds {f.get('held_fraction')} of the sharded bytes, "
      f"waited {f.get('gather_wait_seconds')} s for {f.get('gathers')} gathers")
PY
    # A sharded Llama-3.1-8B-shaped run (random bf16 weights written here,
    # 16 GB; rows packed to 2048 tokens, LoRA r=16 all-linear, 3 steps): each
    # GPU's peak memory, one process against two sharded ranks, bf16 and nf4.
    ckpt8=${GPU_CHECK_TMP:-/tmp}/llama3.1-8b-shape
    step write-8b 300 "$py" scripts/random_checkpoint.py "$carry/models/llama3.1-8b-shape" "$ckpt8"
    long=(--model "$ckpt8" --data data/dates/train.jsonl --packing --max-seq-len 2048 --batch-size 1
          --max-steps 3 --lora-rank 16 --target-modules all-linear --dtype bf16 --group-by-length false)
    with_memory fsdp-8b-one 300 "$bin/peft-rs" train "${long[@]}" --output "$out/fsdp-8b-one" --gradient-checkpointing true
    with_memory fsdp-8b-two 300 "$bin/peft-rs" train "${long[@]}" --output "$out/fsdp-8b-two" --nproc 2 --fsdp
    with_memory fsdp-8b-two-nf4 300 "$bin/peft-rs" train "${long[@]}" --output "$out/fsdp-8b-two-nf4" --nproc 2 --fsdp \
      --quantize nf4 --bnb-4bit-use-double-quant
    rm -rf "$ckpt8"
    "$py" - "$out" <<'PY' | tee -a "$report"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("fsdp-8b-one", "fsdp-8b-two", "fsdp-8b-two-nf4"):
    per_gpu = {}
    for line in (out / f"{name}.mem").read_text().splitlines():
        i, used = (int(x) for x in line.split(","))
        per_gpu[i] = max(per_gpu.get(i, 0), used)
    s = out / name / "train_summary.json"
    s = json.loads(s.read_text()) if s.exists() else {}
    f = s.get("fsdp") or {}
    print(f"- {name}: peak MiB per GPU {per_gpu}; {s.get('tokens_per_second', 0):.0f} tokens/s; "
          f"rank 0 holds {f.get('held_fraction')} of the sharded base, waited {f.get('gather_wait_seconds')} s "
          f"for gathers; optimizer state {s.get('optimizer_state_bytes', 0) / 2**20:.0f} MiB on rank 0")
PY
  fi
  if [ "$gpus" -ge 1 ]; then
    # One visible GPU and two local processes: refused, naming both numbers.
    CUDA_VISIBLE_DEVICES=0 timeout 120 "$bin/peft-rs" train "${same[@]}" --output "$out/two-on-one" \
      --batch-size 2 --nproc 2 --device cuda > "$out/two-on-one.txt" 2>&1
    say "- 2 processes, CUDA_VISIBLE_DEVICES=0: exit $? — $(grep -m1 -o '2 processes on this machine.*' "$out/two-on-one.txt" || echo 'NOT REFUSED')"
    CUDA_VISIBLE_DEVICES=0 "$bin/peft-rs" env 2>&1 | grep -E "cuda devices|auto picks" | sed 's/^/    /' >> "$report"
  fi


  say
  say "## Attention path, LoRA compute dtype, TF32 (batch 2, T=2048)"
  with_memory step-7b-packed 150 "$bin/bench_train_step" "$m7" 2 "$T" 3 --random-weights --packed
  with_memory step-7b-lora-bf16 150 "$bin/bench_train_step" "$m7" 2 "$T" 3 --random-weights --lora-compute-dtype bf16
  with_memory step-7b-tf32 150 "$bin/bench_train_step" "$m7" 2 "$T" 3 --random-weights --tf32
  for n in packed lora-bf16 tf32; do grep '^{' "$out/step-7b-$n.txt" | sed 's/^/    /' >> "$report"; done

  say
  say "## Generation (tiny Mistral, 16 prompts, 64 new tokens, greedy)"
  for bs in 1 16; do
    step "generate-b$bs" 120 "$bin/peft-rs" generate --model "$carry/models/mistral" --prompts "$out/prompts.jsonl" \
      --max-new-tokens 64 --batch-size "$bs" --json
    grep -E "loaded in|prompts/s|tokens/s" "$out/generate-b$bs.txt" | sed 's/^/    /' >> "$report"
  done
  say
  say "- libtorch warnings printed in all outputs: $(cat "$out"/*.txt 2>/dev/null | grep -c '\] Warning:')"
  say "done: $report"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
