//! diffusers' `UNet2DConditionModel`, built from its `config.json`: SD 1.x (conv projections, one head
//! count), SD 2.x (linear projections, per-block head counts), SDXL (per-block transformer depth and the
//! `text_time` add-embedding) and inpainting UNets (9 input channels) all come from the same code.

use anyhow::{bail, Context};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::conv::Conv2d;
use super::embeddings::{sinusoidal_embedding, to_model_dtype, TimestepEmbedding};
use super::group_norm::{group_norm, GroupNorm};
use super::resnet::{conv3x3, TimeInjection};
use super::unet_2d_blocks::{BlockCommon, CrossAttention, DownBlock, MidBlock, UpBlock};

/// A config value diffusers allows as one value for every block or as a per-block list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    pub(crate) fn expand(&self, field: &str, blocks: usize) -> anyhow::Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; blocks]),
            PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Each(v) => bail!("unet config: `{field}` has {} entries but there are {blocks} blocks", v.len()),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_channels() -> usize {
    4
}
fn default_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn default_one_usize() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn default_padding() -> usize {
    1
}
fn default_scale() -> f64 {
    1.0
}
fn default_groups() -> Option<usize> {
    Some(32)
}
fn default_eps() -> f64 {
    1e-5
}
fn default_cross_dim() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn default_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_false() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_shift() -> String {
    "default".into()
}
fn default_silu() -> String {
    "silu".into()
}
fn default_positional() -> String {
    "positional".into()
}
fn default_attention_type() -> String {
    "default".into()
}
fn default_kernel() -> usize {
    3
}

/// `unet/config.json`, with diffusers' defaults for missing keys. Settings this implementation cannot
/// express are kept so that [`UNet2DConditionConfig::validate`] can name them.
#[derive(Clone, Debug, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_false")]
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "default_padding")]
    pub downsample_padding: usize,
    #[serde(default = "default_scale")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_cross_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "default_one_usize")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<usize>>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "default_scale")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "default_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "default_attention_type")]
    pub attention_type: String,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
}

/// Per-block values after diffusers' expansion rules.
#[derive(Clone, Debug)]
struct Expanded {
    layers: Vec<usize>,
    heads: Vec<usize>,
    cross_dim: Vec<usize>,
    transformer_layers: Vec<usize>,
    reverse_transformer_layers: Vec<usize>,
}

