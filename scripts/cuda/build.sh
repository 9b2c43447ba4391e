#!/usr/bin/env bash
# Builds sd-worker with candle's CUDA backend on a machine without a GPU or a CUDA install.
#
# The CUDA toolchain comes from NVIDIA's PyPI wheels (nvcc, the CRT headers, NVVM, the
# runtime headers, cuBLAS, cuRAND, NVRTC), all of one 13.0.x release: the driver of the GPU
# machines we target is 580 (CUDA 13.0), and a newer NVVM emits PTX that 13.0's ptxas
# refuses. They are unpacked into one CUDA tree in a cache folder outside the repository,
# with a libcuda.so link stub generated from cuda.h (the driver provides the real library
# at run time). The binary is linked with rpath $ORIGIN and its run-time libraries are
# copied beside it, so the folder can be copied to a machine that has only the driver.
#
# Usage: scripts/cuda/build.sh          (build; the last line printed is the binary's path)
#        scripts/cuda/build.sh clippy   (cargo clippy --features cuda -D warnings instead)
# Environment:
#   CUDA_COMPUTE_CAP  GPU architecture for the kernels (default 90: H100 / H200; 80 A100,
#                     86 RTX 30xx / A40, 89 RTX 40xx / L4 / L40)
#   SD_CUDA_CACHE     cache folder (default ~/.cache/sd-worker-cuda): wheels, the CUDA tree,
#                     a Python venv for pip, and the cargo target folder
#   PYTHON            a Python 3 to create that venv with (default python3)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${SD_CUDA_CACHE:-$HOME/.cache/sd-worker-cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
PYTHON=${PYTHON:-python3}

# One CUDA release for every piece (see above); cuRAND has its own numbering.
WHEELS=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-nvrtc==13.0.88"
  "nvidia-cublas==13.0.2.14"
  "nvidia-curand==10.4.5.25"
)

mkdir -p "$CACHE/wheels"
if [ ! -x "$CACHE/venv/bin/pip" ]; then
  "$PYTHON" -m venv "$CACHE/venv"
fi
"$CACHE/venv/bin/pip" download --quiet --no-deps -d "$CACHE/wheels" "${WHEELS[@]}"

# The CUDA tree: every wheel's nvidia/cu13 merged (rebuilt when the wheel list changes).
CUDA="$CACHE/cuda-13.0"
STAMP="${WHEELS[*]}"
if [ ! -x "$CUDA/bin/nvcc" ] || [ "$(cat "$CUDA/.wheels" 2>/dev/null)" != "$STAMP" ]; then
  rm -rf "$CUDA.tmp" && mkdir -p "$CUDA.tmp"
  for w in "$CACHE"/wheels/*.whl; do
    "$CACHE/venv/bin/python" - "$w" "$CUDA.tmp" <<'EOF'
import sys, zipfile, os, stat
wheel, out = sys.argv[1], sys.argv[2]
prefix = "nvidia/cu13/"
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        dest = os.path.join(out, info.filename[len(prefix):])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(info) as src, open(dest, "wb") as dst:
            dst.write(src.read())
        mode = info.external_attr >> 16
        if mode:
            os.chmod(dest, stat.S_IMODE(mode))
EOF
  done
  chmod +x "$CUDA.tmp"/bin/* "$CUDA.tmp"/nvvm/bin/* 2>/dev/null || true
  echo "$STAMP" >"$CUDA.tmp/.wheels"
  rm -rf "$CUDA" && mv "$CUDA.tmp" "$CUDA"
fi
# Wheels ship no lib64 and only versioned sonames: add what the linker looks for.
mkdir -p "$CUDA/lib64/stubs"
for lib in "$CUDA"/lib/lib*.so.*; do
  base=$(basename "$lib")
  ln -sf "../lib/$base" "$CUDA/lib64/$base"
  ln -sf "../lib/$base" "$CUDA/lib64/${base%%.so.*}.so"
done
# libcuda.so: a stub exporting every driver entry point of cuda.h (after its version macros).
if [ ! -f "$CUDA/lib64/stubs/libcuda.so" ]; then
  gcc -E -P -I "$CUDA/include" -x c "$CUDA/include/cuda.h" \
    | grep -oE '\bcu[A-Za-z0-9_]+[[:space:]]*\(' | tr -d ' (' | sort -u \
    | sed 's/.*/void &(void) {}/' >"$CUDA/lib64/stubs/libcuda.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA/lib64/stubs/libcuda.so" \
    "$CUDA/lib64/stubs/libcuda.c"
fi

export CUDA_HOME="$CUDA" CUDA_PATH="$CUDA" CUDA_ROOT="$CUDA"
export PATH="$CUDA/bin:$PATH"
export LIBRARY_PATH="$CUDA/lib64:$CUDA/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$CUDA/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$CUDA/lib64 -L native=$CUDA/lib64/stubs -C link-arg=-Wl,-rpath,\$ORIGIN"

if [ "${1:-}" = clippy ]; then
  exec cargo clippy --locked --manifest-path "$ROOT/Cargo.toml" -p sd-worker --features cuda \
    --all-targets --target-dir "$CACHE/target-clippy" -- -D warnings
fi

TARGET="$CACHE/target"
cargo build --release --locked --manifest-path "$ROOT/Cargo.toml" -p sd-worker \
  --features cuda --target-dir "$TARGET"

# The binary (stripped: most of it is the kernels' PTX) and its run-time libraries in one
# folder, the driver's libcuda.so.1 excepted. The libraries are the same wheels' files as
# PyTorch's CUDA 13 builds install (site-packages/nvidia/cu13/lib), so on a machine that
# has those the binary alone is enough, with that folder on LD_LIBRARY_PATH.
OUT="$TARGET/release/sd-worker-cuda-sm$CUDA_COMPUTE_CAP"
mkdir -p "$OUT"
cp "$TARGET/release/sd-worker" "$OUT/"
strip "$OUT/sd-worker"
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 \
  libnvrtc.so.13 libnvrtc-builtins.so.13.0; do
  cp -L "$CUDA/lib/$lib" "$OUT/"
done
echo "$OUT/sd-worker"
