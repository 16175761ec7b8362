//! Attention layers shared by the UNet and the VAE, as diffusers defines them: scaled dot-product attention
//! (computed in query chunks so the full attention matrix of a large image never sits in memory at once),
//! diffusers' `Attention` module, the GEGLU feed-forward, `BasicTransformerBlock` and `Transformer2DModel`.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::adapt::{self, Linear};

use super::conv::{conv2d, Conv2d};
use super::group_norm::{group_norm, GroupNorm};
use super::layer_norm::{layer_norm, LayerNorm};
use super::linear::LinearKernel;
use super::token_projection::{self, Dense};

/// Largest attention-score block (elements) computed at once; bounds peak memory for big images.
const MAX_SCORE_ELEMENTS: usize = 1 << 25;

/// Softmax(q kᵀ · scale) v for `q: [N, Lq, D]`, `k, v: [N, Lk, D]`.
///
/// Half-precision inputs are computed in f32 (so diffusers' `upcast_attention` / `upcast_softmax` are
/// always honoured), and scores are computed in blocks of query rows so that at most
/// [`MAX_SCORE_ELEMENTS`] scores exist at a time.
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if let Some(out) = super::cpu_attention::attention(q, k, v, scale)? {
        return Ok(out);
    }
    let in_dtype = q.dtype();
    let work_dtype = if matches!(in_dtype, DType::F16 | DType::BF16) { DType::F32 } else { in_dtype };
    let (n, lq, _) = q.dims3()?;
    let lk = k.dim(1)?;
    let q = (q.to_dtype(work_dtype)? * scale)?;
    let k_t = k.to_dtype(work_dtype)?.t()?;
    let v = v.to_dtype(work_dtype)?;
    let rows = (MAX_SCORE_ELEMENTS / (n * lk).max(1)).clamp(1, lq);
    let mut outputs = Vec::with_capacity(lq.div_ceil(rows));
    let mut start = 0;
    while start < lq {
        let len = rows.min(lq - start);
        let q_chunk = if len == lq { q.clone() } else { q.narrow(1, start, len)? };
        let scores = q_chunk.contiguous()?.matmul(&k_t)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outputs.push(probs.matmul(&v)?);
        start += len;
    }
    let out = if outputs.len() == 1 { outputs.pop().unwrap() } else { Tensor::cat(&outputs, 1)? };
    out.to_dtype(in_dtype)
}

/// FlashAttention-2 on CUDA (feature `flash-attn`): what diffusers' SDPA runs in f16/bf16 on the same cards.
mod flash {
    use candle_core::{Result, Tensor};

    /// Whether `SD_RBEE_FLASH_ATTN=0` turned it off (for A/B timing and parity checks).
    #[cfg(feature = "flash-attn")]
    fn enabled() -> bool {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ENABLED.get_or_init(|| std::env::var("SD_RBEE_FLASH_ATTN").map_or(true, |v| v.trim() != "0"))
    }

    /// `softmax(q kᵀ · scale) v` over `[B, L, H·D]` projections split into `heads`, as `[B, Lq, H·D]`;
    /// `None` where no kernel fits (CPU, f32, or a head dimension that was not built).
    #[cfg(feature = "flash-attn")]
    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Option<Tensor>> {
        let (b, lq, inner) = q.dims3()?;
        let lk = k.dim(1)?;
        let d = inner / heads;
        if !q.device().is_cuda() || !enabled() || !sd_rbee_flash_attn::supports(q.dtype(), d) {
            return Ok(None);
        }
        // [B, L, H·D] is already [B, L, H, D] in memory: no transposes, unlike the plain path.
        let split = |t: &Tensor, l: usize| t.contiguous()?.reshape((b, l, heads, d));
        let out = sd_rbee_flash_attn::flash_attn(&split(q, lq)?, &split(k, lk)?, &split(v, lk)?, scale as f32)?;
        Ok(Some(out.reshape((b, lq, inner))?))
    }

