#!/usr/bin/env bash
# Proves a CUDA build of sd-worker on a GPU machine that has no Rust toolchain and no internet:
# the diffusers parity fixtures on the GPU in f32 (the CPU tests' tolerance: max 3 / mean 0.5
# levels of 255), f16 and bf16 (error measured and reported, not bounded), then timings of the
# full-size SD 1.5 stages (512x512) and of the FLUX.1-dev transformer (1024x1024) with random
# weights. Writes one JSON report and prints a one-line summary last. About 8 minutes at most
# (each step has its own time limit).
#
# Usage: scripts/cuda/check.sh BINARY [OUT_DIR]
#   BINARY   the sd-worker that scripts/cuda/build.sh printed, or a gzip of it (sd-worker.gz)
#   OUT_DIR  where the report and the logs go (default: $OUT if set, else ./cuda-check)
# Run from the repository root (it reads fixtures/). Environment:
#   SD_CUDA_LIBS       a folder with libcudart/cublas/cublasLt/curand/nvrtc of CUDA 13 when
#                      they are not beside the binary (default: PyTorch's CUDA 13 wheels, found
#                      under /opt/*/.venv, /usr/local/lib/python3* or ~/.local)
#   SD_CHECK_DEVICE    default cuda:0 (cpu runs the same script here, as a dry run)
#   SD_CHECK_SD_SIZE   SD 1.5 image side of the timings (default 512)
#   SD_CHECK_FLUX_SIZE FLUX image side (default 1024)
#   SD_CHECK_FLUX_LAYERS FLUX blocks "D,S" (default 19,38: the whole 12B transformer)
#   SD_CHECK_FLUX_DTYPE  FLUX weights' precision (default bf16, as FLUX ships)
set -uo pipefail

BIN=${1:?usage: scripts/cuda/check.sh BINARY [OUT_DIR]}
OUTDIR=${2:-${OUT:-cuda-check}}
DEVICE=${SD_CHECK_DEVICE:-cuda:0}
SD_SIZE=${SD_CHECK_SD_SIZE:-512}
FLUX_SIZE=${SD_CHECK_FLUX_SIZE:-1024}
FLUX_LAYERS=${SD_CHECK_FLUX_LAYERS:-19,38}
FLUX_DTYPE=${SD_CHECK_FLUX_DTYPE:-bf16}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
START=$(date +%s)

if [ ! -d fixtures/reference ]; then
  echo "cuda check: run from the repository root (no fixtures/reference here)" >&2
  exit 2
fi
case "$BIN" in
  *.gz)
    gunzip -c "$BIN" >"$OUTDIR/sd-worker" || exit 2
    chmod +x "$OUTDIR/sd-worker"
    BIN="$OUTDIR/sd-worker"
    ;;
esac

# Run-time libraries: beside the binary (rpath $ORIGIN), else SD_CUDA_LIBS, else PyTorch's.
LIBS=${SD_CUDA_LIBS:-}
if [ -z "$LIBS" ] && [ ! -e "$(dirname "$BIN")/libcublas.so.13" ]; then
  for d in /opt/*/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
    /usr/local/lib/python3*/dist-packages/nvidia/cu13/lib \
    /usr/local/lib/python3*/site-packages/nvidia/cu13/lib \
    "$HOME"/.local/lib/python3*/site-packages/nvidia/cu13/lib; do
    if [ -e "$d/libcublas.so.13" ]; then LIBS=$d; break; fi
  done
fi
[ -n "$LIBS" ] && export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
GPU=${GPU:-none (nvidia-smi not found)}
CPU=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //')

# step NAME SECONDS COMMAND...: runs with a time limit, keeps stdout/stderr, records rc/time.
STEPS=()
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >"$OUTDIR/$name.out" 2>"$OUTDIR/$name.err"
  rc=$?
  local secs
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  STEPS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $secs}")
  echo "$name: rc $rc, ${secs} s" >&2
  return $rc
}

