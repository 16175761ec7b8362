//! The UNet's down, mid and up blocks (diffusers' `CrossAttnDownBlock2D`, `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`, `UpBlock2D`), each a stack of ResNet blocks with
//! optional transformers and a resampler.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{Transformer2D, Transformer2DConfig};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, TimeInjection, Upsample2D};

/// Settings every block of one UNet shares.
#[derive(Clone, Copy, Debug)]
pub struct BlockCommon {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub time_injection: TimeInjection,
    pub resnet_output_scale: f64,
    pub linear_projection: bool,
}

impl BlockCommon {
    fn resnet(&self, vb: VarBuilder, c_in: usize, c_out: usize) -> Result<ResnetBlock2D> {
        ResnetBlock2D::new(
            vb,
            ResnetConfig {
                in_channels: c_in,
                out_channels: c_out,
                temb_channels: Some(self.temb_channels),
                groups: self.groups,
                eps: self.eps,
                output_scale_factor: self.resnet_output_scale,
                time_injection: self.time_injection,
            },
        )
    }

    fn transformer(&self, vb: VarBuilder, channels: usize, cross: &CrossAttention) -> Result<Transformer2D> {
        Transformer2D::new(
            vb,
            Transformer2DConfig {
                channels,
                heads: cross.heads,
                layers: cross.layers,
                context_dim: cross.context_dim,
                groups: self.groups,
                linear_projection: self.linear_projection,
            },
        )
    }
}

/// The cross-attention settings of one block: heads, transformer depth, text-embedding width.
#[derive(Clone, Copy, Debug)]
pub struct CrossAttention {
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
}

/// A down block: `layers` ResNets (each followed by a transformer when `cross` is set), then an optional
/// stride-2 downsampler. Returns its output and every intermediate state for the skip connections.
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        common: &BlockCommon,
        layers: usize,
        c_in: usize,
        c_out: usize,
        cross: Option<CrossAttention>,
        add_downsample: bool,
        downsample_padding: usize,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let input = if i == 0 { c_in } else { c_out };
            resnets.push(common.resnet(vb.pp(format!("resnets.{i}")), input, c_out)?);
            if let Some(cross) = &cross {
                attentions.push(common.transformer(vb.pp(format!("attentions.{i}")), c_out, cross)?);
            }
        }
        let downsampler = if add_downsample {
            Some(Downsample2D::new(vb.pp("downsamplers.0"), c_out, downsample_padding)?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, downsampler })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let _profile = super::profile::scope("down_block");
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DCrossAttn`: ResNet, then (transformer, ResNet) × 1.
#[derive(Debug)]
pub struct MidBlock {
    first: ResnetBlock2D,
    rest: Vec<(Transformer2D, ResnetBlock2D)>,
}

impl MidBlock {
    pub fn new(
        vb: VarBuilder,
        common: &BlockCommon,
        channels: usize,
        cross: CrossAttention,
        scale: f64,
    ) -> Result<Self> {
        let common = BlockCommon { resnet_output_scale: scale, ..*common };
        let first = common.resnet(vb.pp("resnets.0"), channels, channels)?;
        let rest = vec![(
            common.transformer(vb.pp("attentions.0"), channels, &cross)?,
            common.resnet(vb.pp("resnets.1"), channels, channels)?,
        )];
        Ok(Self { first, rest })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let _profile = super::profile::scope("mid_block");
        let mut h = self.first.forward(x, Some(temb))?;
        for (attn, resnet) in &self.rest {
            h = resnet.forward(&attn.forward(&h, context)?, Some(temb))?;
        }
        Ok(h)
    }
}

/// An up block: `layers` ResNets, each fed the concatenation of the running state and one skip connection
/// (taken from the end of the list), each followed by a transformer when `cross` is set, then an optional
/// upsampler.
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        common: &BlockCommon,
        layers: usize,
        c_in: usize,
        c_prev: usize,
        c_out: usize,
        cross: Option<CrossAttention>,
        add_upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 { c_in } else { c_out };
            let input = if i == 0 { c_prev } else { c_out };
            resnets.push(common.resnet(vb.pp(format!("resnets.{i}")), input + skip, c_out)?);
            if let Some(cross) = &cross {
                attentions.push(common.transformer(vb.pp(format!("attentions.{i}")), c_out, cross)?);
            }
        }
        let upsampler = if add_upsample { Some(Upsample2D::new(vb.pp("upsamplers.0"), c_out)?) } else { None };
        Ok(Self { resnets, attentions, upsampler })
    }

    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are this block's skip connections in the order the down path produced them.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let _profile = super::profile::scope("up_block");
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = &skips[skips.len() - 1 - i];
            h = resnet.forward(&Tensor::cat(&[&h, skip], 1)?, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&h, upsample_size),
            None => Ok(h),
        }
    }
}