    #[cfg(not(feature = "flash-attn"))]
    pub fn attention(_: &Tensor, _: &Tensor, _: &Tensor, _: usize, _: f64) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// diffusers' `Attention` (AttnProcessor2_0) without a spatial norm: q from `hidden`, k/v from `context`
/// (or `hidden` for self-attention), `heads` heads, then `to_out.0`.
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    /// `bias` applies to q/k/v (the output projection always has one).
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let proj = |name: &str, input: usize| adapt::linear_b(input, inner, bias, vb.pp(name));
        Ok(Self {
            to_q: proj("to_q", query_dim)?,
            to_k: proj("to_k", context_dim)?,
            to_v: proj("to_v", context_dim)?,
            to_out: adapt::linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// `[B, L, C] -> [B*H, L, C/H]`
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        x.reshape((b, l, self.heads, c / self.heads))?
            .transpose(1, 2)?
            .reshape((b * self.heads, l, c / self.heads))?
            .contiguous()
    }

    pub fn forward(&self, hidden: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_plus(hidden, context, None)
    }

    /// `forward(hidden, context) + residual`, the residual added in `to_out`'s tail.
    pub fn forward_plus(&self, hidden: &Tensor, context: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
        let _profile = super::profile::scope("attention");
        let context = context.unwrap_or(hidden);
        let (b, l, _) = hidden.dims3()?;
        let q = self.to_q.forward(hidden)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        if let Some(out) = flash::attention(&q, &k, &v, self.heads, self.scale)? {
            return self.to_out.forward_plus(&out, residual);
        }
        if let Some(out) = super::cpu_attention::attention_heads(&q, &k, &v, self.heads, self.scale)? {
            return self.to_out.forward_plus(&out, residual);
        }
        let (q, k, v) = (self.split_heads(&q)?, self.split_heads(&k)?, self.split_heads(&v)?);
        let out = scaled_dot_product_attention(&q, &k, &v, self.scale)?;
        let d = out.dim(2)?;
        let out = out.reshape((b, self.heads, l, d))?.transpose(1, 2)?.reshape((b, l, self.heads * d))?;
        self.to_out.forward_plus(&out, residual)
    }
}

/// GEGLU feed-forward (`ff.net.0.proj`, `ff.net.2`): `proj(x) = [h, gate]`, `out = W(h * gelu(gate))`,
/// with the exact (erf) GELU that PyTorch's `F.gelu` computes.
#[derive(Debug)]
pub struct GegluFeedForward {
    proj: Linear,
    out: Linear,
}

impl GegluFeedForward {
    pub fn new(vb: VarBuilder, dim: usize, mult: usize) -> Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            proj: adapt::linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            out: adapt::linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    /// `out(h · gelu(gate)) + residual`. On CUDA the projection's bias rides on the fused GEGLU kernel and the
    /// residual on `out`'s tail.
    pub fn forward_plus(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let _profile = super::profile::scope("feed_forward");
        let projected = match self.project(x)? {
            Projected::Gated(gated) => return self.out.forward_plus(&gated, residual),
            Projected::Whole(projected) => projected,
        };
        if let Some(gated) = super::cpu_geglu::geglu(&projected)? {
            return self.out.forward_plus(&gated, residual);
        }
        let half = projected.dim(D::Minus1)? / 2;
        let hidden = projected.narrow(D::Minus1, 0, half)?;
        let gate = projected.narrow(D::Minus1, half, half)?.gelu_erf()?;
        self.out.forward_plus(&(hidden * gate)?, residual)
    }

