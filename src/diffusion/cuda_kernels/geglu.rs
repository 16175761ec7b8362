//! GEGLU's gate, `h * gelu(gate)` with the exact (erf) GELU, over the projection's product with its bias
//! added on the way in (so the projection itself runs as a bare matrix product).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};

use super::{available, contiguous_start, kernel, launch_error, rows_launch, takes};

pub(super) const SOURCE: &str = r#"
// Rows of `projected` are [h | gate] (2 * inner wide); y = (h + bias_h) * gelu(gate + bias_gate).
template <class D>
__device__ void geglu(const typename D::T *projected, const typename D::T *bias, int has_bias, typename D::T *y,
                      long rows, int inner) {
    for (long r = blockIdx.y; r < rows; r += gridDim.y) {
        const typename D::T *row = projected + r * 2 * (long)inner;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < inner; c += gridDim.x * blockDim.x) {
            float h = D::ld(row, c);
            float g = D::ld(row, inner + c);
            if (has_bias) {
                h += D::ld(bias, c);
                g += D::ld(bias, inner + c);
            }
            D::st(y, r * (long)inner + c, h * 0.5f * g * (1.f + erff(g * 0.70710678118654752f)));
        }
    }
}

#define GEGLU(D, name)                                                                                        \
extern "C" __global__ void geglu_##name(const D::T *p, const D::T *bias, int has_bias, D::T *y, long rows,    \
        int inner) {                                                                                          \
    geglu<D>(p, bias, has_bias, y, rows, inner);                                                              \
}
GEGLU(F32, f32)
GEGLU(F16, f16)
GEGLU(BF16, bf16)
"#;

struct GegluOp {
    has_bias: bool,
}

impl GegluOp {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        (p, p_l): (&CudaStorage, &Layout),
        (bias, bias_l): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dims = p_l.dims();
        let inner = dims[dims.len() - 1] / 2;
        let rows = p_l.shape().elem_count() / (2 * inner);
        let p = p.as_cuda_slice::<T>()?.slice(contiguous_start(p_l, "the projection")?..);
        let bias = bias.as_cuda_slice::<T>()?.slice(contiguous_start(bias_l, "the bias")?..);
        // SAFETY: the kernel writes every output element.
        let out = unsafe { dev.alloc::<T>(rows * inner)? };
        let (name, module, ptx) = kernel("geglu", T::DTYPE)?;
        let func = dev.get_or_load_custom_func(&name, module, ptx)?;
        let (rows_i, inner_i, has_bias) = (rows as i64, inner as i32, i32::from(self.has_bias));
        let mut builder = func.builder();
        builder.arg(&p).arg(&bias).arg(&has_bias).arg(&out).arg(&rows_i).arg(&inner_i);
        unsafe { builder.launch(rows_launch(rows, inner)) }.map_err(launch_error)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl candle_core::CustomOp2 for GegluOp {
    fn name(&self) -> &'static str {
        "cuda-geglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("cuda-geglu runs on CUDA only")
    }

    fn cuda_fwd(&self, p: &CudaStorage, p_l: &Layout, b: &CudaStorage, b_l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = p.device().clone();
        let out = match p.dtype() {
            DType::F32 => self.run::<f32>(&dev, (p, p_l), (b, b_l))?,
            DType::F16 => self.run::<f16>(&dev, (p, p_l), (b, b_l))?,
            DType::BF16 => self.run::<bf16>(&dev, (p, p_l), (b, b_l))?,
            other => bail!("cuda-geglu takes f32, f16 or bf16, not {other:?}"),
        };
        let mut dims = p_l.dims().to_vec();
        *dims.last_mut().expect("checked: at least one dimension") /= 2;
        Ok((out, Shape::from(dims)))
    }
}

/// `(h + bias_h) * gelu_erf(gate + bias_gate)` for `projected = [..., h | gate]` (a projection's product
/// without its bias) and that projection's `bias` (`[2 · inner]`, or none) on CUDA; `None` elsewhere.
pub fn geglu(projected: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let width = projected.dims().last().copied().unwrap_or(0);
    if !projected.device().is_cuda()
        || !available()
        || width == 0
        || width % 2 != 0
        || width / 2 > i32::MAX as usize
        || projected.elem_count() == 0
        || !takes(projected.dtype())
        || bias.is_some_and(|b| b.dtype() != projected.dtype() || b.elem_count() != width)
    {
        return Ok(None);
    }
    let op = GegluOp { has_bias: bias.is_some() };
    let projected = projected.contiguous()?;
    // Without a bias the kernel never reads that operand: the projection stands in for it.
    let bias = match bias {
        Some(b) => b.contiguous()?,
        None => projected.clone(),
    };
    Ok(Some(projected.apply_op2_no_bwd(&bias, &op)?))
}
