#!/usr/bin/env bash
# The main job on the default model: set up, build the release binary, and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh
cargo build --release --quiet
bin=target/release/peft-rs
$bin env
echo "== greedy answers of the default model (SmolLM2-135M-Instruct)"
$bin generate --max-new-tokens 64 \
  --chat "What is the capital of France?" \
  --chat "Give me three tips for staying healthy." \
  --prompt "The three primary colours are"
