#!/usr/bin/env bash
# sd-rbee GPU check, one script: library discovery, CUDA parity with diffusers (f32, then f16 with and without
# flash attention), full-size SD 1.5 (512 px) and SDXL (1024 px) UNets with seeded random weights against
# diffusers (SDPA) on the same card at batch 1..8, whole images on both sides, a kernel census of both sides
# (CUPTI), A/B of flash attention and the fused kernels, VAE decode at 2048 px whole and tiled, and the tiny
# pipelines. Sections are ordered by value; later ones are skipped past BUDGET.
#   on the device:  bash .gpu/run.sh                    (writes $OUT/log.txt and $OUT/summary.txt)
#   fake run here:  DEVICE=cpu LATENT=8 EXTRA_LD=... OUT=/tmp/o bash .gpu/run.sh
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KIT=$ROOT/.gpu
cd "$ROOT"
DEVICE=${DEVICE:-cuda}            # cuda, or cpu for a dry run
LATENT=${LATENT:-64}              # full-size UNet latent side
UNET_RUNS=${UNET_RUNS:-10}
XL_LATENT=${XL_LATENT:-128}         # SDXL UNet latent side (1024 px)
VAE_SIZE=${VAE_SIZE:-2048}
PIPE_SIZE=${PIPE_SIZE:-512}         # whole images' side in pixels, and their steps
PIPE_STEPS=${PIPE_STEPS:-20}
BUDGET=${BUDGET:-420}             # seconds; sections (and parity runs) starting later are skipped
OUT=${OUT:-/tmp/sdr-out}
W=${WORK:-/tmp/sdr-gpu}
FIX=$ROOT/tests/fixtures
mkdir -p "$OUT" "$W/t" "$W/u"
exec > >(tee -a "$OUT/log.txt") 2>&1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PIP_ROOT_USER_ACTION=ignore
export HF_HUB_DISABLE_PROGRESS_BARS=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# the driver JIT-compiles Candle's sm_90a PTX once per module; keep that cache for the later processes
export CUDA_CACHE_PATH=$W/nvcache CUDA_CACHE_MAXSIZE=2147483648
summary() { sleep 1; grep -E "^(parity|bench|baseline|baseline-env|FAIL|section|gpu|lib|generate|ab|unetcheck|profile|census|census-kind):" "$OUT/log.txt" > "$OUT/summary.txt" 2>/dev/null; }
trap summary EXIT
section() { echo; echo "section: $1 (t=${SECONDS}s)"; }
over() { if (( SECONDS > BUDGET )); then echo "section: SKIPPED $1 (t=${SECONDS}s > budget ${BUDGET}s)"; return 0; fi; return 1; }
# unpack SRC DST: the kit's xz files, with xz where the device has it, else Python's lzma
unpack() {
  if command -v xz >/dev/null; then xz -dc "$1" > "$2"
  else "${PY:-python3}" -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2"; fi
}

section "environment"
date -u; uname -r
if command -v nvidia-smi >/dev/null; then
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | sed 's/^/gpu: /'
else echo "nvidia-smi: not found"; fi
PY=python3
[ -x /opt/torch/.venv/bin/python3 ] && PY=/opt/torch/.venv/bin/python3
echo "python: $PY ($($PY --version 2>&1))"

section "CUDA libraries"
# Directories holding the CUDA libraries the binary needs: the driver's (libcuda.so.1), then the pip
# nvidia-* wheels of the Python that holds torch (nvidia/cu13/lib, nvidia/*/lib), torch/lib, the toolkit's.
LIBDIRS=$($PY - <<'PYEOF'
import glob, importlib.util, os, site, sys
dirs = []
def add(d):
    if d and os.path.isdir(d) and glob.glob(os.path.join(d, "lib*.so*")) and d not in dirs:
        dirs.append(d)
for d in os.environ.get("EXTRA_LD", "").split(":"):
    add(d)
for d in ["/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64"]:
    if glob.glob(os.path.join(d, "libcuda.so*")):
        add(d)
bases = []
try:
    import nvidia
    bases += list(nvidia.__path__)
except Exception as e:
    print("no 'nvidia' package:", e, file=sys.stderr)
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    bases.append(os.path.join(sp, "nvidia"))
for b in bases:
    for d in sorted(glob.glob(os.path.join(b, "cu1*", "lib"))) + sorted(glob.glob(os.path.join(b, "*", "lib"))):
        add(d)
spec = importlib.util.find_spec("torch")
if spec and spec.submodule_search_locations:
    add(os.path.join(list(spec.submodule_search_locations)[0], "lib"))
for d in ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]:
    add(d)
