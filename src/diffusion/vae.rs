//! diffusers' `AutoencoderKL`, built from its `config.json`: the encoder (image → posterior mean, used by
//! img2img and inpainting) and the decoder (latents → image), with the optional quant convolutions and the
//! latent scaling/shift the pipelines apply around them.

use anyhow::{bail, Context};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::attention::SpatialSelfAttention;
use super::conv::{conv2d, Conv2d};
use super::group_norm::{group_norm, GroupNorm};
use super::resnet::{conv3x3, Downsample2D, ResnetBlock2D, ResnetConfig, TimeInjection, Upsample2D};

fn default_three() -> usize {
    3
}
fn default_four() -> usize {
    4
}
fn default_one() -> usize {
    1
}
fn default_groups() -> usize {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}
fn default_silu() -> String {
    "silu".into()
}

/// `vae/config.json`, with diffusers' defaults for missing keys.
#[derive(Clone, Debug, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_one")]
    pub layers_per_block: usize,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_four")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Run this VAE in f32 even when the pipeline runs in f16 (the SDXL VAE overflows in f16).
    #[serde(default)]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// The image side the VAE was trained at: tiled decoding works in tiles of this size. An int, or
    /// `[h, w]` (the first is used, as diffusers does).
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

impl AutoencoderKLConfig {
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let config: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is not an AutoencoderKL config", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.block_out_channels.is_empty() {
            bail!("vae config: `block_out_channels` is empty");
        }
        if self.act_fn != "silu" {
            bail!("vae config: `act_fn` = {:?} is not supported", self.act_fn);
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                bail!("vae config: `down_block_types` entry {t:?} is not supported");
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                bail!("vae config: `up_block_types` entry {t:?} is not supported");
            }
        }
        if self.norm_num_groups == 0 {
            bail!("vae config: `norm_num_groups` must be at least 1, not 0");
        }
        if let Some(c) = self.block_out_channels.iter().find(|c| *c % self.norm_num_groups != 0) {
            bail!("vae config: {c} channels is not a multiple of `norm_num_groups` {}", self.norm_num_groups);
        }
        let per_channel = [("latents_mean", &self.latents_mean), ("latents_std", &self.latents_std)];
        for (key, v) in per_channel {
            if let Some(v) = v {
                if v.len() != self.latent_channels {
                    bail!(
                        "vae config: `{key}` has {} entries, expected `latent_channels` = {}",
                        v.len(),
                        self.latent_channels
                    );
                }
            }
        }
        Ok(())
    }

    /// Spatial downscale between pixels and latents (8 for every Stable Diffusion VAE).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The tile side of tiled decoding, in pixels: `sample_size` (diffusers' default 32 when absent).
    pub fn tile_size(&self) -> usize {
        let side = match &self.sample_size {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::Array(v)) => v.first().and_then(|n| n.as_u64()),
            _ => None,
        };
        (side.unwrap_or(32) as usize).max(self.scale_factor())
    }

    /// Whether latents `h × w` are decoded in tiles when the caller leaves it to the VAE: past 1536 × 1536
    /// pixels (e.g. 2048 × 2048), where decoding whole takes well over 10 GB, and only when that is at least
    /// two tiles across. Smaller images decode whole, exactly as diffusers decodes them by default.
    pub fn tiles_by_default(&self, h: usize, w: usize) -> bool {
        const MOST_PIXELS_WHOLE: usize = 1536 * 1536;
        let f = self.scale_factor();
        let tile = self.tile_size() / f;
        h * w * f * f > MOST_PIXELS_WHOLE && h.max(w) >= 2 * tile
    }
}

fn vae_resnet(vb: VarBuilder, c_in: usize, c_out: usize, groups: usize) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        vb,
        ResnetConfig {
            in_channels: c_in,
            out_channels: c_out,
            temb_channels: None,
            groups,
            eps: 1e-6,
            output_scale_factor: 1.0,
            time_injection: TimeInjection::Add,
        },
    )
}

/// `UNetMidBlock2D` without time embedding: ResNet, optional self-attention, ResNet.
#[derive(Debug)]
struct VaeMidBlock {
    resnet_0: ResnetBlock2D,
    attention: Option<SpatialSelfAttention>,
    resnet_1: ResnetBlock2D,
}

