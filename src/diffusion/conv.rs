//! 2-D convolution. On the CPU in f32, stride-1 3×3 (padding 1) and 1×1 convolutions — nearly all of a
//! Stable Diffusion UNet's and VAE's — run as direct matrix multiplies on the padded input: a 3×3 kernel is
//! nine shifted multiplies accumulated into one output, with the bias as the starting value. There is no
//! im2col buffer (nine times the input) and no separate bias pass. Everything else (strided downsampling,
//! other devices and dtypes) uses Candle's convolution.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use gemm::Parallelism;

use super::cpu_data::with_f32_data;

/// Multiplies smaller than this many multiply-adds run on one thread.
const PARALLEL_WORK: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct CpuConv {
    /// Kernel taps, each `[c_out, c_in]` row-major: `taps[t][o * c_in + i] = w[o, i, t / k, t % k]`.
    taps: Vec<Vec<f32>>,
    bias: Vec<f32>,
    c_in: usize,
    c_out: usize,
    kernel: usize,
}

impl CpuConv {
    fn new(weight: &Tensor, bias: Option<&Tensor>, kernel: usize) -> Result<Self> {
        let (c_out, c_in, _, _) = weight.dims4()?;
        let w: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let taps =
            (0..kernel * kernel).map(|t| (0..c_out * c_in).map(|oi| w[oi * kernel * kernel + t]).collect()).collect();
        let bias = match bias {
            Some(b) => b.to_dtype(DType::F32)?.to_vec1()?,
            None => vec![0.0; c_out],
        };
        Ok(Self { taps, bias, c_in, c_out, kernel })
    }

    /// `dst[c_out, n] += tap[c_out, c_in] · src[c_in, n]` where `src` rows are `src_row` apart.
    fn accumulate(&self, tap: &[f32], src: &[f32], src_row: usize, dst: &mut [f32], n: usize) {
        let work = self.c_out * self.c_in * n;
        let parallelism = match candle_core::utils::get_num_threads() {
            t if t > 1 && work >= PARALLEL_WORK => Parallelism::Rayon(t),
            _ => Parallelism::None,
        };
        debug_assert!(src.len() >= (self.c_in - 1) * src_row + n && dst.len() >= self.c_out * n);
        // SAFETY: tap is [c_out, c_in] row-major, src holds c_in rows of n values `src_row` apart, dst is
        // [c_out, n] row-major; the debug assertion above checks the extents.
        unsafe {
            gemm::gemm(
                self.c_out,
                n,
                self.c_in,
                dst.as_mut_ptr(),
                1,
                n as isize,
                true,
                tap.as_ptr(),
                1,
                self.c_in as isize,
                src.as_ptr(),
                1,
                src_row as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }

    fn forward(&self, x: &[f32], batch: usize, h: usize, w: usize) -> Vec<f32> {
        let (ci, co) = (self.c_in, self.c_out);
        let mut out = vec![0f32; batch * co * h * w];
        for (b, out_b) in out.chunks_mut(co * h * w).enumerate() {
            let x_b = &x[b * ci * h * w..(b + 1) * ci * h * w];
            if self.kernel == 1 {
                for (row, &bias) in out_b.chunks_mut(h * w).zip(&self.bias) {
                    row.fill(bias);
                }
                self.accumulate(&self.taps[0], x_b, h * w, out_b, h * w);
                continue;
            }
            // 3×3, padding 1: pad each channel to (h+2)×(w+2) (plus two spare zeros so the last shifted
            // view stays in bounds), compute the output on rows of width w+2, then drop the 2 extra columns.
            let (hp, wp) = (h + 2, w + 2);
            let plane = hp * wp + 2;
            let mut padded = vec![0f32; ci * plane];
            for (c, p) in padded.chunks_mut(plane).enumerate() {
                for y in 0..h {
                    let src = &x_b[(c * h + y) * w..(c * h + y + 1) * w];
                    p[(y + 1) * wp + 1..(y + 1) * wp + 1 + w].copy_from_slice(src);
                }
            }
            let n = h * wp;
            let mut wide = vec![0f32; co * n];
            for (row, &bias) in wide.chunks_mut(n).zip(&self.bias) {
                row.fill(bias);
            }
            for (t, tap) in self.taps.iter().enumerate() {
                let offset = (t / 3) * wp + t % 3;
                self.accumulate(tap, &padded[offset..], plane, &mut wide, n);
            }
            for (o, dst) in out_b.chunks_mut(h * w).enumerate() {
                for y in 0..h {
                    dst[y * w..(y + 1) * w].copy_from_slice(&wide[o * n + y * wp..o * n + y * wp + w]);
                }
            }
        }
        out
    }
}

/// A convolution layer (`weight`, optional `bias`), as `torch.nn.Conv2d`: the direct CPU kernel when it
/// applies (holding the only copy of the weights), else Candle's.
#[derive(Debug, Clone)]
pub enum Conv2d {
    Direct(CpuConv),
    Candle(candle_nn::Conv2d),
}

/// Loads `weight` `[c_out, c_in, k, k]` and `bias` `[c_out]`.
pub fn conv2d(c_in: usize, c_out: usize, kernel: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    let composite = candle_nn::conv2d(c_in, c_out, kernel, cfg, vb)?;
    let direct =
        matches!((kernel, cfg.padding), (3, 1) | (1, 0)) && cfg.stride == 1 && cfg.dilation == 1 && cfg.groups == 1;
    if direct && composite.weight().device().is_cpu() && composite.weight().dtype() == DType::F32 {
        Ok(Conv2d::Direct(CpuConv::new(composite.weight(), composite.bias(), kernel)?))
    } else {
        Ok(Conv2d::Candle(composite))
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Conv2d::Direct(conv) => {
                let (b, c, h, w) = x.dims4()?;
                if c != conv.c_in {
                    candle_core::bail!("conv2d: input has {c} channels, the layer expects {}", conv.c_in);
                }
                let out = with_f32_data(x, |data| conv.forward(data, b, h, w))?;
                Tensor::from_vec(out, (b, conv.c_out, h, w), x.device())
            }
            Conv2d::Candle(conv) => conv.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn direct_convolution_matches_candle() {
        let dev = Device::Cpu;
        for (kernel, padding, c_in, c_out, h, w) in [(3, 1, 3, 5, 4, 6), (3, 1, 64, 32, 17, 9), (1, 0, 8, 16, 5, 7)] {
            let weight = Tensor::randn(0f32, 1.0, (c_out, c_in, kernel, kernel), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, c_out, &dev).unwrap();
            let cfg = Conv2dConfig { padding, ..Default::default() };
            let reference = candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), cfg);
            let direct = Conv2d::Direct(CpuConv::new(&weight, Some(&bias), kernel).unwrap());
            let x = Tensor::randn(0f32, 1.0, (2, c_in, h, w), &dev).unwrap();
            let want = reference.forward(&x).unwrap();
            let got = direct.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "k{kernel} {c_in}->{c_out} {h}x{w}: {d}");
        }
    }
}
