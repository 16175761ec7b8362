//! Convolutional building blocks shared by the UNet and the VAE: diffusers' `ResnetBlock2D`,
//! `Downsample2D` and `Upsample2D`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::adapt::{self, Linear};
use super::conv::{conv2d, Conv2d};
use super::layer_tail::ConvTail;

use super::group_norm::{group_norm, GroupNorm};

pub fn conv3x3(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding: 1, ..Default::default() };
    conv2d(c_in, c_out, 3, cfg, vb)
}

/// How a ResNet block injects the time embedding (diffusers' `resnet_time_scale_shift`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeInjection {
    /// `h = h + proj(emb)` before the second norm.
    Add,
    /// `h = norm2(h) * (1 + scale) + shift` with `[scale, shift] = proj(emb)`.
    ScaleShift,
}

/// Shape of a [`ResnetBlock2D`].
#[derive(Clone, Copy, Debug)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding; `None` for the VAE's blocks.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
    pub time_injection: TimeInjection,
}

/// diffusers' `ResnetBlock2D`: GroupNorm → SiLU → conv, plus the time embedding, GroupNorm → SiLU → conv,
/// added to a (1×1-projected when the width changes) shortcut.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    cfg: ResnetConfig,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: ResnetConfig) -> Result<Self> {
        let (c_in, c_out) = (cfg.in_channels, cfg.out_channels);
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => {
                let width = match cfg.time_injection {
                    TimeInjection::Add => c_out,
                    TimeInjection::ScaleShift => 2 * c_out,
                };
                Some(adapt::linear(t, width, vb.pp("time_emb_proj"))?)
            }
            None => None,
        };
        let conv_shortcut = if c_in != c_out {
            Some(conv2d(c_in, c_out, 1, Default::default(), vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(cfg.groups, c_in, cfg.eps, vb.pp("norm1"))?,
            conv1: conv3x3(vb.pp("conv1"), c_in, c_out)?,
            time_emb_proj,
            norm2: group_norm(cfg.groups, c_out, cfg.eps, vb.pp("norm2"))?,
            conv2: conv3x3(vb.pp("conv2"), c_out, c_out)?,
            conv_shortcut,
            cfg,
        })
    }

    /// The additions ride on the convolutions' tails ([`ConvTail`]): the time shift on conv1's, the shortcut
    /// and the output scale on conv2's, fused into one pass each on CUDA.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let _profile = super::profile::scope("resnet");
        let normed = self.norm1.forward_silu(x)?;
        let time = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&temb.silu()?)?),
            _ => None,
        };
        let h = match (self.cfg.time_injection, time) {
            (TimeInjection::ScaleShift, Some(t)) => {
                let h = self.conv1.forward(&normed)?;
                let (c, t) = (self.cfg.out_channels, t.unsqueeze(2)?.unsqueeze(3)?);
                let scale = (t.narrow(1, 0, c)? + 1.0)?;
                let shift = t.narrow(1, c, c)?;
                self.norm2.forward(&h)?.broadcast_mul(&scale)?.broadcast_add(&shift)?.silu()?
            }
            (_, shift) => {
                let h = self.conv1.forward_tail(&normed, ConvTail { shift: shift.as_ref(), ..ConvTail::NONE })?;
                self.norm2.forward_silu(&h)?
            }
        };
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let tail = ConvTail { shift: None, residual: Some(&shortcut), divisor: self.cfg.output_scale_factor };
        self.conv2.forward_tail(&h, tail)
    }
}

/// diffusers' `Downsample2D` with a convolution: stride-2 3×3 conv; with `padding == 0` (the VAE) the input
/// is first padded by one on the right and bottom only.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    asymmetric_pad: bool,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let cfg = Conv2dConfig { padding, stride: 2, ..Default::default() };
        Ok(Self { conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))?, asymmetric_pad: padding == 0 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = super::profile::scope("downsample");
        if self.asymmetric_pad {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest-neighbour upsampling (×2, or to an explicit size when
/// the latent is not a multiple of the UNet's overall factor) followed by a 3×3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { conv: conv3x3(vb.pp("conv"), channels, channels)? })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let _profile = super::profile::scope("upsample");
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}
