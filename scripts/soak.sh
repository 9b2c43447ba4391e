#!/usr/bin/env bash
# The soak run: JOBS tiny jobs (default 10,000) through `sd-worker serve` from CLIENTS
# clients (default 4). Prints throughput, resident memory after the first 500 jobs and after
# the last (medians over 500 jobs; they must differ by less than 5%), open file descriptors, and
# checks that results expire by their TTL. Not part of CI (several minutes). The worker returns
# freed memory at once here (MIMALLOC_PURGE_DELAY=0), so that RSS follows live memory;
# SD_SOAK_PURGE_DELAY=keep runs it with its own setting (never purge).
#
#   scripts/soak.sh [JOBS] [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
export SD_SOAK_JOBS="${1:-10000}" SD_SOAK_CLIENTS="${2:-4}"
cargo test --release -p sd-worker --test load soak -- --ignored --nocapture 2>&1 |
    grep -E '^soak|^results|panicked|test result'
