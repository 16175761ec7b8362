//! The linear layer's kernel: Candle's `Linear`, except that f32 CPU inputs run as one multiply over all
//! their rows (on the vendor BLAS when one is loaded, `SD_RBEE_BLAS`, else on `gemm`; see [`super::blas`]),
//! with the bias written first and the product accumulated onto it (no separate bias pass).
//!
//! Candle multiplies a `[B, T, in]` input as B separate products, each a `gemm` call with its own set-up: for
//! the small token counts of a batch of small images (B = 8 rows of 64 tokens) that cost as much as the
//! arithmetic, and the linear layers took 4.8× the time for 4× the images.

use candle_core::{DType, Module, Result, Tensor};

use super::adapt::Weighted;
use super::blas::{self, Dims, Operand, Output, Update};
use super::cpu_data::{filled, with_f32_data};
use super::layer_tail::finish_rows;
use super::token_projection::Dense;

#[derive(Debug, Clone)]
pub struct LinearKernel(candle_nn::Linear);

impl LinearKernel {
    pub fn new(linear: candle_nn::Linear) -> Self {
        Self(linear)
    }

    /// Runs `f` on the weight and bias as a dense layer when they are f32 on the CPU; `None` otherwise.
    pub fn with_dense<R>(&self, f: impl FnOnce(Dense) -> Result<R>) -> Result<Option<R>> {
        let w = self.0.weight();
        if !w.device().is_cpu() || w.dtype() != DType::F32 {
            return Ok(None);
        }
        let (c_out, c_in) = w.dims2()?;
        let bias = self.0.bias().map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
        with_f32_data(w, |weight| f(Dense { weight, bias: bias.as_deref(), c_out, c_in }).map(Some))?
    }

    /// `x · wᵀ + bias` as one multiply, for `x: [..., in]`; `None` when it does not apply.
    fn forward_cpu(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let w = self.0.weight();
        if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
            return Ok(None);
        }
        let (out_dim, in_dim) = w.dims2()?;
        let dims = x.dims();
        if dims.last() != Some(&in_dim) {
            return Ok(None); // Candle's path reports the mismatch.
        }
        let rows = dims[..dims.len() - 1].iter().product::<usize>();
        let bias = self.0.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
        let mut out = filled(rows * out_dim, out_dim, |_, row| {
            if let Some(bias) = &bias {
                row.copy_from_slice(bias);
            }
        });
        with_f32_data(x, |x| {
            with_f32_data(w, |w| {
                let (x, w) = (Operand::rows(x, in_dim), Operand::transposed(w, in_dim));
                let dims = Dims { m: rows, n: out_dim, k: in_dim };
                let threads = candle_core::utils::get_num_threads();
                blas::matmul(dims, x, w, Output::rows(&mut out, out_dim), Update::ADD, threads)
            })
        })??;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("x has a last dimension") = out_dim;
        Tensor::from_vec(out, shape, x.device()).map(Some)
    }
}

impl LinearKernel {
    /// `x · wᵀ`, without the bias, as Candle's `Linear` multiplies.
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::Linear::new(self.0.weight().clone(), None).forward(x)
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.0.bias()
    }

    /// `forward(x) + residual`; on CUDA the bias and the residual are one pass over the product.
    pub fn forward_plus(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if super::cuda_kernels::runs_on(x) {
            let _profile = super::profile::scope("linear");
            return finish_rows(self.product(x)?, self.bias(), residual);
        }
        finish_rows(self.forward(x)?, None, residual)
    }
}

impl Module for LinearKernel {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if super::cuda_kernels::runs_on(x) {
            return self.forward_plus(x, None);
        }
        let _profile = super::profile::scope("linear");
        match self.forward_cpu(x)? {
            Some(y) => Ok(y),
            None => self.0.forward(x),
        }
    }
}

impl super::adapt::Linear {
    /// [`LinearKernel::forward_plus`] on the layer `forward` uses now.
    pub fn forward_plus(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        self.with_current(|kernel| kernel.forward_plus(x, residual))
    }
}

impl Weighted for LinearKernel {
    fn weight(&self) -> Result<Tensor> {
        Weighted::weight(&self.0)
    }
    fn weight_dims(&self) -> Vec<usize> {
        Weighted::weight_dims(&self.0)
    }
    fn with_weight(&self, weight: Tensor) -> Result<Self> {
        self.0.with_weight(weight).map(Self)
    }
}