impl UNet2DConditionConfig {
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a UNet2DConditionModel config", path.display()))
    }

    /// Rejects settings this implementation does not compute, naming the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let unsupported = |key: &str, value: &dyn std::fmt::Debug| -> anyhow::Result<()> {
            bail!("unet config: `{key}` = {value:?} is not supported")
        };
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("unet config: `block_out_channels` is empty");
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!("unet config: `down_block_types` and `up_block_types` must each have one entry per `block_out_channels` entry ({n})");
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                unsupported("down_block_types", t)?;
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                unsupported("up_block_types", t)?;
            }
        }
        match self.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2DCrossAttn") => {}
            Some(other) => unsupported("mid_block_type", &other)?,
        }
        if self.act_fn != "silu" {
            unsupported("act_fn", &self.act_fn)?;
        }
        if self.time_embedding_type != "positional" {
            unsupported("time_embedding_type", &self.time_embedding_type)?;
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            unsupported("class_embed_type", &self.class_embed_type)?;
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time")
                if self.addition_time_embed_dim.is_none() || self.projection_class_embeddings_input_dim.is_none() =>
            {
                bail!("unet config: `addition_embed_type` text_time needs `addition_time_embed_dim` and `projection_class_embeddings_input_dim`");
            }
            Some("text_time") => {}
            Some(other) => unsupported("addition_embed_type", &other)?,
        }
        if self.encoder_hid_dim.is_some() {
            unsupported("encoder_hid_dim", &self.encoder_hid_dim)?;
        }
        if self.time_cond_proj_dim.is_some() {
            unsupported("time_cond_proj_dim", &self.time_cond_proj_dim)?;
        }
        if self.time_embedding_act_fn.is_some() {
            unsupported("time_embedding_act_fn", &self.time_embedding_act_fn)?;
        }
        if self.timestep_post_act.is_some() {
            unsupported("timestep_post_act", &self.timestep_post_act)?;
        }
        if self.dual_cross_attention {
            unsupported("dual_cross_attention", &true)?;
        }
        if self.resnet_skip_time_act {
            unsupported("resnet_skip_time_act", &true)?;
        }
        if self.attention_type != "default" {
            unsupported("attention_type", &self.attention_type)?;
        }
        if self.cross_attention_norm.is_some() {
            unsupported("cross_attention_norm", &self.cross_attention_norm)?;
        }
        if self.conv_in_kernel != 3 || self.conv_out_kernel != 3 {
            unsupported("conv_in_kernel/conv_out_kernel", &(self.conv_in_kernel, self.conv_out_kernel))?;
        }
        if self.only_cross_attention.expand("only_cross_attention", n)?.iter().any(|&b| b) {
            unsupported("only_cross_attention", &true)?;
        }
        if !matches!(self.resnet_time_scale_shift.as_str(), "default" | "scale_shift") {
            unsupported("resnet_time_scale_shift", &self.resnet_time_scale_shift)?;
        }
        let groups = self.norm_num_groups.context("unet config: `norm_num_groups` = null is not supported")?;
        if groups == 0 {
            bail!("unet config: `norm_num_groups` must be at least 1, not 0");
        }
        let e = self.expanded()?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c % groups != 0 {
                bail!("unet config: block {i} has {c} channels, not a multiple of `norm_num_groups` {groups}");
            }
            if e.heads[i] == 0 || c % e.heads[i] != 0 {
                bail!("unet config: block {i} has {c} channels, not divisible into {} attention heads", e.heads[i]);
            }
        }
        Ok(())
    }

    fn expanded(&self) -> anyhow::Result<Expanded> {
        let n = self.block_out_channels.len();
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim` (a historical naming
        // mix-up: in SD configs `attention_head_dim` holds the number of heads).
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand("num_attention_heads", n)?,
            None => self.attention_head_dim.expand("attention_head_dim", n)?,
        };
        let transformer_layers = self.transformer_layers_per_block.expand("transformer_layers_per_block", n)?;
        let reverse_transformer_layers = match &self.reverse_transformer_layers_per_block {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => {
                bail!("unet config: `reverse_transformer_layers_per_block` has {} entries, expected {n}", v.len())
            }
            None => transformer_layers.iter().rev().copied().collect(),
        };
        Ok(Expanded {
            layers: self.layers_per_block.expand("layers_per_block", n)?,
            heads,
            cross_dim: self.cross_attention_dim.expand("cross_attention_dim", n)?,
            transformer_layers,
            reverse_transformer_layers,
        })
    }

    /// Width of the text embeddings the UNet attends to (the last block's, as diffusers checks).
    pub fn context_dim(&self) -> usize {
        match &self.cross_attention_dim {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.last().copied().unwrap_or(0),
        }
    }

    /// The pixel size the model was trained at (`sample_size` × VAE factor), 512 when unknown.
    pub fn sample_size_px(&self, vae_scale_factor: usize) -> usize {
        self.sample_size.map(|s| s * vae_scale_factor).unwrap_or(512)
    }

    /// Number of ×2 resamplings between the latent and the deepest block.
    pub fn num_upsamplers(&self) -> usize {
        self.block_out_channels.len() - 1
    }
}

/// SDXL's extra conditioning: the pooled text embedding and the size/crop time ids.
#[derive(Clone, Debug)]
pub struct AddedConditions {
    /// `[B, pooled_dim]`, in the model dtype.
    pub text_embeds: Tensor,
    /// One row per batch item: `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`.
    pub time_ids: Vec<Vec<f64>>,
}

#[derive(Debug)]
struct AddEmbedding {
    time_dim: usize,
    embedding: TimestepEmbedding,
}

/// The UNet. Call [`UNet2DConditionModel::forward`] with latents `[B, C, H/8, W/8]`, one timestep and the
/// text embeddings `[B, 77, context_dim]`.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<AddEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, config: UNet2DConditionConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let e = config.expanded()?;
        let channels = &config.block_out_channels;
        let n = channels.len();
        let groups = config.norm_num_groups.unwrap_or(32);
        let time_dim = config.time_embedding_dim.unwrap_or(channels[0] * 4);
        let common = BlockCommon {
            temb_channels: time_dim,
            groups,
            eps: config.norm_eps,
            time_injection: if config.resnet_time_scale_shift == "scale_shift" {
                TimeInjection::ScaleShift
            } else {
                TimeInjection::Add
            },
            resnet_output_scale: config.resnet_out_scale_factor,
            linear_projection: config.use_linear_projection,
        };

        let conv_in = conv3x3(vb.pp("conv_in"), config.in_channels, channels[0])?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], time_dim)?;
        let add_embedding = match config.addition_embed_type.as_deref() {
            Some("text_time") => Some(AddEmbedding {
                time_dim: config.addition_time_embed_dim.unwrap_or(0),
                embedding: TimestepEmbedding::new(
                    vb.pp("add_embedding"),
                    config.projection_class_embeddings_input_dim.unwrap_or(0),
                    time_dim,
                )?,
            }),
            _ => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut c_out = channels[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let c_in = c_out;
            c_out = channels[i];
            let cross = (kind == "CrossAttnDownBlock2D").then_some(CrossAttention {
                heads: e.heads[i],
                layers: e.transformer_layers[i],
                context_dim: e.cross_dim[i],
            });
            down_blocks.push(DownBlock::new(
                vb.pp(format!("down_blocks.{i}")),
                &common,
                e.layers[i],
                c_in,
                c_out,
                cross,
                i + 1 < n,
                config.downsample_padding,
            )?);
        }

        let mid_block = match config.mid_block_type.as_deref() {
            Some(_) => Some(MidBlock::new(
                vb.pp("mid_block"),
                &common,
                channels[n - 1],
                CrossAttention {
                    heads: e.heads[n - 1],
                    layers: e.transformer_layers[n - 1],
                    context_dim: e.cross_dim[n - 1],
                },
                config.mid_block_scale_factor,
            )?),
            None => None,
        };

        let rev_channels: Vec<usize> = channels.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = e.heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = e.layers.iter().rev().copied().collect();
        let rev_cross: Vec<usize> = e.cross_dim.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut c_out = rev_channels[0];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let c_prev = c_out;
            c_out = rev_channels[i];
            let c_in = rev_channels[(i + 1).min(n - 1)];
            let cross = (kind == "CrossAttnUpBlock2D").then_some(CrossAttention {
                heads: rev_heads[i],
                layers: e.reverse_transformer_layers[i],
                context_dim: rev_cross[i],
            });
            up_blocks.push(UpBlock::new(
                vb.pp(format!("up_blocks.{i}")),
                &common,
                rev_layers[i] + 1,
                c_in,
                c_prev,
                c_out,
                cross,
                i + 1 < n,
            )?);
        }

        Ok(Self {
            conv_norm_out: group_norm(groups, channels[0], config.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(vb.pp("conv_out"), channels[0], config.out_channels)?,
            config,
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// Whether the UNet needs SDXL's [`AddedConditions`].
    pub fn needs_added_conditions(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// One denoising prediction. `timestep` is broadcast over the batch.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        let _profile = super::profile::scope("unet");
        let (batch, _, h, w) = sample.dims4()?;
        let dtype = sample.dtype();
        let device = sample.device();
        let channels0 = self.config.block_out_channels[0];
        let t = sinusoidal_embedding(
            &vec![timestep; batch],
            channels0,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            device,
        )?;
        let mut emb = self.time_embedding.forward(&to_model_dtype(t, dtype)?)?;
        if let Some(add) = &self.add_embedding {
            let added = added.ok_or_else(|| {
                candle_core::Error::Msg("this UNet (SDXL) needs pooled text embeddings and time ids".into())
            })?;
            let flat: Vec<f64> = added.time_ids.iter().flatten().copied().collect();
            let time =
                sinusoidal_embedding(&flat, add.time_dim, self.config.flip_sin_to_cos, self.config.freq_shift, device)?
                    .reshape((added.time_ids.len(), ()))?;
            let input = Tensor::cat(&[added.text_embeds.to_dtype(dtype)?, to_model_dtype(time, dtype)?], 1)?;
            emb = (emb + add.embedding.forward(&input)?)?;
        }

        let up_factor = 1usize << self.config.num_upsamplers();
        let explicit_upsample = h % up_factor != 0 || w % up_factor != 0;

        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(&x, &emb, context, &mut skips)?;
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(&x, &emb, context)?;
        }
        let last = self.up_blocks.len() - 1;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let take = block.num_layers();
            let block_skips = skips.split_off(skips.len() - take);
            let size = if i < last && explicit_upsample {
                let next = skips.last().expect("a skip connection for every up block");
                Some((next.dim(2)?, next.dim(3)?))
            } else {
                None
            };
            x = block.forward(&x, &block_skips, &emb, context, size)?;
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}
