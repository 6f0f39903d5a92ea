# Sourced by the benchmark scripts after `set -euo pipefail`: from the
# repository root, with the Python environment set up and $PYTHON set, it sets
# $model (the default model), $shared (the shared folder) and $out (a scratch
# folder removed on exit), and defines alpaca_records.
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
. scripts/env.sh
model=models/SmolLM2-135M-Instruct
shared=${PEFT_RS_SHARED:-../shared}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# alpaca_records N FILE: the first N records of the shared Alpaca data, as a JSON array in FILE.
alpaca_records() {
  "$PYTHON" -c "import json,sys; json.dump(json.load(open(sys.argv[1]))[:int(sys.argv[2])], open(sys.argv[3],'w'))" \
    "$shared/data/alpaca_5000.json" "$1" "$2"
}
