#!/usr/bin/env bash
# Times sd-worker's stages and diffusers/PyTorch's on the same shapes, each stage in its own
# process, and prints one table: median seconds, the ratio ours / PyTorch, peak RSS of each.
#
# Usage: scripts/bench_compare.sh [STAGES] [RUNS] [WARMUP]
#   STAGES  comma-separated (default clip,unet,vae; also sdxl-unet, sdxl-vae, flux, unet-lora)
#   RUNS    timed runs per stage, the median is reported (default 3)
#   WARMUP  untimed runs first (default 1)
# Environment:
#   SD_WORKER  the binary (default target/release/sd-worker, built if missing)
#   PYTHON     a Python with torch, diffusers and transformers (default python3)
#   THREADS    PyTorch's threads (default: every core, as sd-worker uses)
#   EXTRA      more flags for both sides (e.g. "--flux-layers 1,1")
#   OURS_EXTRA more flags for sd-worker only (e.g. "--dtype bf16": PyTorch stays f32)
set -euo pipefail
cd "$(dirname "$0")/.."

STAGES=${1:-clip,unet,vae}
RUNS=${2:-3}
WARMUP=${3:-1}
BIN=${SD_WORKER:-target/release/sd-worker}
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-$(nproc)}
EXTRA=${EXTRA:-}
OURS_EXTRA=${OURS_EXTRA:-}
[ -x "$BIN" ] || cargo build --release -p sd-worker
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# median_s of a stage from a one-line JSON report.
median() { sed -n "s/.*\"$2\": *{[^}]*\"median_s\": *\([0-9.eE+-]*\).*/\1/p" "$1"; }
# The peak RSS in GB that /usr/bin/time wrote.
rss() { awk '/^RSS/ { printf "%.2f", $2 / 1048576 }' "$1"; }

echo "$(date -u +%Y-%m-%d) $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), $(nproc) cores," \
  "sd-worker $(git rev-parse --short HEAD 2>/dev/null || echo '?') $OURS_EXTRA, $THREADS PyTorch threads"
printf '%-10s %10s %10s %8s %14s\n' stage ours_s torch_s ratio rss_ours/torch
IFS=, read -ra LIST <<<"$STAGES"
for s in "${LIST[@]}"; do
  # shellcheck disable=SC2086
  /usr/bin/time -f "RSS %M" -o "$TMP/ours.time" "$BIN" bench --stages "$s" --runs "$RUNS" \
    --warmup "$WARMUP" --json $EXTRA $OURS_EXTRA >"$TMP/ours.json"
  # shellcheck disable=SC2086
  /usr/bin/time -f "RSS %M" -o "$TMP/torch.time" "$PYTHON" scripts/bench_diffusers.py --stages "$s" \
    --runs "$RUNS" --warmup "$WARMUP" --threads "$THREADS" $EXTRA >"$TMP/torch.json" 2>"$TMP/torch.err"
  ours=$(median "$TMP/ours.json" "$s")
  torch=$(median "$TMP/torch.json" "$s")
  ratio=$(awk -v a="$ours" -v b="$torch" 'BEGIN { printf "%.2fx", a / b }')
  printf '%-10s %10.3f %10.3f %8s %14s\n' "$s" "$ours" "$torch" "$ratio" \
    "$(rss "$TMP/ours.time")/$(rss "$TMP/torch.time") GB"
done
