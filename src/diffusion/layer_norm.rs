//! Layer normalisation over the last dimension: Candle's fused kernel for f32/f16/bf16, and the same
//! arithmetic spelled out with tensor ops for f64 (which the fused kernel does not take), so whole
//! pipelines can run in f64 against diffusers' float64 results.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    fused: candle_nn::LayerNorm,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

/// `LayerNorm(size, eps)` with weight and bias, as PyTorch's `nn.LayerNorm`.
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let weight = vb.get(size, "weight")?;
    let bias = vb.get(size, "bias")?;
    Ok(LayerNorm { fused: candle_nn::LayerNorm::new(weight.clone(), bias.clone(), eps), weight, bias, eps })
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = super::profile::scope("layer_norm");
        if x.dtype() != DType::F64 {
            return self.fused.forward(x);
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}