    /// `proj(x)`; on CUDA its product goes straight into the fused GEGLU kernel with the bias where that applies.
    fn project(&self, x: &Tensor) -> Result<Projected> {
        #[cfg(feature = "cuda")]
        if super::cuda_kernels::runs_on(x) {
            return self.proj.with_current(|proj| {
                let product = {
                    let _profile = super::profile::scope("linear");
                    proj.product(x)?
                };
                Ok(match super::cuda_kernels::geglu(&product, proj.bias())? {
                    Some(gated) => Projected::Gated(gated),
                    None => Projected::Whole(super::layer_tail::finish_rows(product, proj.bias(), None)?),
                })
            });
        }
        self.proj.forward(x).map(Projected::Whole)
    }
}

/// What [`GegluFeedForward::project`] made: already gated, or the whole `[h | gate]` projection.
enum Projected {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Gated(Tensor),
    Whole(Tensor),
}

/// diffusers' `BasicTransformerBlock` with layer norms: self-attention, cross-attention, GEGLU feed-forward,
/// each pre-normed and residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: GegluFeedForward,
}

impl BasicTransformerBlock {
    pub fn new(vb: VarBuilder, dim: usize, heads: usize, head_dim: usize, context_dim: usize) -> Result<Self> {
        let ln = |name: &str| layer_norm(dim, 1e-5, vb.pp(name));
        Ok(Self {
            norm1: ln("norm1")?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim, false)?,
            norm2: ln("norm2")?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads, head_dim, false)?,
            norm3: ln("norm3")?,
            ff: GegluFeedForward::new(vb.pp("ff"), dim, 4)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let _profile = super::profile::scope("transformer_block");
        let x = self.attn1.forward_plus(&self.norm1.forward(x)?, None, Some(x))?;
        let x = self.attn2.forward_plus(&self.norm2.forward(&x)?, Some(context), Some(&x))?;
        self.ff.forward_plus(&self.norm3.forward(&x)?, Some(&x))
    }
}

/// Input/output projection of a [`Transformer2D`]: a 1×1 convolution on the feature map, or (SD 2.x, SDXL)
/// a linear layer on the flattened tokens.
#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    /// The profile's name for the layer.
    fn kind(&self) -> &'static str {
        match self {
            Projection::Conv(_) => "conv",
            Projection::Linear(_) => "linear",
        }
    }

    /// Runs `f` on the layer as a dense `[c_out, c_in]` one when it is f32 on the CPU, timed as what it is.
    fn with_dense<R>(&self, f: impl FnOnce(Dense) -> Result<R>) -> Result<Option<R>> {
        match self {
            Projection::Conv(conv) => conv.with_current(|k| match k.dense() {
                Some(dense) => {
                    let _profile = super::profile::scope(self.kind());
                    f(dense).map(Some)
                }
                None => Ok(None),
            }),
            Projection::Linear(lin) => lin.with_current(|k| {
                let _profile = super::profile::scope(self.kind());
                k.with_dense(f)
            }),
        }
    }

    /// The layer as a `[c_out, c_in]` weight tensor and its bias; `None` for the CPU's direct convolution.
    #[cfg(feature = "cuda")]
    fn matrix(&self) -> Result<Option<(Tensor, Option<Tensor>)>> {
        use super::conv::ConvKernel;
        match self {
            Projection::Conv(conv) => conv.with_current(|kernel| match kernel {
                ConvKernel::Candle(c) => {
                    let (c_out, c_in, _, _) = c.weight().dims4()?;
                    Ok(Some((c.weight().reshape((c_out, c_in))?, c.bias().cloned())))
                }
                ConvKernel::Direct(_) => Ok(None),
            }),
            Projection::Linear(lin) => {
                lin.with_current(|kernel| Ok(Some((super::adapt::Weighted::weight(kernel)?, kernel.bias().cloned()))))
            }
        }
    }
}

