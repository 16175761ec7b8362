//! Fused CUDA kernels for the UNet's and VAE's elementwise tails, compiled once per process by NVRTC
//! (which every CUDA build already links): GroupNorm with an optional SiLU, and GEGLU's `h * gelu(gate)`.
//!
//! Candle runs GroupNorm as about ten kernels (reshape, mean, subtract, square, mean, add, sqrt, divide,
//! scale, shift, then SiLU) and GEGLU as two strided copies, an erf GELU and a multiply, each a full pass
//! over memory. These are two passes and one pass. Statistics are accumulated in f32 whatever the tensor's
//! dtype, as PyTorch does. `SD_RBEE_FUSED_KERNELS=0` turns them off (A/B timing, or a suspect kernel).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};

const SOURCE: &str = r#"
__device__ __forceinline__ float h2f(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short f2h(float f) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float b2f(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }
__device__ __forceinline__ unsigned short f2b(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                                  // round to nearest even
    return (unsigned short)(u >> 16);
}
struct F32 { typedef float T; static __device__ float ld(const T *p, long i) { return p[i]; } static __device__ void st(T *p, long i, float v) { p[i] = v; } };
struct F16 { typedef unsigned short T; static __device__ float ld(const T *p, long i) { return h2f(p[i]); } static __device__ void st(T *p, long i, float v) { p[i] = f2h(v); } };
struct BF16 { typedef unsigned short T; static __device__ float ld(const T *p, long i) { return b2f(p[i]); } static __device__ void st(T *p, long i, float v) { p[i] = f2b(v); } };

#define THREADS 256

// Chan et al.'s merge of two (count, mean, M2) partial statistics into the first.
__device__ __forceinline__ void merge(float &n, float &mean, float &m2, float n2, float mean2, float m22) {
    float total = n + n2;
    if (total == 0.f) return;
    float delta = mean2 - mean;
    float w = n2 / total;
    mean += delta * w;
    m2 += m22 + delta * delta * n * w;
    n = total;
}

// Pass 1: block (group, split) folds its slice of the group into (count, mean, M2) with Welford's update,
// merges across the block, and writes one partial.
template <class D>
__device__ void gn_stats(const typename D::T *x, float *partial, long group_len, int splits) {
    long group = blockIdx.x;
    int split = blockIdx.y;
    long chunk = (group_len + splits - 1) / splits;
    long start = split * chunk;
    long end = min(group_len, start + chunk);
    const typename D::T *xs = x + group * group_len;
    float n = 0.f, mean = 0.f, m2 = 0.f;
    for (long i = start + threadIdx.x; i < end; i += THREADS) {
        float v = D::ld(xs, i);
        n += 1.f;
        float d = v - mean;
        mean += d / n;
        m2 += d * (v - mean);
    }
    __shared__ float sn[THREADS], smean[THREADS], sm2[THREADS];
    sn[threadIdx.x] = n; smean[threadIdx.x] = mean; sm2[threadIdx.x] = m2;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float a = sn[threadIdx.x], b = smean[threadIdx.x], c = sm2[threadIdx.x];
            merge(a, b, c, sn[threadIdx.x + stride], smean[threadIdx.x + stride], sm2[threadIdx.x + stride]);
            sn[threadIdx.x] = a; smean[threadIdx.x] = b; sm2[threadIdx.x] = c;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float *p = partial + (group * splits + split) * 3;
        p[0] = sn[0]; p[1] = smean[0]; p[2] = sm2[0];
    }
}

// Pass 2: block (group, split) merges the group's partials, then normalises its slice:
// y = (x - mean) * rstd * weight[c] + bias[c], then SiLU when asked.
template <class D>
__device__ void gn_apply(const typename D::T *x, const typename D::T *weight, const typename D::T *bias,
                         const float *partial, typename D::T *y, long group_len, int splits, long hw,
                         int channels_per_group, int groups, float eps, int silu) {
    long group = blockIdx.x;
    int split = blockIdx.y;
    __shared__ float stats[2];
    if (threadIdx.x == 0) {
        float n = 0.f, mean = 0.f, m2 = 0.f;
        for (int s = 0; s < splits; s++) {
            const float *p = partial + (group * splits + s) * 3;
            merge(n, mean, m2, p[0], p[1], p[2]);
        }
        stats[0] = mean;
        stats[1] = 1.f / sqrtf(m2 / n + eps);
    }
    __syncthreads();
    float mean = stats[0], rstd = stats[1];
    long chunk = (group_len + splits - 1) / splits;
    long start = split * chunk;
    long end = min(group_len, start + chunk);
    long base = group * group_len;
    int first_channel = (int)(group % groups) * channels_per_group;
    for (long i = start + threadIdx.x; i < end; i += THREADS) {
        int c = first_channel + (int)(i / hw);
        float scale = rstd * D::ld(weight, c);
        float v = (D::ld(x, base + i) - mean) * scale + D::ld(bias, c);
        if (silu) v = v / (1.f + expf(-v));
        D::st(y, base + i, v);
    }
}

