//! Fused CUDA kernels for the UNet's and VAE's elementwise work, compiled once per process by NVRTC
//! (which every CUDA build already links): GroupNorm with an optional SiLU (`group_norm`), GEGLU's
//! `h * gelu(gate)` with the projection's bias (`geglu`), and the tails of convolutions and linear layers:
//! bias, time shift, residual and output scale in one pass over the layer's fresh output (`tails`).
//!
//! Candle runs GroupNorm as about ten kernels, and every bias or time-embedding add as a broadcasting
//! binary kernel that recomputes each element's index with a division per dimension: on an H200 those
//! run at a small fraction of memory bandwidth, and the fused kernels' A/B (README) showed what that
//! costs. Statistics and sums are accumulated in f32 whatever the tensor's dtype, as PyTorch does; in f32
//! the additions happen in the order Candle's separate operations do them, so f32 results do not move.
//! `SD_RBEE_FUSED_KERNELS=0` turns every kernel here off (A/B timing, or a suspect kernel).

mod geglu;
mod group_norm;
mod tails;

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{bail, DType, Layout, Result, Tensor};

pub use geglu::geglu;
pub use group_norm::group_norm;
pub use tails::{finish_channels_first, finish_channels_last};

/// Conversions and the per-dtype load/store every kernel is written against.
const PRELUDE: &str = r#"
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
"#;

const MODULE: &str = "sd_rbee_fused";
const THREADS: u32 = 256;

/// The whole module's CUDA source: the prelude, then each kernel family's templates and instantiations.
pub(crate) fn source() -> String {
    [PRELUDE, group_norm::SOURCE, geglu::SOURCE, tails::SOURCE].concat()
}

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
    PTX.get_or_init(|| match candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(source()) {
        Ok(ptx) => Some(ptx.to_src()),
        Err(e) => {
            tracing::warn!("the fused CUDA kernels did not compile, using Candle's operations instead: {e:?}");
            None
        }
    })
    .as_deref()
}

/// Whether the kernels can run: turned on, and compiled.
pub fn available() -> bool {
    enabled() && ptx().is_some()
}

/// Whether the fused paths take `t`: it is on CUDA and the kernels can run.
pub fn runs_on(t: &Tensor) -> bool {
    t.device().is_cuda() && available()
}

/// What `CudaDevice::get_or_load_custom_func` takes for kernel `{family}_{dtype}` of the module: its name, the
/// module's name and its PTX.
fn kernel(family: &str, dtype: DType) -> Result<(String, &'static str, &'static str)> {
    let ptx = ptx().ok_or_else(|| candle_core::Error::Msg("the fused CUDA kernels did not compile".into()))?;
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("fused CUDA kernels take f32, f16 or bf16, not {other:?}"),
    };
    Ok((format!("{family}_{suffix}"), MODULE, ptx))
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

/// Whether the kernels take `dtype`.
fn takes(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// A launch over `rows` rows of `width` elements each: blocks of [`THREADS`] across a row (at most 4096 of
/// them; the kernels loop over the rest), one row per grid row (at most 65535; the kernels loop likewise).
fn rows_launch(rows: usize, width: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (width.div_ceil(THREADS as usize).clamp(1, 4096) as u32, rows.clamp(1, 65_535) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}
