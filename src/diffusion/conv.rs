//! 2-D convolution. On the CPU in f32, stride-1 3×3 (padding 1) and 1×1 convolutions — nearly all of a
//! Stable Diffusion UNet's and VAE's — run as direct matrix multiplies on the padded input: the input is laid
//! out once as three column-shifted copies, and each kernel row is then one multiply over those copies at a
//! row offset, accumulated into one output that starts as the bias. That needs a third of im2col's buffer
//! (3× the input instead of 9×) and no separate bias pass. 3×3 layers on images large enough for it run by
//! Winograd's F(2×2, 3×3) instead ([`super::winograd`]: 2.25× fewer multiply-adds). Everything else
//! (strided downsampling, other devices and dtypes) uses Candle's convolution.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use super::adapt::{Adaptable, Weighted};
use super::blas::{self, Dims, Operand, Output, Update};
use super::cpu_data::{filled, with_f32_data};
use super::layer_tail::ConvTail;
use super::token_projection::Dense;
use super::winograd;

/// Images with fewer pixels than this are convolved several items to a multiply (see [`CpuConv::forward`]).
const FOLD_BELOW_PIXELS: usize = 32 * 32;

/// A batch of small images whose multiplies are smaller than this (multiply-adds per kernel row) is cut into
/// one group per thread; larger multiplies, as the full-size UNets' lowest levels (1280 channels), thread
/// well by themselves, over every core. (On a many-core host a small batch of small layers thus uses as
/// many threads as it has groups: those layers are too small to spread further with any gain.)
const GROUP_BELOW_WORK: usize = 1 << 24;

#[derive(Debug, Clone)]
pub struct CpuConv {
    /// One matrix per kernel row, `[c_out, c_in * k]` row-major: `rows[ky][o * c_in * k + i * k + kx] =
    /// w[o, i, ky, kx]` (for 1×1 the single row is the plain `[c_out, c_in]` weight).
    rows: Vec<Vec<f32>>,
    bias: Vec<f32>,
    c_in: usize,
    c_out: usize,
    kernel: usize,
}

impl CpuConv {
    fn new(weight: &Tensor, bias: Option<&Tensor>, kernel: usize) -> Result<Self> {
        let (c_out, c_in, _, _) = weight.dims4()?;
        let w: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let rows = (0..kernel)
            .map(|ky| {
                let mut m = Vec::with_capacity(c_out * c_in * kernel);
                for o in 0..c_out {
                    for i in 0..c_in {
                        for kx in 0..kernel {
                            m.push(w[((o * c_in + i) * kernel + ky) * kernel + kx]);
                        }
                    }
                }
                m
            })
            .collect();
        let bias = match bias {
            Some(b) => b.to_dtype(DType::F32)?.to_vec1()?,
            None => vec![0.0; c_out],
        };
        Ok(Self { rows, bias, c_in, c_out, kernel })
    }

    /// `dst[c_out, n] += lhs[c_out, depth] · src[depth, n]` (depth: `lhs`'s width), on up to `threads` threads.
    fn accumulate(&self, lhs: &[f32], src: Operand, dst: Output, n: usize, threads: usize) {
        let depth = lhs.len() / self.c_out;
        let dims = Dims { m: self.c_out, n, k: depth };
        blas::matmul(dims, Operand::rows(lhs, depth), src, dst, Update::ADD, threads);
    }

    /// 3×3 layers that [`winograd::applies`] to (enough tiles and channels) run by Winograd's algorithm.
    /// Otherwise, small images (below [`FOLD_BELOW_PIXELS`]) go through in one multiply per kernel row for a whole
    /// group of items, side by side along the multiply's columns. A batch of them with small multiplies
    /// ([`GROUP_BELOW_WORK`]) is cut into one group per thread, each convolved on its own thread: one
    /// hand-off to the threads per layer. Threading each small multiply instead handed off once per kernel
    /// row and left the copies around the multiplies to one thread: the tiny UNet's batch of 8 left the
    /// second core idle a third of the time and took 17 % longer. Larger images go item by item, each
    /// multiply on every thread, where folding items together costs more in copies than the larger multiply
    /// gains (12 % on the full-size SD 1.5 UNet at 512 px).
    fn forward(&self, x: &[f32], batch: usize, h: usize, w: usize) -> Vec<f32> {
        self.forward_on(x, batch, h, w, candle_core::utils::get_num_threads())
    }

