//! The tail of a convolution or linear layer in one pass, in place over the layer's fresh output: its bias,
//! the ResNet's per-item time shift, a residual and diffusers' `output_scale_factor`, added (and divided)
//! in the order Candle's separate operations would do them, so f32 results are bit-identical to those.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, WithDType};
use half::{bf16, f16};

use super::{available, contiguous_start, kernel, launch_error, rows_launch, takes};

pub(super) const SOURCE: &str = r#"
// Channels-first y: planes p = item * channels + c of `inner` elements each.
// terms = [bias (channels, when has_bias) | shift (shift_items x channels, when shift_items > 0)].
template <class D>
__device__ void tail_planes(typename D::T *y, const typename D::T *terms, int has_bias, int shift_items,
                            const typename D::T *res, int has_res, long planes, int channels, long inner,
                            float scale) {
    for (long p = blockIdx.y; p < planes; p += gridDim.y) {
        long item = p / channels;
        int c = (int)(p - item * channels);
        float bias = has_bias ? D::ld(terms, c) : 0.f;
        long shift_at = (has_bias ? channels : 0) + (shift_items > 0 ? (item % shift_items) * channels + c : 0);
        float shift = shift_items > 0 ? D::ld(terms, shift_at) : 0.f;
        long base = p * inner;
        for (long j = blockIdx.x * (long)blockDim.x + threadIdx.x; j < inner; j += (long)gridDim.x * blockDim.x) {
            float v = D::ld(y, base + j);
            if (has_bias) v += bias;
            if (shift_items > 0) v += shift;
            if (has_res) v += D::ld(res, base + j);
            if (scale != 1.f) v = v * scale;  // as Candle divides by a scalar: times its reciprocal
            D::st(y, base + j, v);
        }
    }
}

// Channels-last y: rows of `channels` elements; terms = bias (channels, when has_bias).
template <class D>
__device__ void tail_rows(typename D::T *y, const typename D::T *terms, int has_bias, const typename D::T *res,
                          int has_res, long rows, int channels) {
    for (long r = blockIdx.y; r < rows; r += gridDim.y) {
        long base = r * channels;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < channels; c += gridDim.x * blockDim.x) {
            float v = D::ld(y, base + c);
            if (has_bias) v += D::ld(terms, c);
            if (has_res) v += D::ld(res, base + c);
            D::st(y, base + c, v);
        }
    }
}

#define TAILS(D, name)                                                                                        \
extern "C" __global__ void tail_planes_##name(D::T *y, const D::T *terms, int has_bias, int shift_items,      \
        const D::T *res, int has_res, long planes, int channels, long inner, float scale) {                   \
    tail_planes<D>(y, terms, has_bias, shift_items, res, has_res, planes, channels, inner, scale);            \
}                                                                                                             \
extern "C" __global__ void tail_rows_##name(D::T *y, const D::T *terms, int has_bias, const D::T *res,         \
        int has_res, long rows, int channels) {                                                               \
    tail_rows<D>(y, terms, has_bias, res, has_res, rows, channels);                                           \
}
TAILS(F32, f32)
TAILS(F16, f16)
TAILS(BF16, bf16)
"#;

/// Where the channels are, with what the tail adds.
#[derive(Clone, Copy)]
enum Shape {
    /// `[B, C, ...]`: `shift_items` rows of per-item shifts follow the bias in the terms.
    ChannelsFirst { shift_items: usize, scale: f32 },
    /// `[..., C]`.
    ChannelsLast,
}

struct TailOp {
    shape: Shape,
    has_bias: bool,
}