print(":".join(dirs))
PYEOF
)
export LD_LIBRARY_PATH=$LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
IFS=: read -ra DIRS <<< "$LIBDIRS"
for so in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libnvrtc-builtins.so.13.0 libcudnn.so.9 libcupti.so.13; do
  hit=""
  for d in "${DIRS[@]}"; do [ -e "$d/$so" ] && { hit="$d/$so -> $(readlink -f "$d/$so")"; break; }; done
  [ -z "$hit" ] && hit=$(ldconfig -p 2>/dev/null | grep -m1 " $so " | sed 's/.*=> /ldconfig: /')
  echo "lib: $so: ${hit:-NOT FOUND}"
done

section "binary"
BIN=$W/sd-rbee
unpack "$KIT/sd-rbee.xz" "$BIN"
chmod +x "$BIN"
ls -la "$BIN"
ldd "$BIN"
ldd "$BIN" | grep -q "not found" && echo "FAIL: ldd: some libraries not found"
"$BIN" --version

# generate MODEL CASE DTYPE [LABEL]: one reference case of tests/parity.rs through the CLI (as tests/cli_generate.rs);
# LABEL names the saved tensor's variant (default: the dtype)
generate() {
  local model=$1 case=$2 dtype=$3 label=${4:-$3} sched guidance args
  case "$model" in tiny-sd15) guidance=7.5 ;; *) guidance=5.0 ;; esac
  sched=$case
  if [ "$case" = turbo_1step ]; then
    args=(--steps 1 --guidance 0 --scheduler euler_a --timestep-spacing trailing)
  else
    args=(--negative-prompt "blurry, low quality" --steps 10 --guidance "$guidance" --scheduler "$sched")
  fi
  local t="$W/t/${model}__${case}__${label}.safetensors"
  rm -f "$t"
  if [ -n "${GEN_HUNG:-}" ]; then echo "generate: $model $case $label SKIPPED (an earlier run timed out)"; return; fi
  over "generate $model $case $label" && return
  local line
  line=$(timeout 60 "$BIN" generate --model "$FIX/$model" --prompt "a photograph of an astronaut riding a horse" \
      "${args[@]}" --width 96 --height 64 --seed 0 --initial-latents "$FIX/$model/expected.safetensors" \
      --out "$W/${model}_${case}_${label}.png" --save-tensor "$t" --offline --device "$DEVICE" --dtype "$dtype" 2>&1)
  local rc=$?
  echo "generate: $model $case $label rc=$rc: $line"
  [ $rc -ne 0 ] && echo "FAIL: generate $model $case $label rc=$rc"
  [ $rc -eq 124 ] && GEN_HUNG=1
  return 0
}
parity() {   # DTYPE [LABEL]
  rm -f "$W"/t/*.safetensors
  for c in ddim euler dpmpp_2m unipc; do generate tiny-sd15 $c "$@"; done
  for c in euler ddim turbo_1step; do generate tiny-sdxl $c "$@"; done
  timeout 60 $PY "$KIT/parity.py" "$W/t" "$FIX" || echo "FAIL: parity.py"
}
# unet ARCH DTYPE LATENT BATCHES [ENV...]: sd-rbee's full-size UNet, seeded random weights; with SAVE=LABEL the
# first batch size's output goes to $W/u/LABEL.safetensors (compared with the f32 one at the end of the f32 section);
# with PROFILE=1 one more call per batch size is timed component by component (`profile:` lines)
unet() {
  local arch=$1 dt=$2 latent=$3 batches=$4; shift 4
  over "bench unet $arch $dt $batches $*" && return
  echo "ab: sd-rbee unet $arch $dt latent=$latent batch=$batches env: ${*:-defaults}"
  env "$@" timeout 120 "$BIN" bench unet --arch "$arch" --latent "$latent" --batch "$batches" --runs "$UNET_RUNS" \
    --device "$DEVICE" --dtype "$dt" ${SAVE:+--save-output "$W/u/$SAVE.safetensors"} ${PROFILE:+--profile} || echo "FAIL: bench unet $arch $dt $batches $*"
}
# torch_unet ARCH DTYPE LATENT BATCHES [--tf32 on|off] [--profile]: the diffusers half (SDPA attention, its default)
torch_unet() {
  local arch=$1 dt=$2 latent=$3 batches=$4; shift 4
  over "baseline unet $arch $dt $batches $*" && return
  timeout 150 $PY "$ROOT/benches/torch_baseline.py" unet --arch "$arch" --latent "$latent" --batch "$batches" \
    --runs "$UNET_RUNS" --device "$DEVICE" --dtype "$dt" "$@" || echo "FAIL: baseline unet $arch $dt $batches"
}

section "parity f32 (diffusers 0.42.1 references; CPU f32 gives <=5.3e-6 max, sdxl ddim 3.8e-4)"
parity f32

section "diffusers wheel"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" "$KIT"/whl/*.whl \
  || echo "FAIL: pip install diffusers wheel"
export PYTHONPATH=$W/site${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import torch, diffusers; print('baseline-env: torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.version.cuda)"

section "full-size SD 1.5 UNet, 512 px, f16, batch 1..8: sd-rbee, then diffusers; each batch also profiled"
SAVE=f16 PROFILE=1 unet sd15 f16 "$LATENT" 1,2,4,8
torch_unet sd15 f16 "$LATENT" 1,2,4,8 --profile

section "full-size SDXL UNet, 1024 px, f16; each batch also profiled"
PROFILE=1 unet sdxl f16 "$XL_LATENT" 1,2,4
torch_unet sdxl f16 "$XL_LATENT" 1,2,4 --profile

section "whole images, random:sd15 ${PIPE_SIZE} px, ${PIPE_STEPS} steps, f16: sd-rbee at batch 1,4,8, then diffusers at batch 1,4"
if ! over "bench pipeline random"; then
  timeout 150 "$BIN" bench pipeline --model random:sd15 --width "$PIPE_SIZE" --height "$PIPE_SIZE" --steps "$PIPE_STEPS" \
    --runs 2 --batch 1,4,8 --device "$DEVICE" --dtype f16 || echo "FAIL: bench pipeline random:sd15"
fi
if ! over "baseline pipeline random"; then
  # the CLIP tokenizer sd-rbee has built in (the checkout's assets/ stays behind: the tree must fit the carry)
  unpack "$KIT/clip-tokenizer.json.xz" "$W/clip-tokenizer.json"
  timeout 150 $PY "$ROOT/benches/torch_baseline.py" random-pipeline --arch sd15 --width "$PIPE_SIZE" \
    --height "$PIPE_SIZE" --steps "$PIPE_STEPS" --runs 2 --batch 1,4 --device "$DEVICE" --dtype f16 \
    --tokenizer "$W/clip-tokenizer.json" || echo "FAIL: baseline pipeline random:sd15"
fi

# census SIDE ARCH LATENT IMAGES: three timed f16 calls in one process under the CUPTI kernel census
# (kernel_census.c): per kernel name, GPU time, launches and share of the window (`census:` lines), every row
# in $OUT/census.tsv, and a roll-up by kind (`census-kind:` lines) at the end of the section
census() {
  local side=$1 arch=$2 latent=$3 images=$4 label="$1 $2 images=$4"
  over "census $label" && return
  local env=(CUDA_INJECTION64_PATH="$KIT/libkernel_census.so" SDR_CENSUS_LABEL="${label// /_}" SDR_CENSUS_CALLS=3
             SDR_CENSUS_OUT="$OUT/census.tsv" SDR_CENSUS_TOP=25)
  [ -n "$CUPTI" ] && env+=(SDR_CENSUS_CUPTI="$CUPTI")
  # the timings of these runs carry CUPTI's overhead: relabelled so they are not read as measurements
  {
    if [ "$side" = sd-rbee ]; then
      env "${env[@]}" timeout 120 "$BIN" bench unet --arch "$arch" --latent "$latent" --batch "$images" --runs 3 \
        --device "$DEVICE" --dtype f16
    else
      env "${env[@]}" timeout 150 $PY "$ROOT/benches/torch_baseline.py" unet --arch "$arch" --latent "$latent" \
        --batch "$images" --runs 3 --device "$DEVICE" --dtype f16
    fi
  } 2>&1 | sed -E 's/^(bench|baseline):/census-run \1:/'
  [ "${PIPESTATUS[0]}" -eq 0 ] || echo "FAIL: census $label"
}

section "kernel census (CUPTI), f16: SDXL 1 image and SD 1.5 8 images, sd-rbee then diffusers"
# the device's own CUPTI when its Python has one (one copy per process), else the kit's
have_cupti() {
  local d
  for d in "${DIRS[@]}"; do [ -e "$d/libcupti.so.13" ] && return 0; done
  ldconfig -p 2>/dev/null | grep -q " libcupti.so.13 "
}
CUPTI=""
if ! have_cupti; then
  CUPTI=$W/libcupti.so.13
  unpack "$KIT/libcupti.so.13.xz" "$CUPTI"
fi
echo "census: CUPTI ${CUPTI:-from the library path}"
census sd-rbee sdxl "$XL_LATENT" 1
census diffusers sdxl "$XL_LATENT" 1
census sd-rbee sd15 "$LATENT" 8
census diffusers sd15 "$LATENT" 8
[ -f "$OUT/census.tsv" ] && timeout 30 $PY "$KIT/census_kinds.py" "$OUT/census.tsv"

section "A/B at batch 1, SD 1.5 f16: without flash attention, without the fused kernels, without both, Candle's own cuDNN calls; SDXL f16 without the fused kernels"
SAVE=f16-noflash unet sd15 f16 "$LATENT" 1 SD_RBEE_FLASH_ATTN=0
SAVE=f16-nofused unet sd15 f16 "$LATENT" 1 SD_RBEE_FUSED_KERNELS=0
SAVE=f16-plain unet sd15 f16 "$LATENT" 1 SD_RBEE_FLASH_ATTN=0 SD_RBEE_FUSED_KERNELS=0
unet sd15 f16 "$LATENT" 1 SD_RBEE_CUDNN_PLANS=0
# SDXL is where the gap was (1.87x diffusers in f16, 2026-11-30): the fused layer tails (bias, time shift,
# residual), GEGLU with the bias, and the transformer projections without permute copies, on and off
unet sdxl f16 "$XL_LATENT" 1 SD_RBEE_FUSED_KERNELS=0

section "f32 at batch 1 (full f32 on both sides; then TF32 everywhere on both)"
SAVE=f32 unet sd15 f32 "$LATENT" 1
torch_unet sd15 f32 "$LATENT" 1 --tf32 off
SAVE=tf32 unet sd15 f32 "$LATENT" 1 SD_RBEE_TF32=1
torch_unet sd15 f32 "$LATENT" 1 --tf32 on
# the same seeded weights and inputs: each output against full f32 (flash and the fused kernels have no
# reference case small enough for tests/fixtures' tiny models, whose head dimensions flash does not take)
timeout 60 $PY - "$W/u" <<'PYEOF' || echo "FAIL: unet output check"
import glob, os, sys
import numpy as np
from safetensors.numpy import load_file
d = sys.argv[1]
ref = load_file(os.path.join(d, "f32.safetensors"))["out"].astype(np.float64)
scale = np.abs(ref).max()
for p in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
    label = os.path.basename(p)[: -len(".safetensors")]
    got = load_file(p)["out"].astype(np.float64)
    diff = np.abs(got - ref)
    print(f"unetcheck: sd15 {label:12s} vs f32: max_abs={diff.max():.3e} mean_abs={diff.mean():.3e} "
          f"max_rel={diff.max() / scale:.3e} finite={bool(np.isfinite(got).all())}")
PYEOF

section "parity f16 (the fused kernels; flash attention does not take the tiny models' head dimensions), bf16"
parity f16
parity bf16

section "VAE decode ${VAE_SIZE}px f16, whole and tiled"
for tiled in "" --tiled; do
  over "bench vae $tiled" && continue
  timeout 90 "$BIN" bench vae --arch sd15 --size "$VAE_SIZE" $tiled --device "$DEVICE" --dtype f16 || echo "FAIL: bench vae $tiled"
done

section "tiny pipelines, both sides"
for m in tiny-sd15 tiny-sdxl; do for dt in f32 f16; do
  over "bench pipeline $m $dt" && continue
  timeout 60 "$BIN" bench pipeline --model "$FIX/$m" --offline --device "$DEVICE" --dtype $dt || echo "FAIL: bench pipeline $m $dt"
done
  over "baseline pipeline $m" && continue
  timeout 90 $PY "$KIT/torch_bench.py" pipeline "$FIX/$m" --device "$DEVICE" --dtypes f32,f16 || echo "FAIL: baseline pipeline $m"
done

section "done"
sleep 1; echo "==== results (also in \$OUT/summary.txt)"
grep -E '^(gpu|parity|bench|baseline|ab|unetcheck|FAIL):' "$OUT/log.txt" | sed 's/^/= /'
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=memory.used,clocks.sm,temperature.gpu --format=csv; fi
exit 0