    /// [`Self::forward`] on up to `threads` threads.
    fn forward_on(&self, x: &[f32], batch: usize, h: usize, w: usize, threads: usize) -> Vec<f32> {
        if h * w == 0 {
            return Vec::new();
        }
        if self.kernel == 3 && winograd::applies(self.c_in, self.c_out, h, w) {
            let layer = winograd::Layer { rows: &self.rows, bias: &self.bias, c_in: self.c_in, c_out: self.c_out };
            return winograd::convolve(&layer, x, batch, h, w, threads);
        }
        let (per_in, per_out) = (self.c_in * h * w, self.c_out * h * w);
        let mut out = self.biased(batch, h * w);
        if h * w >= FOLD_BELOW_PIXELS {
            for (item, dst) in x.chunks(per_in).zip(out.chunks_mut(per_out)) {
                self.forward_together(item, 1, h, w, threads, dst);
            }
            return out;
        }
        // Multiply-adds of the whole batch's multiply for one kernel row (3×3: with the padding rows).
        let rows = if self.kernel == 1 { h } else { h + 2 };
        let work = self.c_out * self.c_in * self.kernel * batch * rows * w;
        let groups = threads.min(batch);
        if groups <= 1 || work >= GROUP_BELOW_WORK {
            self.forward_together(x, batch, h, w, threads, &mut out);
            return out;
        }
        let per_group = batch.div_ceil(groups);
        out.par_chunks_mut(per_group * per_out).zip(x.par_chunks(per_group * per_in)).for_each(|(dst, src)| {
            self.forward_together(src, src.len() / per_in, h, w, 1, dst);
        });
        out
    }

    /// `copies` × `[c_out, width]` rows, each set to its bias.
    fn biased(&self, copies: usize, width: usize) -> Vec<f32> {
        filled(copies * self.c_out * width, width, |row, out| out.fill(self.bias[row % self.c_out]))
    }