/// diffusers' `Transformer2DModel` for continuous (latent) inputs.
#[derive(Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// Shape of a [`Transformer2D`].
#[derive(Clone, Copy, Debug)]
pub struct Transformer2DConfig {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl Transformer2D {
    pub fn new(vb: VarBuilder, cfg: Transformer2DConfig) -> Result<Self> {
        let c = cfg.channels;
        let head_dim = c / cfg.heads;
        let projection = |name: &str| -> Result<Projection> {
            if cfg.linear_projection {
                Ok(Projection::Linear(adapt::linear(c, c, vb.pp(name))?))
            } else {
                Ok(Projection::Conv(conv2d(c, c, 1, Default::default(), vb.pp(name))?))
            }
        };
        let blocks = (0..cfg.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    c,
                    cfg.heads,
                    head_dim,
                    cfg.context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(cfg.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let _profile = super::profile::scope("transformer");
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(x)?;
        // On the CPU in f32 the projections write the other layout themselves (`token_projection`).
        let cpu = x.device().is_cpu() && x.dtype() == DType::F32;
        #[cfg(feature = "cuda")]
        if super::cuda_kernels::runs_on(&x) {
            if let (Some((w_in, b_in)), Some((w_out, b_out))) = (self.proj_in.matrix()?, self.proj_out.matrix()?) {
                let mut tokens = {
                    let _profile = super::profile::scope(self.proj_in.kind());
                    token_projection::map_to_tokens_strided(&x, &w_in, b_in.as_ref())?
                };
                for block in &self.blocks {
                    tokens = block.forward(&tokens, context)?;
                }
                let _profile = super::profile::scope(self.proj_out.kind());
                return token_projection::tokens_to_map_plus_strided(&tokens, &w_out, b_out.as_ref(), residual);
            }
        }
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let fused = if cpu { self.proj_in.with_dense(|d| token_projection::map_to_tokens(&x, d))? } else { None };
        let mut tokens = match (fused, &self.proj_in) {
            (Some(tokens), _) => tokens,
            (None, Projection::Conv(conv)) => to_tokens(&conv.forward(&x)?)?,
            (None, Projection::Linear(lin)) => lin.forward(&to_tokens(&x)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        if cpu {
            let out = self.proj_out.with_dense(|d| token_projection::tokens_to_map_plus(&tokens, d, residual))?;
            if let Some(out) = out {
                return Ok(out);
            }
        }
        let to_map = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?)?,
            Projection::Linear(lin) => to_map(&lin.forward(&tokens)?)?,
        };
        out + residual
    }
}

/// The single-head self-attention of the VAE's mid block (diffusers `Attention` with `group_norm`,
/// `residual_connection=True`, `upcast_softmax=True`). Accepts both the current tensor names
/// (`to_q`, `to_k`, `to_v`, `to_out.0`) and the deprecated ones (`query`, `key`, `value`, `proj_attn`).
#[derive(Debug)]
pub struct SpatialSelfAttention {
    group_norm: GroupNorm,
    to_q: LinearKernel,
    to_k: LinearKernel,
    to_v: LinearKernel,
    to_out: LinearKernel,
    scale: f64,
}

impl SpatialSelfAttention {
    pub fn new(vb: VarBuilder, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let proj = |new: &str, old: &str| -> Result<LinearKernel> {
            let p = vb.pp(if legacy { old } else { new });
            let w = p.get((channels, channels), "weight").or_else(|_| {
                // Very old checkpoints stored these as 1×1 convolutions.
                p.get((channels, channels, 1, 1), "weight")?.reshape((channels, channels))
            })?;
            Ok(LinearKernel::new(candle_nn::Linear::new(w, Some(p.get(channels, "bias")?))))
        };
        Ok(Self {
            group_norm: group_norm(groups, channels, eps, vb.pp("group_norm"))?,
            to_q: proj("to_q", "query")?,
            to_k: proj("to_k", "key")?,
            to_v: proj("to_v", "value")?,
            to_out: proj("to_out.0", "proj_attn")?,
            scale: 1.0 / (channels as f64).sqrt(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = super::profile::scope("attention");
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = scaled_dot_product_attention(&q, &k, &v, self.scale)?;
        let out = self.to_out.forward(&out)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}