impl TailOp {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        y: &mut CudaStorage,
        y_l: &Layout,
        (terms, terms_l): (&CudaStorage, &Layout),
        residual: Option<(&CudaStorage, &Layout)>,
    ) -> Result<()> {
        let dev = y.device.clone();
        let y_start = contiguous_start(y_l, "the output")?;
        let terms = terms.as_cuda_slice::<T>()?.slice(contiguous_start(terms_l, "the bias")?..);
        let residual = match residual {
            Some((r, r_l)) => Some(r.as_cuda_slice::<T>()?.slice(contiguous_start(r_l, "the residual")?..)),
            None => None,
        };
        let has_res = i32::from(residual.is_some());
        // Without a residual the kernel never reads that operand: the terms stand in for it.
        let res = residual.as_ref().unwrap_or(&terms);
        let has_bias = i32::from(self.has_bias);
        let dims = y_l.dims();
        let mut y = y.as_cuda_slice_mut::<T>()?.slice_mut(y_start..);
        match self.shape {
            Shape::ChannelsFirst { shift_items, scale } => {
                let (planes, channels) = (dims[0] * dims[1], dims[1]);
                let inner = dims[2..].iter().product::<usize>();
                let (name, module, ptx) = kernel("tail_planes", T::DTYPE)?;
                let func = dev.get_or_load_custom_func(&name, module, ptx)?;
                let (planes_i, channels_i, inner_i, items) =
                    (planes as i64, channels as i32, inner as i64, shift_items as i32);
                let mut builder = func.builder();
                builder.arg(&mut y).arg(&terms).arg(&has_bias).arg(&items).arg(res).arg(&has_res);
                builder.arg(&planes_i).arg(&channels_i).arg(&inner_i).arg(&scale);
                unsafe { builder.launch(rows_launch(planes, inner)) }.map(drop).map_err(launch_error)
            }
            Shape::ChannelsLast => {
                let channels = dims[dims.len() - 1];
                let rows = y_l.shape().elem_count() / channels;
                let (name, module, ptx) = kernel("tail_rows", T::DTYPE)?;
                let func = dev.get_or_load_custom_func(&name, module, ptx)?;
                let (rows_i, channels_i) = (rows as i64, channels as i32);
                let mut builder = func.builder();
                builder.arg(&mut y).arg(&terms).arg(&has_bias).arg(res).arg(&has_res);
                builder.arg(&rows_i).arg(&channels_i);
                unsafe { builder.launch(rows_launch(rows, channels)) }.map(drop).map_err(launch_error)
            }
        }
    }

    fn dispatch(
        &self,
        y: &mut CudaStorage,
        y_l: &Layout,
        terms: (&CudaStorage, &Layout),
        residual: Option<(&CudaStorage, &Layout)>,
    ) -> Result<()> {
        match y.dtype() {
            DType::F32 => self.run::<f32>(y, y_l, terms, residual),
            DType::F16 => self.run::<f16>(y, y_l, terms, residual),
            DType::BF16 => self.run::<bf16>(y, y_l, terms, residual),
            other => bail!("cuda-layer-tail takes f32, f16 or bf16, not {other:?}"),
        }
    }
}

/// CUDA only: the callers check the device before building the op.
fn cpu_unsupported() -> Result<()> {
    bail!("cuda-layer-tail runs on CUDA only")
}

impl InplaceOp2 for TailOp {
    fn name(&self) -> &'static str {
        "cuda-layer-tail"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        cpu_unsupported()
    }

    fn cuda_fwd(&self, y: &mut CudaStorage, y_l: &Layout, terms: &CudaStorage, terms_l: &Layout) -> Result<()> {
        self.dispatch(y, y_l, (terms, terms_l), None)
    }
}

impl InplaceOp3 for TailOp {
    fn name(&self) -> &'static str {
        "cuda-layer-tail"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        cpu_unsupported()
    }

    fn cuda_fwd(
        &self,
        y: &mut CudaStorage,
        y_l: &Layout,
        terms: &CudaStorage,
        terms_l: &Layout,
        residual: &CudaStorage,
        residual_l: &Layout,
    ) -> Result<()> {
        self.dispatch(y, y_l, (terms, terms_l), Some((residual, residual_l)))
    }
}

