//! A transformer's input and output projections on the CPU (f32), with the layout change folded into the
//! multiply.
//!
//! diffusers' `Transformer2DModel` projects a `[B, C, H, W]` feature map to `[B, H·W, C]` tokens (a 1×1
//! convolution then a permute, or a permute then a linear layer) and back (the reverse, then the residual
//! add). Written as tensor operations each permute is a strided copy of the whole map, and the residual add
//! one more pass: 1.4 % of the full-size SD 1.5 UNet step on the CPU, five times what PyTorch spends there.
//! Both projections are the same `[c_out, c_in]` matrix product, so here the multiply reads its input
//! transposed and writes the other layout directly, and the way back starts from the residual plus the bias
//! and accumulates the product onto it.

use candle_core::{Result, Tensor};

use super::blas::{self, Dims, Operand, Output, Update};
use super::cpu_data::with_f32_data;
use super::layer_tail::{finish_rows, ConvTail};

/// A 1×1 convolution's or a linear layer's weight (`[c_out, c_in]`, row-major) and bias, as f32 CPU data.
#[derive(Clone, Copy)]
pub struct Dense<'a> {
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub c_out: usize,
    pub c_in: usize,
}

fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// `[B, c_in, H, W]` → `[B, H·W, c_out]`: `tokens[b, p, o] = bias[o] + Σᵢ w[o, i] · x[b, i, p]`.
pub fn map_to_tokens(x: &Tensor, dense: Dense) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (hw, co) = (h * w, dense.c_out);
    if c != dense.c_in {
        candle_core::bail!("projection: input has {c} channels, the layer expects {}", dense.c_in);
    }
    let mut out = vec![0f32; b * hw * co];
    with_f32_data(x, |x| {
        for (xb, ob) in x.chunks_exact(c * hw).zip(out.chunks_exact_mut(hw * co)) {
            if let Some(bias) = dense.bias {
                for row in ob.chunks_exact_mut(co) {
                    row.copy_from_slice(bias);
                }
            }
            // a[p, i] = x[i, p] (the map, read transposed); b[i, o] = w[o, i].
            let (a, wt) = (Operand::transposed(xb, hw), Operand::transposed(dense.weight, c));
            blas::matmul(Dims { m: hw, n: co, k: c }, a, wt, Output::rows(ob, co), Update::ADD, threads());
        }
    })?;
    Tensor::from_vec(out, (b, hw, co), x.device())
}

/// `[B, H·W, c_in]` tokens → `[B, c_out, H, W]` plus `residual`:
/// `out[b, o, p] = residual[b, o, p] + bias[o] + Σᵢ w[o, i] · tokens[b, p, i]`.
pub fn tokens_to_map_plus(tokens: &Tensor, dense: Dense, residual: &Tensor) -> Result<Tensor> {
    let (b, co, h, w) = residual.dims4()?;
    let (hw, c) = (h * w, dense.c_in);
    if tokens.dims() != [b, hw, c] || co != dense.c_out {
        candle_core::bail!(
            "projection: tokens {:?} and residual {:?} do not fit [{co}, {c}]",
            tokens.dims(),
            residual.dims()
        );
    }
    let mut out = with_f32_data(residual, |r| r.to_vec())?;
    if let Some(bias) = dense.bias {
        for (row, &bias) in out.chunks_exact_mut(hw).zip(bias.iter().cycle()) {
            row.iter_mut().for_each(|v| *v += bias);
        }
    }
    with_f32_data(tokens, |t| {
        for (tb, ob) in t.chunks_exact(hw * c).zip(out.chunks_exact_mut(co * hw)) {
            // a[o, i] = w[o, i]; b[i, p] = tokens[p, i] (read transposed).
            let (wa, tt) = (Operand::rows(dense.weight, c), Operand::transposed(tb, c));
            blas::matmul(Dims { m: co, n: hw, k: c }, wa, tt, Output::rows(ob, hw), Update::ADD, threads());
        }
    })?;
    Tensor::from_vec(out, (b, co, h, w), residual.device())
}

