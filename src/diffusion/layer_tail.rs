//! What follows a layer's matrix product: its bias, and for some layers a ResNet's time shift, a residual and
//! an output scale. Written once here for every device: on CUDA one fused in-place pass over the fresh
//! product (`cuda_kernels::tails`), elsewhere (or where that pass does not take the shapes) the separate
//! tensor operations, in the order diffusers does them.

use candle_core::{Result, Tensor};

/// What a ResNet adds to a convolution's output after its bias, in diffusers' order: the per-item time
/// shift `shift: [B, C]` (`TimeInjection::Add`), then a `residual` of the output's shape, then the division
/// by `divisor` (`output_scale_factor`).
#[derive(Clone, Copy, Debug)]
pub struct ConvTail<'a> {
    pub shift: Option<&'a Tensor>,
    pub residual: Option<&'a Tensor>,
    pub divisor: f64,
}

impl ConvTail<'_> {
    pub const NONE: ConvTail<'static> = ConvTail { shift: None, residual: None, divisor: 1.0 };

    /// The tail as separate tensor operations over the biased output.
    pub fn apply(&self, mut y: Tensor) -> Result<Tensor> {
        if let Some(shift) = self.shift {
            y = y.broadcast_add(&shift.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        if let Some(residual) = self.residual {
            y = (residual + y)?;
        }
        if self.divisor != 1.0 {
            y = (y / self.divisor)?;
        }
        Ok(y)
    }

    /// `bias` (per channel) and the tail over a fresh channels-first product `y: [B, C, H, W]`.
    pub fn finish(&self, y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if super::cuda_kernels::finish_channels_first(&y, bias, self.shift, self.residual, self.divisor)? {
            return Ok(y);
        }
        let y = match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?,
            None => y,
        };
        self.apply(y)
    }
}

/// `(y + bias) + residual` over a fresh channels-last product `y: [..., C]`, each term only when given.
pub fn finish_rows(y: Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda_kernels::finish_channels_last(&y, bias, residual)? {
        return Ok(y);
    }
    let y = match bias {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    };
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}