    /// Convolves `batch` items of `x` in one multiply per kernel row into `out` (`[batch, c_out, h, w]`),
    /// which holds the bias on entry ([`Self::biased`]).
    fn forward_together(&self, x: &[f32], batch: usize, h: usize, w: usize, threads: usize, out: &mut [f32]) {
        let (ci, co, hw) = (self.c_in, self.c_out, h * w);
        if self.kernel == 1 {
            // Channel-major across the batch: row i holds channel i of every item (one item: as it is).
            let n = batch * hw;
            let mut gathered = Vec::new();
            let src: &[f32] = if batch == 1 {
                x
            } else {
                gathered.resize(ci * n, 0f32);
                for b in 0..batch {
                    for i in 0..ci {
                        gathered[i * n + b * hw..i * n + (b + 1) * hw]
                            .copy_from_slice(&x[(b * ci + i) * hw..(b * ci + i + 1) * hw]);
                    }
                }
                &gathered
            };
            if batch == 1 {
                self.accumulate(&self.rows[0], Operand::rows(src, n), Output::rows(out, n), n, threads);
                return;
            }
            let mut wide = self.biased(1, n);
            self.accumulate(&self.rows[0], Operand::rows(src, n), Output::rows(&mut wide, n), n, threads);
            for b in 0..batch {
                for o in 0..co {
                    out[(b * co + o) * hw..(b * co + o + 1) * hw]
                        .copy_from_slice(&wide[o * n + b * hw..o * n + (b + 1) * hw]);
                }
            }
            return;
        }
        // 3×3, padding 1: row (i, kx) of `shifted` holds, item after item, channel i with a zero row above and
        // below ((h+2)×w) and shifted by kx-1 columns (zeros entering at the edge); kernel row ky then reads
        // every row of `shifted` from offset ky·w, and the multiply's columns are the output pixels
        // themselves. Item b's outputs are columns b·len .. b·len + h·w (the 2·w columns between items are
        // computed and dropped).
        let len = (h + 2) * w;
        let stride = batch * len;
        let shifted = filled(ci * 3 * stride, 3 * stride, |i, rows| {
            for (kx, row) in rows.chunks_mut(stride).enumerate() {
                for (b, item) in row.chunks_mut(len).enumerate() {
                    let channel = &x[(b * ci + i) * hw..(b * ci + i + 1) * hw];
                    for (src, dst) in channel.chunks_exact(w).zip(item[w..].chunks_exact_mut(w)) {
                        // dst[x] = src[x + kx - 1] inside the row; the zero stays outside it.
                        match kx {
                            0 => dst[1..].copy_from_slice(&src[..w - 1]),
                            1 => dst.copy_from_slice(src),
                            _ => dst[..w - 1].copy_from_slice(&src[1..]),
                        }
                    }
                }
            }
        });
        if batch == 1 {
            for (ky, lhs) in self.rows.iter().enumerate() {
                let src = Operand::rows(&shifted[ky * w..], stride);
                self.accumulate(lhs, src, Output::rows(out, hw), hw, threads);
            }
            return;
        }
        let n = (batch - 1) * len + hw;
        let mut wide = self.biased(1, stride);
        for (ky, lhs) in self.rows.iter().enumerate() {
            let src = Operand::rows(&shifted[ky * w..], stride);
            self.accumulate(lhs, src, Output::rows(&mut wide, stride), n, threads);
        }
        for (bo, dst) in out.chunks_mut(hw).enumerate() {
            let from = (bo % co) * stride + (bo / co) * len;
            dst.copy_from_slice(&wide[from..from + hw]);
        }
    }
}

impl ConvKernel {
    /// A 1×1 direct convolution's weight and bias as a dense `[c_out, c_in]` layer; `None` for any other.
    pub fn dense(&self) -> Option<Dense<'_>> {
        match self {
            Self::Direct(c) if c.kernel == 1 => {
                Some(Dense { weight: &c.rows[0], bias: Some(&c.bias), c_out: c.c_out, c_in: c.c_in })
            }
            _ => None,
        }
    }
}

impl CpuConv {
    /// The weight `[c_out, c_in, k, k]` back from the kernel rows.
    fn weight(&self, device: &candle_core::Device) -> Result<Tensor> {
        let (ci, co, k) = (self.c_in, self.c_out, self.kernel);
        let mut w = vec![0f32; co * ci * k * k];
        for (ky, row) in self.rows.iter().enumerate() {
            for o in 0..co {
                for i in 0..ci {
                    for kx in 0..k {
                        w[((o * ci + i) * k + ky) * k + kx] = row[(o * ci + i) * k + kx];
                    }
                }
            }
        }
        Tensor::from_vec(w, (co, ci, k, k), device)
    }
}

/// How a convolution runs: the direct CPU kernel when it applies (holding the only copy of the weights),
/// else Candle's.
#[derive(Debug, Clone)]
pub enum ConvKernel {
    Direct(CpuConv),
    Candle(candle_nn::Conv2d),
}

/// A convolution layer (`weight`, optional `bias`), as `torch.nn.Conv2d`, that LoRAs can adapt.
pub type Conv2d = Adaptable<ConvKernel>;

/// Loads `weight` `[c_out, c_in, k, k]` and `bias` `[c_out]`.
pub fn conv2d(c_in: usize, c_out: usize, kernel: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    let path = vb.prefix();
    let composite = candle_nn::conv2d(c_in, c_out, kernel, cfg, vb)?;
    Ok(Adaptable::new(ConvKernel::choose(composite)?, &path))
}

