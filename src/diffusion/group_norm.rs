//! Group normalisation, optionally fused with the SiLU that follows it in every ResNet block.
//!
//! On the CPU in f32 this is one pass-per-group kernel (statistics accumulated in f64, then scale, shift and
//! SiLU in a single sweep, groups in parallel when large) instead of the dozen tensor operations and
//! temporaries of the composite version; on CUDA it is two fused kernels in any dtype (`cuda_kernels`); elsewhere
//! Candle's `GroupNorm`.

use candle_core::{CpuStorage, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::cpu_attention::exp_nonpositive;
use super::simd::widest_simd;

/// Groups with at least this many elements in total are normalised in parallel.
const PARALLEL_ELEMENTS: usize = 1 << 15;

#[derive(Debug, Clone)]
struct CpuGroupNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    groups: usize,
    eps: f64,
    silu: bool,
}

/// Lanes of independent f64 accumulators: the sums vectorise without reassociating one running sum.
const LANES: usize = 8;

#[inline(always)]
fn lane_sum(xs: &[f32], term: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder().iter().map(|&v| term(v)).sum::<f64>();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += term(v);
        }
    }
    acc.iter().sum::<f64>() + rest
}

/// `x · sigmoid(x)`, vectorisable: the exponential is only ever taken of `-|x|`.
#[inline(always)]
fn silu(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let numerator = if x >= 0.0 { 1.0 } else { e };
    x * numerator / (1.0 + e)
}

/// Group `group_index` (of the whole batch) of `op`, `hw` values per channel: mean and variance in f64 (two
/// passes), then scale, shift and the optional SiLU in one sweep.
#[inline(always)]
fn normalise_generic(op: &CpuGroupNorm, group_index: usize, hw: usize, xs: &[f32], ys: &mut [f32]) {
    let per_group = op.weight.len() / op.groups;
    let first = (group_index % op.groups) * per_group;
    let (weight, bias) = (&op.weight[first..first + per_group], &op.bias[first..first + per_group]);
    let len = xs.len() as f64;
    let mean = lane_sum(xs, |v| v as f64) / len;
    let var = lane_sum(xs, |v| (v as f64 - mean) * (v as f64 - mean)) / len;
    let rstd = 1.0 / (var + op.eps).sqrt();
    for ((xc, yc), (&w, &b)) in xs.chunks(hw).zip(ys.chunks_mut(hw)).zip(weight.iter().zip(bias)) {
        let scale = (w as f64 * rstd) as f32;
        let shift = (b as f64 - mean * w as f64 * rstd) as f32;
        if op.silu {
            for (y, &x) in yc.iter_mut().zip(xc) {
                *y = silu(x * scale + shift);
            }
        } else {
            for (y, &x) in yc.iter_mut().zip(xc) {
                *y = x * scale + shift;
            }
        }
    }
}

widest_simd! {
    fn normalise(op: &CpuGroupNorm, group_index: usize, hw: usize, xs: &[f32], ys: &mut [f32]) => normalise_generic
}

impl candle_core::CustomOp1 for CpuGroupNorm {
    fn name(&self) -> &'static str {
        "group-norm-silu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("group-norm kernel expects f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("group-norm kernel expects a contiguous input");
        };
        let x = &data[start..end];
        let dims = layout.dims();
        if dims.len() < 2 || dims[1] != self.weight.len() || !dims[1].is_multiple_of(self.groups) {
            candle_core::bail!("group-norm: input {dims:?} does not fit {} channels", self.weight.len());
        }
        let hw: usize = dims[2..].iter().product();
        let group_len = dims[1] / self.groups * hw;
        let mut out = vec![0f32; x.len()];
        if group_len == 0 {
            return Ok((CpuStorage::F32(out), layout.shape().clone()));
        }
        if x.len() >= PARALLEL_ELEMENTS {
            out.par_chunks_mut(group_len)
                .zip(x.par_chunks(group_len))
                .enumerate()
                .for_each(|(g, (ys, xs))| normalise(self, g, hw, xs, ys));
        } else {
            for (g, (ys, xs)) in out.chunks_mut(group_len).zip(x.chunks(group_len)).enumerate() {
                normalise(self, g, hw, xs, ys);
            }
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// PyTorch's `nn.GroupNorm(groups, channels, eps)` with affine weight and bias.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    composite: candle_nn::GroupNorm,
    cpu: Option<CpuGroupNorm>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    cuda: Option<CudaGroupNorm>,
}

/// What the CUDA kernels need: the affine parameters in the model's dtype, on the device.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct CudaGroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let composite = candle_nn::group_norm(groups, channels, eps, vb.clone())?;
    let weight = vb.get(channels, "weight")?;
    let cpu = if weight.device().is_cpu() && vb.dtype() == DType::F32 {
        Some(CpuGroupNorm {
            weight: weight.to_dtype(DType::F32)?.to_vec1()?,
            bias: vb.get(channels, "bias")?.to_dtype(DType::F32)?.to_vec1()?,
            groups,
            eps,
            silu: false,
        })
    } else {
        None
    };
    let cuda = if weight.device().is_cuda() {
        Some(CudaGroupNorm { weight: weight.clone(), bias: vb.get(channels, "bias")?, groups, eps })
    } else {
        None
    };
    Ok(GroupNorm { composite, cpu, cuda })
}

impl GroupNorm {
    fn fused(&self, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if let Some(op) = &self.cuda {
            return super::cuda_kernels::group_norm(x, &op.weight, &op.bias, op.groups, op.eps, silu);
        }
        match &self.cpu {
            Some(op) if x.dtype() == DType::F32 && x.device().is_cpu() => {
                let op = CpuGroupNorm { silu, ..op.clone() };
                Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?))
            }
            _ => Ok(None),
        }
    }

    /// `silu(group_norm(x))`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = super::profile::scope("group_norm");
        match self.fused(x, true)? {
            Some(y) => Ok(y),
            None => self.composite.forward(x)?.silu(),
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = super::profile::scope("group_norm");
        match self.fused(x, false)? {
            Some(y) => Ok(y),
            None => self.composite.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn check(shape: (usize, usize, usize, usize), groups: usize) {
        let dev = Device::Cpu;
        let c = shape.1;
        let w = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
        let composite = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, 1e-5).unwrap();
        let fused = GroupNorm {
            composite: composite.clone(),
            cpu: Some(CpuGroupNorm {
                weight: w.to_vec1().unwrap(),
                bias: b.to_vec1().unwrap(),
                groups,
                eps: 1e-5,
                silu: false,
            }),
            cuda: None,
        };
        let x = (Tensor::randn(0f32, 3.0, shape, &dev).unwrap() + 0.5).unwrap();
        let want = composite.forward(&x).unwrap();
        let got = fused.forward(&x).unwrap();
        let d = (want.clone() - got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "group norm differs by {d}");
        let got = fused.forward_silu(&x).unwrap();
        let d = (want.silu().unwrap() - got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "group norm + silu differs by {d}");
    }

    #[test]
    fn fused_kernel_matches_the_composite_small_and_parallel() {
        check((2, 32, 3, 5), 8);
        check((2, 64, 32, 32), 32);
    }
}