// GEGLU: projected rows are [h | gate] (2 * inner wide); y = h * gelu(gate) with the exact (erf) GELU.
template <class D>
__device__ void geglu(const typename D::T *projected, typename D::T *y, long rows, long inner) {
    long total = rows * inner;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long r = i / inner, c = i - r * inner;
        float h = D::ld(projected, r * 2 * inner + c);
        float g = D::ld(projected, r * 2 * inner + inner + c);
        D::st(y, i, h * 0.5f * g * (1.f + erff(g * 0.70710678118654752f)));
    }
}

#define INSTANTIATE(D, name)                                                                                  \
extern "C" __global__ void gn_stats_##name(const D::T *x, float *partial, long group_len, int splits) {      \
    gn_stats<D>(x, partial, group_len, splits);                                                               \
}                                                                                                             \
extern "C" __global__ void gn_apply_##name(const D::T *x, const D::T *w, const D::T *b, const float *partial, \
        D::T *y, long group_len, int splits, long hw, int cpg, int groups, float eps, int silu) {            \
    gn_apply<D>(x, w, b, partial, y, group_len, splits, hw, cpg, groups, eps, silu);                          \
}                                                                                                             \
extern "C" __global__ void geglu_##name(const D::T *p, D::T *y, long rows, long inner) {                     \
    geglu<D>(p, y, rows, inner);                                                                              \
}
INSTANTIATE(F32, f32)
INSTANTIATE(F16, f16)
INSTANTIATE(BF16, bf16)
"#;

const MODULE: &str = "sd_rbee_fused";
const THREADS: u32 = 256;

/// Whether `SD_RBEE_FUSED_KERNELS=0` turned the kernels off.
fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("SD_RBEE_FUSED_KERNELS").map_or(true, |v| v.trim() != "0"))
}

/// The module's PTX, compiled on first use (a few hundred milliseconds, once per process); `None` when NVRTC
/// cannot compile it (say, its builtins library is missing), after one warning: Candle's own operations
/// then run instead.
fn ptx() -> Option<&'static str> {
    static PTX: OnceLock<Option<String>> = OnceLock::new();
    PTX.get_or_init(|| match candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE) {
        Ok(ptx) => Some(ptx.to_src()),
        Err(e) => {
            tracing::warn!("the fused CUDA kernels did not compile, using Candle's operations instead: {e:?}");
            None
        }
    })
    .as_deref()
}

/// Whether the kernels can run: turned on, and compiled.
fn available() -> bool {
    enabled() && ptx().is_some()
}

fn module() -> Result<&'static str> {
    ptx().ok_or_else(|| candle_core::Error::Msg("the fused CUDA kernels did not compile".into()))
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("fused CUDA kernels take f32, f16 or bf16, not {other:?}"),
    })
}

fn launch_error(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("fused CUDA kernel launch failed: {e:?}"))
}

fn contiguous_start(layout: &Layout, what: &str) -> Result<usize> {
    match layout.contiguous_offsets() {
        Some((start, _)) => Ok(start),
        None => bail!("fused CUDA kernel: {what} must be contiguous"),
    }
}

