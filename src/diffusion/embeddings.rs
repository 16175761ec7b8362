//! Timestep embeddings as diffusers computes them: the sinusoidal `Timesteps` projection and the
//! two-layer `TimestepEmbedding` MLP (also used for SDXL's `text_time` add-embedding).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::adapt::{self, Linear};

/// diffusers' `get_timestep_embedding` for a batch of (possibly fractional) timesteps, computed in f32 the
/// way PyTorch does: `[sin | cos]`, or `[cos | sin]` with `flip_sin_to_cos`. Returns `[len(timesteps), dim]`.
pub fn sinusoidal_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let log_period = -(10000f64.ln()) as f32;
    let denom = (half as f64 - downscale_freq_shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (log_period * i as f32 / denom).exp()).collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let t = t as f32;
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            data.extend(cos.chain(sin));
        } else {
            data.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_vec(data, (timesteps.len(), dim), device)
}

/// `linear_1 → SiLU → linear_2`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: adapt::linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: adapt::linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = super::profile::scope("time_embedding");
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// Casts an f32 embedding to the model dtype.
pub fn to_model_dtype(x: Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        Ok(x)
    } else {
        x.to_dtype(dtype)
    }
}
