#!/usr/bin/env bash
# `make demo`: builds tortie and runs the demo cluster (see e2e/src/bin/tortie-demo.rs).
set -euo pipefail
cd "$(dirname "$0")/../.."
export TORTIE_CACHE="${TORTIE_CACHE:-$HOME/.cache/tortie}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TORTIE_CACHE/target}"
cargo build -q -p tortie -p tortie-e2e --bin tortie --bin tortie-demo
exec "$CARGO_TARGET_DIR/debug/tortie-demo"