/// Splits per group so that the launch has about four blocks per multiprocessor even for few groups.
fn splits_for(group_len: usize) -> usize {
    group_len.div_ceil(4096).clamp(1, 64)
}

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl GroupNormOp {
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        x: &CudaStorage,
        x_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
        b: &CudaStorage,
        b_l: &Layout,
    ) -> Result<CudaStorage> {
        let dims = x_l.dims();
        let channels = dims[1];
        let hw: usize = dims[2..].iter().product();
        let batch_groups = dims[0] * self.groups;
        let group_len = channels / self.groups * hw;
        let splits = splits_for(group_len);
        let x = x.as_cuda_slice::<T>()?.slice(contiguous_start(x_l, "the input")?..);
        let w = w.as_cuda_slice::<T>()?.slice(contiguous_start(w_l, "the weight")?..);
        let b = b.as_cuda_slice::<T>()?.slice(contiguous_start(b_l, "the bias")?..);
        let name = suffix(T::DTYPE)?;
        // SAFETY: every partial is written by the stats pass before the apply pass reads it.
        let partial = unsafe { dev.alloc::<f32>(batch_groups * splits * 3)? };
        let out = unsafe { dev.alloc::<T>(x_l.shape().elem_count())? };
        let grid = LaunchConfig {
            grid_dim: (batch_groups as u32, splits as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (group_len, splits_i, hw) = (group_len as i64, splits as i32, hw as i64);
        let stats = dev.get_or_load_custom_func(&format!("gn_stats_{name}"), MODULE, module()?)?;
        let mut builder = stats.builder();
        builder.arg(&x).arg(&partial).arg(&group_len).arg(&splits_i);
        unsafe { builder.launch(grid) }.map_err(launch_error)?;
        let apply = dev.get_or_load_custom_func(&format!("gn_apply_{name}"), MODULE, module()?)?;
        let (cpg, groups, silu) = ((channels / self.groups) as i32, self.groups as i32, i32::from(self.silu));
        let mut builder = apply.builder();
        builder.arg(&x).arg(&w).arg(&b).arg(&partial).arg(&out).arg(&group_len).arg(&splits_i).arg(&hw);
        builder.arg(&cpg).arg(&groups).arg(&self.eps).arg(&silu);
        unsafe { builder.launch(grid) }.map_err(launch_error)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl candle_core::CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "cuda-group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("cuda-group-norm runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
        b: &CudaStorage,
        b_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let out = match x.dtype() {
            DType::F32 => self.run::<f32>(&dev, x, x_l, w, w_l, b, b_l)?,
            DType::F16 => self.run::<f16>(&dev, x, x_l, w, w_l, b, b_l)?,
            DType::BF16 => self.run::<bf16>(&dev, x, x_l, w, w_l, b, b_l)?,
            other => bail!("cuda-group-norm takes f32, f16 or bf16, not {other:?}"),
        };
        Ok((out, x_l.shape().clone()))
    }
}

/// `group_norm(x)` (then SiLU when `silu`) for `x: [B, C, ...]` on CUDA with per-channel `weight`/`bias`
/// of x's dtype; `None` where the kernels do not apply (another device, turned off, odd shapes).
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    let dims = x.dims();
    if !x.device().is_cuda()
        || !available()
        || dims.len() < 3
        || x.elem_count() == 0
        || dims[1] % groups != 0
        || weight.dtype() != x.dtype()
        || bias.dtype() != x.dtype()
        || weight.elem_count() != dims[1]
        || bias.elem_count() != dims[1]
        || !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
    {
        return Ok(None);
    }
    let op = GroupNormOp { groups, eps: eps as f32, silu };
    Ok(Some(x.contiguous()?.apply_op3_no_bwd(weight, bias, &op)?))
}

struct GegluOp;

impl GegluOp {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        p: &CudaStorage,
        p_l: &Layout,
    ) -> Result<CudaStorage> {
        let dims = p_l.dims();
        let inner = dims[dims.len() - 1] / 2;
        let rows = p_l.shape().elem_count() / (2 * inner);
        let p = p.as_cuda_slice::<T>()?.slice(contiguous_start(p_l, "the projection")?..);
        let out = unsafe { dev.alloc::<T>(rows * inner)? };
        let func = dev.get_or_load_custom_func(&format!("geglu_{}", suffix(T::DTYPE)?), MODULE, module()?)?;
        let cfg = LaunchConfig {
            grid_dim: ((rows * inner).div_ceil(THREADS as usize).min(65_535) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows, inner) = (rows as i64, inner as i64);
        let mut builder = func.builder();
        builder.arg(&p).arg(&out).arg(&rows).arg(&inner);
        unsafe { builder.launch(cfg) }.map_err(launch_error)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl candle_core::CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "cuda-geglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("cuda-geglu runs on CUDA only")
    }

    fn cuda_fwd(&self, p: &CudaStorage, p_l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = p.device().clone();
        let out = match p.dtype() {
            DType::F32 => self.run::<f32>(&dev, p, p_l)?,
            DType::F16 => self.run::<f16>(&dev, p, p_l)?,
            DType::BF16 => self.run::<bf16>(&dev, p, p_l)?,
            other => bail!("cuda-geglu takes f32, f16 or bf16, not {other:?}"),
        };
        let mut dims = p_l.dims().to_vec();
        *dims.last_mut().unwrap() /= 2;
        Ok((out, Shape::from(dims)))
    }
}

/// `h * gelu_erf(gate)` for `projected = [..., h | gate]` on CUDA; `None` elsewhere.
pub fn geglu(projected: &Tensor) -> Result<Option<Tensor>> {
    let width = projected.dim(candle_core::D::Minus1)?;
    if !projected.device().is_cuda()
        || !available()
        || width == 0
        || width % 2 != 0
        || projected.elem_count() == 0
        || !matches!(projected.dtype(), DType::F32 | DType::F16 | DType::BF16)
    {
        return Ok(None);
    }
    Ok(Some(projected.contiguous()?.apply_op1_no_bwd(&GegluOp)?))
}
