#!/usr/bin/env bash
# The test command: set up what is missing, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh
cargo test --workspace "$@"