impl ConvKernel {
    fn choose(composite: candle_nn::Conv2d) -> Result<Self> {
        let cfg = *composite.config();
        let kernel = composite.weight().dim(3)?;
        let direct =
            matches!((kernel, cfg.padding), (3, 1) | (1, 0)) && cfg.stride == 1 && cfg.dilation == 1 && cfg.groups == 1;
        if direct && composite.weight().device().is_cpu() && composite.weight().dtype() == DType::F32 {
            Ok(Self::Direct(CpuConv::new(composite.weight(), composite.bias(), kernel)?))
        } else {
            Ok(Self::Candle(composite))
        }
    }
}

impl Weighted for ConvKernel {
    fn weight_dims(&self) -> Vec<usize> {
        match self {
            Self::Direct(c) => vec![c.c_out, c.c_in, c.kernel, c.kernel],
            Self::Candle(conv) => conv.weight().dims().to_vec(),
        }
    }

    fn weight(&self) -> Result<Tensor> {
        match self {
            Self::Direct(conv) => conv.weight(&candle_core::Device::Cpu),
            Self::Candle(conv) => Ok(conv.weight().clone()),
        }
    }

    fn with_weight(&self, weight: Tensor) -> Result<Self> {
        match self {
            Self::Direct(conv) => {
                let mut new = CpuConv::new(&weight, None, conv.kernel)?;
                new.bias = conv.bias.clone();
                Ok(Self::Direct(new))
            }
            Self::Candle(conv) => {
                Ok(Self::Candle(candle_nn::Conv2d::new(weight, conv.bias().cloned(), *conv.config())))
            }
        }
    }
}

impl Module for ConvKernel {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = super::profile::scope("conv");
        match self {
            Self::Direct(conv) => {
                let (b, c, h, w) = x.dims4()?;
                if c != conv.c_in {
                    candle_core::bail!("conv2d: input has {c} channels, the layer expects {}", conv.c_in);
                }
                let out = with_f32_data(x, |data| conv.forward(data, b, h, w))?;
                Tensor::from_vec(out, (b, conv.c_out, h, w), x.device())
            }
            Self::Candle(conv) => {
                #[cfg(feature = "cuda")]
                if super::cuda_kernels::runs_on(x) {
                    return fused_forward(conv, x, ConvTail::NONE);
                }
                #[cfg(feature = "cudnn")]
                if let Some(y) = super::cudnn_conv::product(x, conv)? {
                    return ConvTail::NONE.finish(y, conv.bias());
                }
                conv.forward(x)
            }
        }
    }
}

impl ConvKernel {
    /// `tail` applied to `forward(x)`; on CUDA the bias and the tail are one pass over the output.
    pub fn forward_tail(&self, x: &Tensor, tail: ConvTail) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Self::Candle(conv), true) = (self, super::cuda_kernels::runs_on(x)) {
            let _profile = super::profile::scope("conv");
            return fused_forward(conv, x, tail);
        }
        tail.apply(self.forward(x)?)
    }
}

impl Conv2d {
    /// [`ConvKernel::forward_tail`] on the layer `forward` uses now.
    pub fn forward_tail(&self, x: &Tensor, tail: ConvTail) -> Result<Tensor> {
        self.with_current(|kernel| kernel.forward_tail(x, tail))
    }
}

