#!/usr/bin/env bash
# The sharded base (`--fsdp`) against data parallel, 2 ranks over Gloo on
# 127.0.0.1, on the default model (SmolLM2-135M), LoRA r=16 on TARGETS
# (default all-linear), batch BATCH x LEN tokens per rank, STEPS steps, one
# thread per rank:
#  - memory: each run's largest rank peak RSS minus a process that only
#    loaded libtorch (`peft-rs env`, whose CPU probe's buffers count in its
#    own peak), and rank 0's peak minus its resident set before the base
#    loaded (train_summary.json), fp32 and nf4 + double quantization,
#    data parallel with gradient checkpointing (as --fsdp runs by default)
#    and at its own default, against --fsdp;
#  - the frozen bytes rank 0 holds between layers (train_summary.json);
#  - time: what the layer gathers cost, with and without prefetching the
#    next layer (the time the compute waited for gathers, and the step time).
# Alternated, twice; the smaller peak and the shorter time of each are kept.
#   ./bench/fsdp.sh [BATCH] [LEN] [STEPS] [TARGETS]
set -euo pipefail
. "$(dirname "$0")/common.sh"
B=${1:-1}; LEN=${2:-64}; STEPS=${3:-6}; TARGETS=${4:-all-linear}
cargo build --release --quiet --bin peft-rs
bin=target/release/peft-rs
alpaca_records $((2 * B * STEPS)) "$out/data.json"
peak() { # name command...: peak RSS (KiB) of the process and the ranks it waited for
  local name=$1; shift
  /usr/bin/time -f '%M' -o "$out/$name.kib" "$@" > /dev/null 2> "$out/$name.err" \
    || { tail -3 "$out/$name.err" >&2; exit 1; }
}
train() { # name flags...
  local name=$1; shift
  OMP_NUM_THREADS=1 peak "$name" "$bin" train --model "$model" --data "$out/data.json" \
    --output "$out/run-$name" --device cpu --lora-rank 16 --target-modules "$TARGETS" \
    --batch-size "$B" --max-seq-len "$LEN" --max-steps "$STEPS" --group-by-length false \
    --nproc 2 "$@"
}
for round in 1 2; do
  peak "baseline-$round" "$bin" env
  for q in fp32 nf4; do
    qf=(--dtype fp32); [ "$q" = nf4 ] && qf=(--dtype fp32 --quantize nf4 --bnb-4bit-use-double-quant)
    train "$q-dp-$round" "${qf[@]}"
    train "$q-dp-ckpt-$round" "${qf[@]}" --gradient-checkpointing true
    train "$q-fsdp-$round" "${qf[@]}" --fsdp
    train "$q-fsdp-noprefetch-$round" "${qf[@]}" --fsdp --fsdp-prefetch false
  done
done
"$PYTHON" - "$out" "$B" "$LEN" "$STEPS" "$TARGETS" <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
mib = lambda n: min(int((d / f"{n}-{r}.kib").read_text().split()[-1]) for r in (1, 2)) / 1024
summ = lambda n, r: json.loads((d / f"run-{n}-{r}" / "train_summary.json").read_text())
best = lambda n: min((summ(n, r) for r in (1, 2)), key=lambda s: s["seconds"])
base = mib("baseline")
print(f"--fsdp vs data parallel: SmolLM2-135M, 2 ranks (Gloo, 1 thread each), LoRA r=16 on {sys.argv[5]}, "
      f"batch {sys.argv[2]} x {sys.argv[3]} per rank, {sys.argv[4]} steps; baseline (libtorch loaded) {base:.0f} MiB")
# Rank 0's own: its peak above its resident set before the base loaded.
own = lambda n: min((s["peak_rss_bytes"] - s["rss_before_load_bytes"]) / 2**20 for s in (summ(n, r) for r in (1, 2)))
print(f"{'':34}{'peak MiB':>9}{'above base':>11}{'vs DP ckpt':>11}{'vs DP':>7}"
      f"{'rank 0 above own start':>24}{'vs DP ckpt':>11}{'seconds':>9}")
for q in ("fp32", "nf4"):
    dp, dpc = mib(f"{q}-dp") - base, mib(f"{q}-dp-ckpt") - base
    for k, name in ((f"{q}-dp", f"{q} data parallel (default)"), (f"{q}-dp-ckpt", f"{q} data parallel, checkpointing"),
                    (f"{q}-fsdp", f"{q} --fsdp (checkpointing)"), (f"{q}-fsdp-noprefetch", f"{q} --fsdp, no prefetch")):
        a = mib(k) - base
        print(f"{name:34}{mib(k):9.0f}{a:11.0f}{a / dpc:10.2f}x{a / dp:6.2f}x"
              f"{own(k):24.0f}{own(k) / own(f'{q}-dp-ckpt'):10.2f}x{best(k)['seconds']:9.1f}")
    f = best(f"{q}-fsdp")["fsdp"]
    nf = best(f"{q}-fsdp-noprefetch")["fsdp"]
    print(f"  {q}: rank 0 holds {f['sharded_bytes_held'] / 2**20:.1f} of {f['sharded_bytes_whole'] / 2**20:.1f} MiB sharded "
          f"({f['held_fraction']:.3f}); {f['gathers']} gathers, {f['gathered_bytes'] / 2**30:.2f} GiB received; "
          f"waited for gathers {f['gather_wait_seconds']:.2f} s of {best(f'{q}-fsdp')['seconds']:.1f} s with prefetch, "
          f"{nf['gather_wait_seconds']:.2f} s of {best(f'{q}-fsdp-noprefetch')['seconds']:.1f} s without")
PY
