//! What follows a layer's matrix product: its bias, and for some layers a ResNet's time shift, a residual and
//! an output scale. Written once here for every device: on CUDA one fused in-place pass over the fresh
//! product (`cuda_kernels::tails`); on the CPU in f32 the shift and the residual in one parallel pass over it
//! ([`add_on_cpu`]); elsewhere (or where those passes do not take the shapes) the separate tensor operations.
//! Always the additions diffusers makes, in its order.

use candle_core::{DType, Result, Tensor};

use super::cpu_data::{filled, with_f32_data};

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

    /// The tail as separate tensor operations over the biased output; f32 on the CPU, the shift and the
    /// residual in one parallel pass ([`add_on_cpu`]).
    pub fn apply(&self, mut y: Tensor) -> Result<Tensor> {
        match add_on_cpu(&y, self.shift, self.residual)? {
            Some(sum) => y = sum,
            None => {
                if let Some(shift) = self.shift {
                    y = y.broadcast_add(&shift.unsqueeze(2)?.unsqueeze(3)?)?;
                }
                if let Some(residual) = self.residual {
                    y = (residual + y)?;
                }
            }
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
        Some(r) => match add_on_cpu(&y, None, Some(r))? {
            Some(sum) => Ok(sum),
            None => y + r,
        },
        None => Ok(y),
    }
}

/// `(y + shift) + residual` for f32 CPU tensors, each term only when given: `residual` of `y`'s shape,
/// `shift: [B, C]` one value per channel of `y: [B, C, H, W]`. One pass on rayon's threads, where Candle's
/// broadcast add runs on one thread and each addition is a pass of its own.
/// The same additions in the same order, so the same values. `None` when it does not apply (the caller then
/// uses Candle's operations).
fn add_on_cpu(y: &Tensor, shift: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if (shift.is_none() && residual.is_none())
        || !f32_cpu(y)
        || shift.is_some_and(|s| !f32_cpu(s) || y.rank() != 4 || s.dims() != &y.dims()[..2])
        || residual.is_some_and(|r| !f32_cpu(r) || r.dims() != y.dims())
    {
        return Ok(None);
    }
    let shift = shift.map(|s| s.flatten_all()?.to_vec1::<f32>()).transpose()?;
    // Elements per channel: a shift applies to runs of this many.
    let run = match &shift {
        Some(s) => (y.elem_count() / s.len().max(1)).max(1),
        None => y.dims().last().copied().unwrap_or(1).max(1),
    };
    let sum = with_f32_data(y, |ys| {
        let pass = |rs: Option<&[f32]>| {
            filled(ys.len(), run, |row, out| {
                let (at, len) = (row * run, out.len());
                let ys = &ys[at..at + len];
                match (&shift, rs) {
                    (Some(s), Some(rs)) => {
                        let (s, rs) = (s[row], &rs[at..at + len]);
                        out.iter_mut().zip(ys).zip(rs).for_each(|((o, &y), &r)| *o = r + (y + s));
                    }
                    (Some(s), None) => out.iter_mut().zip(ys).for_each(|(o, &y)| *o = y + s[row]),
                    (None, Some(rs)) => {
                        out.iter_mut().zip(ys).zip(&rs[at..at + len]).for_each(|((o, &y), &r)| *o = r + y)
                    }
                    (None, None) => unreachable!("checked above"),
                }
            })
        };
        match residual {
            Some(r) => with_f32_data(r, |rs| pass(Some(rs))),
            None => Ok(pass(None)),
        }
    })??;
    Tensor::from_vec(sum, y.dims(), y.device()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The one-pass CPU sum gives exactly what Candle's separate operations give, for every combination of
    /// terms, large enough to run in parallel and small; a shift of the wrong shape falls back to Candle.
    #[test]
    fn the_cpu_pass_adds_exactly_as_the_separate_operations() {
        let dev = Device::Cpu;
        for dims in [(2, 3, 4, 5), (2, 8, 96, 96)] {
            let y = Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
            let shift = Tensor::randn(0f32, 1.0, (dims.0, dims.1), &dev).unwrap();
            let residual = Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
            for (shift, residual) in [(Some(&shift), None), (None, Some(&residual)), (Some(&shift), Some(&residual))] {
                let mut want = y.clone();
                if let Some(s) = shift {
                    want = want.broadcast_add(&s.unsqueeze(2).unwrap().unsqueeze(3).unwrap()).unwrap();
                }
                if let Some(r) = residual {
                    want = (r + want).unwrap();
                }
                let got = add_on_cpu(&y, shift, residual).unwrap().expect("applies");
                let (got, want) = (got.flatten_all().unwrap(), want.flatten_all().unwrap());
                assert_eq!(got.to_vec1::<f32>().unwrap(), want.to_vec1::<f32>().unwrap(), "{dims:?}");
            }
            let rows = finish_rows(y.clone(), None, Some(&residual)).unwrap();
            assert_eq!(
                rows.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                (&y + &residual).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        let y = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev).unwrap();
        let wrong = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        assert!(add_on_cpu(&y, Some(&wrong), None).unwrap().is_none());
        // A per-channel shift is a feature map's: other ranks are left to Candle's broadcasting rules.
        let (rows, shift) =
            (Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap(), Tensor::zeros((2, 3), DType::F32, &dev).unwrap());
        assert!(add_on_cpu(&rows, Some(&shift), None).unwrap().is_none());
    }
}