/// [`map_to_tokens`] as tensor operations on any device, for a `weight: [c_out, c_in]` tensor: one batched
/// product that reads the map transposed (cuBLAS takes the strides; no permute copy), then the bias (in the
/// fused tail on CUDA). Contiguous `[B, H·W, c_out]` tokens.
pub fn map_to_tokens_strided(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let mut map = x.contiguous()?.reshape((b, c, h * w))?.transpose(1, 2)?;
    if !x.device().is_cuda() {
        // Candle 0.11.1's CPU product folds a batch-invariant right operand into one multiply even when the
        // left one is transposed, which reads the wrong rows: there the map is laid out as tokens first.
        map = map.contiguous()?;
    }
    finish_rows(map.matmul(&weight.t()?.broadcast_left(b)?)?, bias, None)
}

/// [`tokens_to_map_plus`] as tensor operations on any device, for a `weight: [c_out, c_in]` tensor: one
/// batched product `weight · tokensᵀ` that writes the map's layout directly, then the bias and the residual
/// (one fused pass on CUDA).
pub fn tokens_to_map_plus_strided(
    tokens: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Tensor> {
    let (b, co, h, w) = residual.dims4()?;
    let map = weight.broadcast_left(b)?.matmul(&tokens.contiguous()?.transpose(1, 2)?)?.reshape((b, co, h, w))?;
    ConvTail { residual: Some(residual), ..ConvTail::NONE }.finish(map, bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn seeded(shape: &[usize], seed: u64) -> Tensor {
        crate::diffusion::rng::TorchRng::new(seed).randn(shape, &Device::Cpu).unwrap()
    }

    /// Both directions against the tensor-operation version, with and without a bias.
    #[test]
    fn projections_match_permute_then_multiply() {
        let (b, c_in, c_out, h, w) = (2, 24, 40, 5, 7);
        let x = seeded(&[b, c_in, h, w], 1);
        let weight = seeded(&[c_out, c_in], 2);
        let bias = seeded(&[c_out], 3);
        let wv: Vec<f32> = weight.flatten_all().unwrap().to_vec1().unwrap();
        let bv: Vec<f32> = bias.to_vec1().unwrap();
        for with_bias in [true, false] {
            let dense = Dense { weight: &wv, bias: with_bias.then_some(&bv[..]), c_out, c_in };
            let tokens = x.permute((0, 2, 3, 1)).unwrap().reshape((b, h * w, c_in)).unwrap();
            let mut want = tokens.broadcast_matmul(&weight.t().unwrap()).unwrap();
            if with_bias {
                want = want.broadcast_add(&bias).unwrap();
            }
            let got = map_to_tokens(&x, dense).unwrap();
            let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-5, "map_to_tokens, bias {with_bias}: {err}");
            let got = map_to_tokens_strided(&x, &weight, with_bias.then_some(&bias)).unwrap();
            assert!(got.is_contiguous());
            let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-5, "map_to_tokens_strided, bias {with_bias}: {err}");

            // back: tokens [b, hw, c_in] through a [c_out, c_in] layer onto a [b, c_out, h, w] residual
            let tokens = seeded(&[b, h * w, c_in], 4);
            let residual = seeded(&[b, c_out, h, w], 5);
            let mut projected = tokens.broadcast_matmul(&weight.t().unwrap()).unwrap();
            if with_bias {
                projected = projected.broadcast_add(&bias).unwrap();
            }
            let want =
                (projected.reshape((b, h, w, c_out)).unwrap().permute((0, 3, 1, 2)).unwrap() + &residual).unwrap();
            let got = tokens_to_map_plus(&tokens, dense, &residual).unwrap();
            let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-5, "tokens_to_map_plus, bias {with_bias}: {err}");
            let got = tokens_to_map_plus_strided(&tokens, &weight, with_bias.then_some(&bias), &residual).unwrap();
            let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-5, "tokens_to_map_plus_strided, bias {with_bias}: {err}");
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let w = vec![0f32; 6];
        let dense = Dense { weight: &w, bias: None, c_out: 2, c_in: 3 };
        assert!(map_to_tokens(&seeded(&[1, 4, 2, 2], 1), dense).is_err());
        assert!(tokens_to_map_plus(&seeded(&[1, 4, 3], 1), dense, &seeded(&[1, 3, 2, 2], 2)).is_err());
    }
}
