//! The CLIP text encoder as transformers defines it (`CLIPTextModel` and
//! `CLIPTextModelWithProjection`), built from its `config.json` so that any width, depth, head count and
//! activation (`quick_gelu`, exact `gelu`, tanh `gelu_new`) loads. Accepts tensor names with and without the
//! `text_model.` prefix (transformers 5.x drops it for `CLIPTextModel`).

use anyhow::{bail, Context};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::adapt::{self, Linear};
use super::layer_norm::{layer_norm, LayerNorm};

/// The activation of the MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, SD 1.x).
    QuickGelu,
    /// Exact erf GELU (OpenCLIP, SD 2.x, SDXL's second encoder).
    Gelu,
    /// tanh-approximated GELU.
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            other => bail!("text encoder config: `hidden_act` = {other:?} is not supported"),
        }
    }

    fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
        }
    }
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eos() -> u32 {
    2
}
fn default_positions() -> usize {
    77
}

/// `text_encoder/config.json` (transformers' `CLIPTextConfig`).
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub architectures: Vec<String>,
}

impl ClipTextConfig {
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
        // A full CLIPConfig nests the text tower under `text_config`.
        let value = value.get("text_config").cloned().unwrap_or(value);
        let config: Self = serde_json::from_value(value)
            .with_context(|| format!("{} is not a CLIP text encoder config", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        Activation::parse(&self.hidden_act)?;
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "text encoder config: `hidden_size` {} is not divisible by `num_attention_heads` {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if self.num_hidden_layers == 0 {
            bail!("text encoder config: `num_hidden_layers` is 0");
        }
        Ok(())
    }

    /// Whether the checkpoint is a `CLIPTextModelWithProjection` (SDXL's second encoder).
    pub fn has_projection(&self) -> bool {
        self.architectures.iter().any(|a| a == "CLIPTextModelWithProjection")
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let h = c.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            q_proj: adapt::linear(h, h, attn.pp("q_proj"))?,
            k_proj: adapt::linear(h, h, attn.pp("k_proj"))?,
            v_proj: adapt::linear(h, h, attn.pp("v_proj"))?,
            out_proj: adapt::linear(h, h, attn.pp("out_proj"))?,
            layer_norm2: layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: adapt::linear(h, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: adapt::linear(c.intermediate_size, h, vb.pp("mlp.fc2"))?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, heads: usize, act: Activation) -> Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let d = h / heads;
        let normed = self.layer_norm1.forward(x)?;
        let split = |t: Tensor| t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous();
        let q = split((self.q_proj.forward(&normed)? * (d as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(&normed)?)?;
        let v = split(self.v_proj.forward(&normed)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let work = if matches!(scores.dtype(), DType::F16 | DType::BF16) { DType::F32 } else { scores.dtype() };
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(work)?)?.to_dtype(v.dtype())?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?;
        let x = (self.out_proj.forward(&attn)? + x)?;
        let mlp = self.fc2.forward(&act.forward(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?)?)?;
        mlp + x
    }
}

/// What one text-encoder pass yields.
#[derive(Debug)]
pub struct ClipOutput {
    /// Output of the last layer after the final layer norm (`last_hidden_state`), `[B, L, hidden]`.
    pub last_hidden_state: Tensor,
    /// Output of the second-to-last layer, without the final norm (`hidden_states[-2]`, what SDXL uses).
    pub penultimate_hidden_state: Tensor,
    /// The final-normed state at each sequence's first EOS token, through `text_projection` when the model
    /// has one (`text_embeds`), `[B, projection_dim or hidden]`.
    pub pooled: Tensor,
}

/// A CLIP text encoder.
#[derive(Debug)]
pub struct ClipTextModel {
    config: ClipTextConfig,
    activation: Activation,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    pub fn new(vb: VarBuilder, config: ClipTextConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let activation = Activation::parse(&config.hidden_act)?;
        let tm = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else if vb.contains_tensor("embeddings.token_embedding.weight") {
            vb.clone()
        } else {
            bail!("text encoder weights have no `embeddings.token_embedding.weight` (with or without a `text_model.` prefix)");
        };
        let h = config.hidden_size;
        let token_embedding = candle_nn::embedding(config.vocab_size, h, tm.pp("embeddings.token_embedding"))?;
        let position_embedding =
            candle_nn::embedding(config.max_position_embeddings, h, tm.pp("embeddings.position_embedding"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(tm.pp(format!("encoder.layers.{i}")), &config))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(h, config.layer_norm_eps, tm.pp("final_layer_norm"))?;
        let text_projection = if config.has_projection() || vb.contains_tensor("text_projection.weight") {
            let dim = config.projection_dim.unwrap_or(h);
            Some(adapt::linear_b(h, dim, false, vb.pp("text_projection"))?)
        } else {
            None
        };
        Ok(Self { config, activation, token_embedding, position_embedding, layers, final_layer_norm, text_projection })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    fn causal_mask(len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> =
            (0..len).flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        Tensor::from_vec(mask, (len, len), device)?.to_dtype(dtype)
    }

    /// The hidden state A1111's "clip skip" `skip` picks (1: the last layer; 2: the one before, ...), through
    /// the final layer norm: transformers' `hidden_states[-skip]` normed, as diffusers' `clip_skip = skip - 1`.
    pub fn forward_clip_skip(&self, input_ids: &Tensor, skip: usize) -> Result<Tensor> {
        let n = self.layers.len();
        if skip == 0 || skip > n {
            candle_core::bail!("clip skip must be between 1 and {n} (the encoder's layers), got {skip}");
        }
        let (_, len) = input_ids.dims2()?;
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, len as u32, device)?;
        let mut x =
            self.token_embedding.forward(input_ids)?.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = Self::causal_mask(len, x.dtype(), device)?;
        for layer in &self.layers[..n + 1 - skip] {
            x = layer.forward(&x, &mask, self.config.num_attention_heads, self.activation)?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// Encodes token ids `[B, L]` (u32).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipOutput> {
        let (b, len) = input_ids.dims2()?;
        if len > self.config.max_position_embeddings {
            candle_core::bail!(
                "{len} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            );
        }
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, len as u32, device)?;
        let mut x =
            self.token_embedding.forward(input_ids)?.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = Self::causal_mask(len, x.dtype(), device)?;
        let heads = self.config.num_attention_heads;
        let n = self.layers.len();
        let mut penultimate = (n == 1).then(|| x.clone());
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &mask, heads, self.activation)?;
            if i + 2 == n {
                penultimate = Some(x.clone());
            }
        }
        let last = self.final_layer_norm.forward(&x)?;
        // transformers: the first EOS position (or, for legacy configs with eos_token_id == 2, the argmax id).
        let ids: Vec<Vec<u32>> = input_ids.to_vec2()?;
        let eos = self.config.eos_token_id;
        let mut rows = Vec::with_capacity(b);
        for (i, row) in ids.iter().enumerate() {
            let pos = if eos == 2 {
                row.iter().enumerate().max_by_key(|(_, &v)| v).map(|(p, _)| p).unwrap_or(0)
            } else {
                row.iter().position(|&v| v == eos).unwrap_or(0)
            };
            rows.push(last.get(i)?.get(pos)?.unsqueeze(0)?);
        }
        let pooled = Tensor::cat(&rows, 0)?;
        let pooled = match &self.text_projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        let penultimate = penultimate.unwrap_or_else(|| last.clone());
        Ok(ClipOutput { last_hidden_state: last, penultimate_hidden_state: penultimate, pooled })
    }
}