# The JSON a step wrote (or null).
json_of() { if [ -s "$1" ]; then cat "$1"; else echo null; fi; }
# A stage's median seconds from a bench JSON line (or "?").
median_of() {
  local v
  v=$(sed -n "s/.*\"$2\":{\"median_s\":\([0-9.eE+-]*\).*/\1/p" "$1" 2>/dev/null)
  echo "${v:-?}"
}
# The last stdout line of a parity step ("parity cuda:0 f32: 41 passed, ..."), or why not.
parity_line() {
  local l
  l=$(grep '^parity ' "$OUTDIR/$1.out" 2>/dev/null | tail -1)
  if [ -z "$l" ]; then l="$1 did not finish: $(tail -1 "$OUTDIR/$1.err" 2>/dev/null)"; fi
  echo "$l"
}

"$BIN" --version >"$OUTDIR/version.out" 2>&1
step parity-f32 120 "$BIN" parity --device "$DEVICE" --dtype f32 --json "$OUTDIR/parity-f32.json"
step parity-f16 75 "$BIN" parity --device "$DEVICE" --dtype f16 --report-only --json "$OUTDIR/parity-f16.json"
step parity-bf16 75 "$BIN" parity --device "$DEVICE" --dtype bf16 --report-only --json "$OUTDIR/parity-bf16.json"
for dt in f32 f16; do
  step "bench-sd-$dt" 60 "$BIN" bench --device "$DEVICE" --dtype "$dt" --stages clip,unet,vae \
    --size "$SD_SIZE" --runs 5 --warmup 2 --json
done
step bench-flux 120 "$BIN" bench --device "$DEVICE" --dtype "$FLUX_DTYPE" --stages flux \
  --flux-size "$FLUX_SIZE" --flux-layers "$FLUX_LAYERS" --runs 3 --warmup 1 --json

UNET32=$(median_of "$OUTDIR/bench-sd-f32.out" unet)
UNET16=$(median_of "$OUTDIR/bench-sd-f16.out" unet)
VAE16=$(median_of "$OUTDIR/bench-sd-f16.out" vae)
FLUX=$(median_of "$OUTDIR/bench-flux.out" flux)
its() { awk -v s="$1" 'BEGIN { if (s + 0 > 0) printf "%.2f", 1 / s; else printf "?" }'; }
secs() { awk -v s="$1" 'BEGIN { if (s + 0 > 0) printf "%.3f", s; else printf "?" }'; }

{
  echo "{"
  echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
  echo "  \"gpu\": \"$GPU\","
  echo "  \"cpu\": \"$CPU\","
  echo "  \"device\": \"$DEVICE\","
  echo "  \"version\": \"$(head -1 "$OUTDIR/version.out" | tr -d '"\\')\","
  echo "  \"steps\": [$(IFS=,; echo "${STEPS[*]}")],"
  echo "  \"parity_f32\": $(json_of "$OUTDIR/parity-f32.json"),"
  echo "  \"parity_f16\": $(json_of "$OUTDIR/parity-f16.json"),"
  echo "  \"parity_bf16\": $(json_of "$OUTDIR/parity-bf16.json"),"
  echo "  \"bench_sd_f32\": $(json_of "$OUTDIR/bench-sd-f32.out"),"
  echo "  \"bench_sd_f16\": $(json_of "$OUTDIR/bench-sd-f16.out"),"
  echo "  \"bench_flux\": $(json_of "$OUTDIR/bench-flux.out")"
  echo "}"
} >"$OUTDIR/report.json"

echo "$(parity_line parity-f32)"
echo "$(parity_line parity-f16)"
echo "$(parity_line parity-bf16)"
echo "cuda check ($GPU, $(($(date +%s) - START)) s): $(parity_line parity-f32 | sed 's/;.*//');" \
  "SD 1.5 ${SD_SIZE}px UNet step (batch 2) f32 $(secs "$UNET32") s = $(its "$UNET32") it/s," \
  "f16 $(secs "$UNET16") s = $(its "$UNET16") it/s, VAE f16 $(secs "$VAE16") s;" \
  "FLUX ${FLUX_SIZE}px ${FLUX_LAYERS} blocks ${FLUX_DTYPE} $(secs "$FLUX") s/it; report $OUTDIR/report.json"
grep -q '"rc": [1-9]' <<<"${STEPS[*]}" && exit 1
exit 0
