#!/usr/bin/env bash
# The long fuzz run: every harness (see crates/fuzz) with CASES inputs (default 1,000,000),
# in the test profile, so that overflow checks and debug assertions are on. Prints each
# harness's count, time and RNG seed; a failure leaves its smallest input in
# target/fuzz-failures/<harness>/ (commit it under fixtures/fuzz/<harness>/ with the fix).
#
#   scripts/fuzz.sh [CASES]        # SD_FUZZ_SEED=<64 hex> replays a run
set -euo pipefail
cd "$(dirname "$0")/.."
export SD_FUZZ_CASES="${1:-1000000}"
threads="${THREADS:-$(nproc)}"
run() { cargo test "$@" -- --nocapture --test-threads "$threads" 2>&1 | grep -E '^fuzz |panicked|FAILED|test result'; }
start=$(date +%s)
run -p sd-engine --test fuzz
run -p sd-models --test fuzz fuzz_
run -p sd-worker --bin sd-worker fuzz_
echo "all harnesses: $((  $(date +%s) - start ))s, $SD_FUZZ_CASES inputs each"
