#!/usr/bin/env bash
# Load time of a checkpoint, cold and warm, against reading its files once:
#   * `cat` of its safetensors files (cold: their pages evicted first with
#     posix_fadvise(DONTNEED), which needs no privileges; warm: right after);
#   * `peft-rs generate` of one token after a one-line prompt, and
#     transformers' `from_pretrained` + `generate` of one token
#     (bench/sizes_hf.py), each a fresh process: wall time, the load time
#     each reports, peak RSS. Cold runs evict the files first; warm runs
#     follow a run that read them.
#
#   ./bench/load.sh CHECKPOINT_DIR      (e.g. a bench/make_checkpoint.py one)
# Environment: LOAD_SKIP_HF=1 leaves transformers out.
set -euo pipefail
ckpt=$(cd "$1" && pwd)
. "$(dirname "$0")/common.sh"
cargo build --release --quiet
bin=$PWD/target/release/peft-rs
shopt -s nullglob
files=("$ckpt"/*.safetensors)
[ ${#files[@]} -gt 0 ] || { echo "$ckpt: no .safetensors files" >&2; exit 2; }
bytes=$(du -cb "${files[@]}" | tail -1 | cut -f1)
printf '{"prompt": "Write a short story about the number 7."}\n' > "$out/prompt.jsonl"

evict() {
  "$PYTHON" - "${files[@]}" <<'PY'
import os, sys
for f in sys.argv[1:]:
    fd = os.open(f, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
PY
}
# timed NAME COMMAND...: wall seconds and peak RSS (KiB) into $out/NAME.time.
timed() {
  local name=$1; shift
  /usr/bin/time -f '%e %M' -o "$out/$name.time" "$@" > "$out/$name.out" 2> "$out/$name.err" \
    || { echo "$name failed:" >&2; tail -5 "$out/$name.err" >&2; exit 1; }
}
rust() { timed "$1" "$bin" generate --model "$ckpt" --prompts "$out/prompt.jsonl" --device cpu \
  --dtype bf16 --max-new-tokens 1; }
hf() { timed "$1" "$PYTHON" bench/sizes_hf.py generate "$ckpt" 1 1 "$out/$1.json"; }

read_once() { timed "$1" sh -c 'cat "$@" > /dev/null' sh "${files[@]}"; }
evict; read_once cat-cold
read_once cat-warm
evict; rust rust-cold
rust rust-warm
if [ "${LOAD_SKIP_HF:-0}" != 1 ]; then
  evict; hf hf-cold
  hf hf-warm
fi

"$PYTHON" - "$out" "$bytes" <<'PY'
import json, sys
from pathlib import Path
d, size = Path(sys.argv[1]), int(sys.argv[2])
def t(name):
    p = d / f"{name}.time"
    if not p.exists():
        return None
    wall, kib = p.read_text().split()
    return float(wall), int(kib) * 1024
def reported(name):
    if (d / f"{name}.json").exists():
        return json.loads((d / f"{name}.json").read_text())["load_seconds"]
    err = (d / f"{name}.err").read_text()
    return next((float(x.split("loaded in ")[1].split()[0]) for x in err.splitlines() if "loaded in" in x), None)
print(f"{size / 1e9:.2f} GB of safetensors")
for temp in ("cold", "warm"):
    cat = t(f"cat-{temp}")
    print(f"{temp}: reading the files once (cat) {cat[0]:.1f} s ({size / 1e9 / max(cat[0], 1e-3):.2f} GB/s)")
    for who, name in (("peft-rs", f"rust-{temp}"), ("transformers", f"hf-{temp}")):
        r = t(name)
        if r is None:
            continue
        print(f"  {who:12} load + 1 token {r[0]:6.1f} s ({r[0] / max(cat[0], 1e-3):.2f}x the read), "
              f"load as it reports {reported(name):.1f} s, peak RSS {r[1] / 1e9:.2f} GB")
PY
