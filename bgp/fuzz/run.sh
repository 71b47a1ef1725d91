#!/usr/bin/env bash
# Run the decoder fuzz target for a bounded time (default 60 s) without needing cargo-fuzz:
# builds with libFuzzer coverage flags on nightly, then runs the binary on a scratch corpus.
set -euo pipefail
seconds="${1:-60}"
here="$(cd "$(dirname "$0")" && pwd)"
target_dir="${CARGO_TARGET_DIR:-$here/target}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
  cargo +nightly build --manifest-path "$here/Cargo.toml" --release --target "$triple" --bin decode_message
mkdir -p "$here/corpus"
"$target_dir/$triple/release/decode_message" "$here/corpus" -max_total_time="$seconds" -max_len=4200
