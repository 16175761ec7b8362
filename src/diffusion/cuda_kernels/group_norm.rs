//! GroupNorm (then SiLU when asked) in two passes: per-slice Welford statistics, then the normalisation.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};

use super::{available, contiguous_start, kernel, launch_error, takes, THREADS};

pub(super) const SOURCE: &str = r#"
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
// y = (x - mean) * rstd * weight[c] + bias[c], then SiLU when asked. Each thread finds its channel once and
// then steps it along (no 64-bit division per element).
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
    long i = start + threadIdx.x;
    if (i >= end) return;
    int c = first_channel + (int)(i / hw);
    long j = i % hw;
    float scale = rstd * D::ld(weight, c), shift = D::ld(bias, c);
    for (; i < end; i += THREADS, j += THREADS) {
        while (j >= hw) {
            j -= hw;
            c += 1;
            scale = rstd * D::ld(weight, c);
            shift = D::ld(bias, c);
        }
        float v = (D::ld(x, base + i) - mean) * scale + shift;
        if (silu) v = v / (1.f + expf(-v));
        D::st(y, base + i, v);
    }
}

#define GROUP_NORM(D, name)                                                                                   \
extern "C" __global__ void gn_stats_##name(const D::T *x, float *partial, long group_len, int splits) {      \
    gn_stats<D>(x, partial, group_len, splits);                                                               \
}                                                                                                             \
extern "C" __global__ void gn_apply_##name(const D::T *x, const D::T *w, const D::T *b, const float *partial, \
        D::T *y, long group_len, int splits, long hw, int cpg, int groups, float eps, int silu) {            \
    gn_apply<D>(x, w, b, partial, y, group_len, splits, hw, cpg, groups, eps, silu);                          \
}
GROUP_NORM(F32, f32)
GROUP_NORM(F16, f16)
GROUP_NORM(BF16, bf16)
"#;

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
        // SAFETY: every partial is written by the stats pass before the apply pass reads it.
        let partial = unsafe { dev.alloc::<f32>(batch_groups * splits * 3)? };
        let out = unsafe { dev.alloc::<T>(x_l.shape().elem_count())? };
        let grid = LaunchConfig {
            grid_dim: (batch_groups as u32, splits as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (group_len, splits_i, hw) = (group_len as i64, splits as i32, hw as i64);
        let (name, module, ptx) = kernel("gn_stats", T::DTYPE)?;
        let stats = dev.get_or_load_custom_func(&name, module, ptx)?;
        let mut builder = stats.builder();
        builder.arg(&x).arg(&partial).arg(&group_len).arg(&splits_i);
        unsafe { builder.launch(grid) }.map_err(launch_error)?;
        let (name, module, ptx) = kernel("gn_apply", T::DTYPE)?;
        let apply = dev.get_or_load_custom_func(&name, module, ptx)?;
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
        || !takes(x.dtype())
    {
        return Ok(None);
    }
    let op = GroupNormOp { groups, eps: eps as f32, silu };
    Ok(Some(x.contiguous()?.apply_op3_no_bwd(weight, bias, &op)?))
}