impl VaeMidBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize, attention: bool) -> Result<Self> {
        Ok(Self {
            resnet_0: vae_resnet(vb.pp("resnets.0"), channels, channels, groups)?,
            attention: if attention {
                Some(SpatialSelfAttention::new(vb.pp("attentions.0"), channels, groups, 1e-6)?)
            } else {
                None
            },
            resnet_1: vae_resnet(vb.pp("resnets.1"), channels, channels, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet_0.forward(x, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.resnet_1.forward(&h, None)
    }
}

#[derive(Debug)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<EncoderBlock>,
    mid: VaeMidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut blocks = Vec::with_capacity(ch.len());
        let mut c_out = ch[0];
        for i in 0..ch.len() {
            let c_in = c_out;
            c_out = ch[i];
            let bvb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| vae_resnet(bvb.pp(format!("resnets.{j}")), if j == 0 { c_in } else { c_out }, c_out, g))
                .collect::<Result<Vec<_>>>()?;
            let downsampler =
                if i + 1 < ch.len() { Some(Downsample2D::new(bvb.pp("downsamplers.0"), c_out, 0)?) } else { None };
            blocks.push(EncoderBlock { resnets, downsampler });
        }
        let last = *ch.last().unwrap();
        Ok(Self {
            conv_in: conv3x3(vb.pp("conv_in"), cfg.in_channels, ch[0])?,
            blocks,
            mid: VaeMidBlock::new(vb.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            norm_out: group_norm(g, last, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(vb.pp("conv_out"), last, 2 * cfg.latent_channels)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.blocks {
            for r in &block.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = &block.downsampler {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

#[derive(Debug)]
struct DecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: VaeMidBlock,
    blocks: Vec<DecoderBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut blocks = Vec::with_capacity(rev.len());
        let mut c_out = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let c_in = c_out;
            c_out = c;
            let bvb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| vae_resnet(bvb.pp(format!("resnets.{j}")), if j == 0 { c_in } else { c_out }, c_out, g))
                .collect::<Result<Vec<_>>>()?;
            let upsampler =
                if i + 1 < rev.len() { Some(Upsample2D::new(bvb.pp("upsamplers.0"), c_out)?) } else { None };
            blocks.push(DecoderBlock { resnets, upsampler });
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: conv3x3(vb.pp("conv_in"), cfg.latent_channels, rev[0])?,
            mid: VaeMidBlock::new(vb.pp("mid_block"), rev[0], g, cfg.mid_block_add_attention)?,
            blocks,
            norm_out: group_norm(g, first, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(vb.pp("conv_out"), first, cfg.out_channels)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for block in &self.blocks {
            for r in &block.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = &block.upsampler {
                h = u.forward(&h, None)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// Runs after each tile of a tiled decode; an error it returns ends the decode with that error.
pub type AfterTile<'a> = &'a mut dyn FnMut() -> Result<()>;

/// The VAE. Pixels are `[B, 3, H, W]` in [-1, 1]; latents are `[B, C, H/8, W/8]`, already scaled the way the
/// UNet sees them.
#[derive(Debug)]
pub struct AutoencoderKL {
    config: AutoencoderKLConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

/// diffusers' `blend_v` (`dim` 2) and `blend_h` (`dim` 3): the first `extent` rows (columns) of `b` fade from
/// the last ones of `a` to `b`'s own, `b = a · (1 - t/extent) + b · t/extent` at row t.
fn blend_into(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let mut shape = [1usize; 4];
    shape[dim] = extent;
    let to_b: Vec<f32> = (0..extent).map(|t| (t as f64 / extent as f64) as f32).collect();
    let to_a: Vec<f32> = (0..extent).map(|t| (1.0 - t as f64 / extent as f64) as f32).collect();
    let to_b = Tensor::from_vec(to_b, &shape[..], b.device())?.to_dtype(b.dtype())?;
    let to_a = Tensor::from_vec(to_a, &shape[..], b.device())?.to_dtype(b.dtype())?;
    let a_end = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let blended = (a_end.broadcast_mul(&to_a)? + b.narrow(dim, 0, extent)?.broadcast_mul(&to_b)?)?;
    let rest = b.dim(dim)? - extent;
    if rest == 0 {
        return Ok(blended);
    }
    Tensor::cat(&[&blended, &b.narrow(dim, extent, rest)?], dim)
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, config: AutoencoderKLConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let lc = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(conv2d(2 * lc, 2 * lc, 1, Default::default(), vb.pp("quant_conv"))?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d(lc, lc, 1, Default::default(), vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), &config)?,
            decoder: Decoder::new(vb.pp("decoder"), &config)?,
            quant_conv,
            post_quant_conv,
            config,
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Posterior mean of `pixels` (in [-1, 1]), unscaled.
    pub fn encode_mean(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut moments = self.encoder.forward(pixels)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        moments.narrow(1, 0, self.config.latent_channels)
    }

    /// Raw decoder output (≈ [-1, 1]) of unscaled latents.
    pub fn decode_raw(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    fn per_channel(&self, values: &[f64], like: &Tensor) -> Result<Tensor> {
        let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
        Tensor::from_vec(v, (1, values.len(), 1, 1), like.device())?.to_dtype(like.dtype())
    }

    /// [`Self::decode_raw`] in overlapping tiles, as diffusers' `enable_vae_tiling()` decodes: tiles of
    /// `tile_size` pixels every three quarters of a tile, each blended into the one above and the one to its
    /// left over a quarter tile, in that order. Memory stays that of one tile plus two rows of tiles and the
    /// image, whatever the image size.
    pub fn decode_raw_tiled(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_raw_tiled_with(z, &mut || Ok(()))
    }

    /// [`Self::decode_raw_tiled`], calling `after_tile` after each tile: a large image takes minutes in
    /// tiles on a CPU, and a caller wants signs of life, or to stop (an error from it ends the decode).
    pub fn decode_raw_tiled_with(&self, z: &Tensor, after_tile: AfterTile) -> Result<Tensor> {
        let tile_sample = self.config.tile_size();
        let tile_latent = tile_sample / self.config.scale_factor();
        let step = ((tile_latent as f64 * 0.75) as usize).max(1);
        let blend = (tile_sample as f64 * 0.25) as usize;
        let keep = tile_sample - blend;
        let (_, _, h, w) = z.dims4()?;
        let mut above: Vec<Tensor> = Vec::new();
        let mut rows = Vec::new();
        for y in (0..h).step_by(step) {
            let mut row: Vec<Tensor> = Vec::new();
            let mut kept = Vec::new();
            for (k, x) in (0..w).step_by(step).enumerate() {
                let tile = z.narrow(2, y, tile_latent.min(h - y))?.narrow(3, x, tile_latent.min(w - x))?;
                let mut decoded = self.decode_raw(&tile)?;
                after_tile()?;
                if let Some(a) = above.get(k) {
                    decoded = blend_into(a, &decoded, blend, 2)?;
                }
                if let Some(left) = row.last() {
                    decoded = blend_into(left, &decoded, blend, 3)?;
                }
                let (_, _, dh, dw) = decoded.dims4()?;
                kept.push(decoded.narrow(2, 0, keep.min(dh))?.narrow(3, 0, keep.min(dw))?);
                row.push(decoded);
            }
            rows.push(Tensor::cat(&kept, 3)?);
            above = row;
        }
        Tensor::cat(&rows, 2)
    }

    /// Whether latents `h × w` decode in tiles: as `requested`, else as the config's default.
    pub fn decodes_in_tiles(&self, h: usize, w: usize, requested: Option<bool>) -> bool {
        requested.unwrap_or_else(|| self.config.tiles_by_default(h, w))
    }

    /// Pipeline latents → image in [0, 1], as diffusers' pipelines do it (undo scaling / shift / per-channel
    /// statistics, decode, `(x / 2 + 0.5).clamp(0, 1)`), decoding whole or in tiles (`None`: see
    /// [`AutoencoderKLConfig::tiles_by_default`]).
    pub fn decode_to_image(&self, latents: &Tensor, tiled: Option<bool>) -> Result<Tensor> {
        self.decode_to_image_with(latents, tiled, &mut || Ok(()))
    }

    /// [`Self::decode_to_image`], calling `after_tile` after each tile when it decodes in tiles.
    pub fn decode_to_image_with(&self, latents: &Tensor, tiled: Option<bool>, after_tile: AfterTile) -> Result<Tensor> {
        self.decode_to_unclamped_image_with(latents, tiled, after_tile)?.clamp(0.0, 1.0)
    }

    /// [`Self::decode_to_image_with`] before the clamp to [0, 1]: where a blown-up decode is still seen (a clamp
    /// turns inf, and on CUDA and MKL NaN too, into 0 or 1).
    pub fn decode_to_unclamped_image_with(
        &self,
        latents: &Tensor,
        tiled: Option<bool>,
        after_tile: AfterTile,
    ) -> Result<Tensor> {
        let c = &self.config;
        let z = match (&c.latents_mean, &c.latents_std) {
            (Some(mean), Some(std)) => latents
                .broadcast_mul(&self.per_channel(std, latents)?)?
                .affine(1.0 / c.scaling_factor, 0.0)?
                .broadcast_add(&self.per_channel(mean, latents)?),
            _ => (latents / c.scaling_factor)? + c.shift_factor.unwrap_or(0.0),
        }?;
        let (_, _, h, w) = z.dims4()?;
        let image = if self.decodes_in_tiles(h, w, tiled) {
            self.decode_raw_tiled_with(&z, after_tile)?
        } else {
            self.decode_raw(&z)?
        };
        image.affine(0.5, 0.5)
    }

    /// Image in [0, 1] → pipeline latents (posterior mean, shifted and scaled as the UNet expects).
    pub fn encode_image(&self, image: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let mean = self.encode_mean(&image.affine(2.0, -1.0)?)?;
        match (&c.latents_mean, &c.latents_std) {
            (Some(m), Some(s)) => mean
                .broadcast_sub(&self.per_channel(m, &mean)?)?
                .affine(c.scaling_factor, 0.0)?
                .broadcast_div(&self.per_channel(s, &mean)?),
            _ => (mean - c.shift_factor.unwrap_or(0.0))? * c.scaling_factor,
        }
    }
}