/// On CUDA: the product without the bias (cuDNN's cached plan when built with `cudnn`, else Candle's
/// convolution), then the bias and `tail` ([`ConvTail::finish`]: one fused pass).
#[cfg(feature = "cuda")]
fn fused_forward(conv: &candle_nn::Conv2d, x: &Tensor, tail: ConvTail) -> Result<Tensor> {
    #[cfg(feature = "cudnn")]
    let product = super::cudnn_conv::product(x, conv)?;
    #[cfg(not(feature = "cudnn"))]
    let product: Option<Tensor> = None;
    let y = match product {
        Some(y) => y,
        None => candle_nn::Conv2d::new(conv.weight().clone(), None, *conv.config()).forward(x)?,
    };
    tail.finish(y, conv.bias())
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
            let direct = ConvKernel::Direct(CpuConv::new(&weight, Some(&bias), kernel).unwrap());
            let back = Weighted::weight(&direct).unwrap();
            assert_eq!(
                back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                weight.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
            let x = Tensor::randn(0f32, 1.0, (2, c_in, h, w), &dev).unwrap();
            let want = reference.forward(&x).unwrap();
            let got = direct.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "k{kernel} {c_in}->{c_out} {h}x{w}: {d}");
        }
    }

    /// Every way a batch can be cut (one group, uneven groups, a group per item, a multiply too large to
    /// group) against Candle's convolution, whatever the threads of the machine running the test.
    #[test]
    fn every_grouping_of_a_batch_matches_candle() {
        let dev = Device::Cpu;
        // (kernel, c_in, c_out, h, w): small multiplies that group, one of 2²⁴ multiply-adds or more, and the
        // last by Winograd's algorithm (from the kernel rows `CpuConv::new` lays out).
        for (kernel, c_in, c_out, h, w) in
            [(3, 8, 5, 3, 7), (1, 6, 4, 2, 3), (3, 16, 8, 8, 8), (3, 256, 192, 6, 8), (3, 32, 40, 16, 17)]
        {
            let weight = Tensor::randn(0f32, 1.0, (c_out, c_in, kernel, kernel), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, c_out, &dev).unwrap();
            let cfg = Conv2dConfig { padding: kernel / 2, ..Default::default() };
            let reference = candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), cfg);
            let conv = CpuConv::new(&weight, Some(&bias), kernel).unwrap();
            for batch in [1, 3, 5] {
                let x = Tensor::randn(0f32, 1.0, (batch, c_in, h, w), &dev).unwrap();
                let want: Vec<f32> = reference.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let data: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                for threads in [1, 2, 4] {
                    let got = conv.forward_on(&data, batch, h, w, threads);
                    assert_eq!(got.len(), want.len());
                    let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    let tol = 1e-5 * ((c_in * kernel * kernel) as f32).sqrt();
                    assert!(d < tol, "k{kernel} {c_in}->{c_out} {h}x{w} batch {batch} threads {threads}: {d}");
                }
            }
        }
    }

    #[test]
    fn an_empty_image_convolves_to_nothing() {
        let weight = Tensor::ones((4, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let conv = CpuConv::new(&weight, None, 3).unwrap();
        assert!(conv.forward_on(&[], 3, 0, 5, 2).is_empty());
    }

    #[test]
    fn a_batch_gives_each_item_what_it_gets_alone() {
        let dev = Device::Cpu;
        // The last two run by Winograd's algorithm; (3, 32, 32, 8, 8) has too few tiles for it.
        let cases = [
            (3, 4, 6, 1, 1),
            (3, 8, 5, 3, 7),
            (1, 6, 4, 2, 3),
            (3, 32, 32, 8, 8),
            (3, 4, 3, 40, 33),
            (1, 5, 3, 33, 40),
            (3, 32, 40, 15, 17),
            (3, 40, 32, 16, 16),
        ];
        for (kernel, c_in, c_out, h, w) in cases {
            assert_eq!(
                kernel == 3 && winograd::applies(c_in, c_out, h, w),
                c_in >= 32 && h >= 15,
                "{c_in}->{c_out} {h}x{w}"
            );
            let weight = Tensor::randn(0f32, 1.0, (c_out, c_in, kernel, kernel), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, c_out, &dev).unwrap();
            let conv = ConvKernel::Direct(CpuConv::new(&weight, Some(&bias), kernel).unwrap());
            let x = Tensor::randn(0f32, 1.0, (3, c_in, h, w), &dev).unwrap();
            let together = conv.forward(&x).unwrap();
            for b in 0..3 {
                let alone = conv.forward(&x.narrow(0, b, 1).unwrap()).unwrap();
                let d = (together.narrow(0, b, 1).unwrap() - alone)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(d < 1e-5, "k{kernel} {c_in}->{c_out} {h}x{w} item {b}: {d}");
            }
        }
    }
}
