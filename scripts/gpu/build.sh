#!/usr/bin/env bash
# Builds the CUDA binary for the GPU check on a machine without a GPU or a system CUDA toolkit, and stages the
# kit that `run.sh` expects in .gpu/ (the binary, run.sh and its helpers, the diffusers wheel).
#
#   scripts/gpu/build.sh                       # FEATURES=cuda,cudnn,flash-attn CUDA_COMPUTE_CAP=90 by default
#
# 1. CUDA 13.0 from PyPI wheels into $CUDA_WORK/venv (nvcc, the runtime, cuBLAS, cuRAND, NVRTC, cuDNN 9): the
#    580 driver on the device reads PTX 9.0, which nvcc 13.0 writes.
# 2. A CUDA "home" of symlinks over those wheels, plus a stub libcuda.so (soname libcuda.so.1) exporting every
#    cu* symbol of cuda.h: cudarc links the CUDA libraries dynamically, so the binary needs them at link time;
#    on the device they come from the driver and torch's nvidia/* wheels (run.sh finds them).
# 3. CUTLASS 3.5 headers for the flash-attention kernels: $CUTLASS_DIR, or the commit candle-flash-attn 0.11.1
#    pins, from a local git copy ($CUTLASS_GIT) or GitHub.
# 4. The fused kernels compiled with the real NVRTC (nvrtc_check.py), then cargo build --release, strip, xz -9e
#    into .gpu/sd-rbee.xz; the kernel census library (kernel_census.c) and CUPTI beside it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CUDA_WORK=${CUDA_WORK:-$ROOT/target/cuda-toolkit}
FEATURES=${FEATURES:-cuda,cudnn,flash-attn}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
CUTLASS_COMMIT=7d49e6c7e2f8896c47f586706e67e1fb215529dc   # CUTLASS 3.5.0, as candle-flash-attn 0.11.1

VENV=$CUDA_WORK/venv
if ! ls "$VENV"/lib/python3*/site-packages/nvidia/cu13/{bin/nvcc,lib/libcupti.so.13} >/dev/null 2>&1; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cublas==13.0.*" "nvidia-curand" \
    "nvidia-cuda-nvrtc==13.0.*" "nvidia-cudnn-cu13" "nvidia-cuda-cupti==13.0.*"
fi
NV=$(echo "$VENV"/lib/python3*/site-packages/nvidia)
HOME_DIR=$CUDA_WORK/home
mkdir -p "$HOME_DIR/lib64/stubs"
ln -sfn "$NV/cu13/bin" "$HOME_DIR/bin"
ln -sfn "$NV/cu13/include" "$HOME_DIR/include"
ln -sfn "$NV/cu13/nvvm" "$HOME_DIR/nvvm"
for f in "$NV"/cu13/lib/*.so.* "$NV"/cudnn/lib/*.so.*; do
  b=$(basename "$f"); ln -sf "$f" "$HOME_DIR/lib64/$b"; ln -sf "$f" "$HOME_DIR/lib64/${b%%.so*}.so"
done
for h in "$NV"/cudnn/include/cudnn*.h; do ln -sf "$h" "$NV/cu13/include/"; done
if [ ! -f "$HOME_DIR/lib64/stubs/libcuda.so" ]; then
  inc=$HOME_DIR/include
  { grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$inc/cuda.h"; gcc -E -I"$inc" "$inc/cuda.h" | grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b'; } \
    | sort -u | awk '{print "void "$1"(void){}"}' > "$CUDA_WORK/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$HOME_DIR/lib64/stubs/libcuda.so" "$CUDA_WORK/libcuda_stub.c"
fi
ln -sf stubs/libcuda.so "$HOME_DIR/lib64/libcuda.so"

if [[ ",$FEATURES," == *,flash-attn,* ]]; then
  if [ -z "${CUTLASS_DIR:-}" ]; then
    CUTLASS_DIR=$CUDA_WORK/cutlass
    # a local git copy holding the pinned commit (the search tool's `fetch github:NVIDIA/cutlass` brings one
    # where GitHub itself is unreachable), else a clone from GitHub
    CUTLASS_GIT=${CUTLASS_GIT:-/work/.mirror/NVIDIA+cutlass/repo}
    if [ ! -d "$CUTLASS_DIR/include/cute" ]; then
      if git --git-dir="$CUTLASS_GIT" cat-file -e "$CUTLASS_COMMIT^{commit}" 2>/dev/null; then
        mkdir -p "$CUTLASS_DIR"
        git --git-dir="$CUTLASS_GIT" archive "$CUTLASS_COMMIT" include tools/util/include 2>/dev/null \
          | tar -x -C "$CUTLASS_DIR"
      else
        git clone --filter=blob:none --no-checkout https://github.com/NVIDIA/cutlass.git "$CUTLASS_DIR"
        git -C "$CUTLASS_DIR" checkout "$CUTLASS_COMMIT" -- include tools/util/include
      fi
    fi
  fi
  export CUTLASS_DIR
fi

export CUDA_HOME=$HOME_DIR CUDA_PATH=$HOME_DIR CUDA_ROOT=$HOME_DIR PATH=$HOME_DIR/bin:$PATH
export LIBRARY_PATH=$HOME_DIR/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}
# the flash-attention objects survive `cargo clean` of the crate (about 10 minutes on 2 cores)
export SD_RBEE_FLASH_ATTN_BUILD_DIR=${SD_RBEE_FLASH_ATTN_BUILD_DIR:-$CUDA_WORK/flash-attn-$CUDA_COMPUTE_CAP}
mkdir -p "$SD_RBEE_FLASH_ATTN_BUILD_DIR"
cd "$ROOT"
# NVRTC compiles the fused kernels when the binary first needs them, and a refusal there only falls back to
# Candle's operations with a warning: compile them with the real NVRTC here first
python3 scripts/gpu/nvrtc_check.py "$NV/cu13/lib/libnvrtc.so.13"
# In a target directory of its own (target/cuda-build unless CARGO_TARGET_DIR says otherwise): sharing
# target/release with the CPU build, the two feature sets would rebuild each other.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cuda-build}
TARGET_DIR=$CARGO_TARGET_DIR
CARGO_INCREMENTAL=0 cargo build --release --locked --features "$FEATURES"

KIT=$ROOT/.gpu
mkdir -p "$KIT/whl"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
strip -o "$KIT/sd-rbee" "$TARGET_DIR/release/sd-rbee"
xz -9e -T0 -f "$KIT/sd-rbee"
cp scripts/gpu/run.sh scripts/gpu/parity.py scripts/gpu/torch_bench.py scripts/gpu/census_kinds.py "$KIT/"
# the kernel census (a CUPTI injection library) and CUPTI 13.0 in case the device's Python has none
gcc -O2 -Wall -shared -fPIC -I"$HOME_DIR/include" scripts/gpu/kernel_census.c -o "$KIT/libkernel_census.so" -ldl -lpthread
xz -9e -T0 -c "$NV/cu13/lib/libcupti.so.13" > "$KIT/libcupti.so.13.xz"
xz -9e -T0 -c assets/clip-tokenizer.json > "$KIT/clip-tokenizer.json.xz"   # the diffusers half's random pipeline
ls "$KIT"/whl/diffusers-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps -d "$KIT/whl" diffusers==0.42.1
ls -la "$KIT" "$KIT/whl"
echo "kit ready: run 'bash .gpu/run.sh' on the device with carry [\".gpu\"]"