/// Whether `t` can join a tail over `y`: same device and dtype, and `len` elements.
fn fits(t: &Tensor, y: &Tensor, len: usize) -> bool {
    t.dtype() == y.dtype() && t.device().same_device(y.device()) && t.elem_count() == len
}

/// Runs the tail over `y` with the bias and shift gathered into one operand.
fn apply(y: &Tensor, op: TailOp, terms: Vec<Tensor>, residual: Option<&Tensor>) -> Result<bool> {
    let terms = match terms.len() {
        0 => Tensor::zeros(1, y.dtype(), y.device())?,
        1 => terms[0].contiguous()?,
        _ => Tensor::cat(&terms, 0)?,
    };
    match residual {
        Some(r) => y.inplace_op3(&terms, &r.contiguous()?, &op)?,
        None => y.inplace_op2(&terms, &op)?,
    }
    Ok(true)
}

/// For a fresh contiguous channels-first `y: [B, C, ...]` on CUDA that nothing else holds (a layer's product just
/// made): `y = (((y + bias[c]) + shift[b, c]) + residual) / divisor` in place, each term only when given
/// (`bias: [C]`, `shift: [B, C]` or `[1, C]`, `residual` of y's shape). `false` where the kernel does not
/// apply; `y` is then untouched.
pub fn finish_channels_first(
    y: &Tensor,
    bias: Option<&Tensor>,
    shift: Option<&Tensor>,
    residual: Option<&Tensor>,
    divisor: f64,
) -> Result<bool> {
    let dims = y.dims();
    if !y.device().is_cuda()
        || !available()
        || dims.len() < 2
        || y.elem_count() == 0
        || !y.is_contiguous()
        || !takes(y.dtype())
    {
        return Ok(false);
    }
    let (items, channels) = (dims[0], dims[1]);
    let shift_items = match shift.map(|s| s.dims()) {
        None => 0,
        Some(&[n, c]) if c == channels && (n == 1 || n == items) => n,
        Some(_) => return Ok(false),
    };
    if channels > i32::MAX as usize
        || bias.is_some_and(|b| !fits(b, y, channels))
        || shift.is_some_and(|s| !fits(s, y, shift_items * channels))
        || residual.is_some_and(|r| r.dims() != y.dims() || !fits(r, y, y.elem_count()))
    {
        return Ok(false);
    }
    if bias.is_none() && shift.is_none() && residual.is_none() && divisor == 1.0 {
        return Ok(true); // nothing to add: no pass over y
    }
    let terms = bias.iter().chain(shift.iter()).map(|t| t.flatten_all()).collect::<Result<Vec<_>>>()?;
    // `y / d` in Candle is `y * (1 / d)` (an affine op), rounded to f32 once: the same here.
    let shape = Shape::ChannelsFirst { shift_items, scale: (1.0 / divisor) as f32 };
    apply(y, TailOp { shape, has_bias: bias.is_some() }, terms, residual)
}

/// For a fresh contiguous channels-last `y: [..., C]` on CUDA that nothing else holds: `y = (y + bias[c]) + residual`
/// in place, each term only when given. `false` where the kernel does not apply; `y` is then untouched.
pub fn finish_channels_last(y: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<bool> {
    let channels = y.dims().last().copied().unwrap_or(0);
    if !y.device().is_cuda()
        || !available()
        || channels == 0
        || channels > i32::MAX as usize
        || y.elem_count() == 0
        || !y.is_contiguous()
        || !takes(y.dtype())
        || bias.is_some_and(|b| !fits(b, y, channels))
        || residual.is_some_and(|r| r.dims() != y.dims() || !fits(r, y, y.elem_count()))
    {
        return Ok(false);
    }
    if bias.is_none() && residual.is_none() {
        return Ok(true); // a bias-free projection (attention's q, k, v): no pass over y
    }
    let terms = bias.iter().map(|b| b.flatten_all()).collect::<Result<Vec<_>>>()?;
    apply(y, TailOp { shape: Shape::ChannelsLast, has_bias: bias.is_some() }, terms, residual)
}
