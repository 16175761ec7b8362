//! Single-file checkpoints: the one `.safetensors` file in the original LDM/SGM layout that most fine-tunes
//! are published as (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` or
//! `conditioner.embedders.*`).
//!
//! Loading one is three steps, each its own concern: [`Checkpoint::open`] maps the file and reads what it
//! is from its tensor names and shapes ([`detect`]); the architecture, scheduler and tokenizers come from a
//! diffusers folder (`--config DIR`) or from the built-in configurations of the real SD 1.5, 2.1 and XL
//! ([`configs`]); then each component is built from the file through a [`names`] map, tensor by tensor from
//! the mapping, without converting the file or holding it twice.

pub mod configs;
pub mod names;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::unet_2d::UNet2DConditionConfig;
use super::weights::{renamed_var_builder, ReleasingSafetensors};
use names::UnetNumbering;

/// The model families a checkpoint can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: one CLIP ViT-L text encoder under `cond_stage_model.transformer.`.
    Sd1,
    /// SD 2.x: an OpenCLIP ViT-H text tower under `cond_stage_model.model.`.
    Sd2,
    /// SDXL: CLIP ViT-L and OpenCLIP ViT-bigG under `conditioner.embedders.0/1`.
    Sdxl,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
        })
    }
}

/// What a checkpoint holds, read from its tensor names and shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Architecture {
    pub family: Family,
    /// A 9-channel (latents, mask, masked image) inpainting UNet.
    pub inpainting: bool,
    /// Whether the file carries a VAE (`first_stage_model.*`); without one, `--vae` must give it.
    pub has_vae: bool,
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.family, if self.inpainting { " inpainting" } else { "" })
    }
}

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
const SD1_CLIP: &str = "cond_stage_model.transformer.";
const SD2_OPEN_CLIP: &str = "cond_stage_model.model.";
const XL_CLIP: &str = "conditioner.embedders.0.transformer.";
const XL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";

/// Reads what a checkpoint is from its tensors' names and shapes; anything that is not an SD 1.x, 2.x or
/// XL pipeline checkpoint sd-rbee can run is an error that says what it looks like instead.
pub fn detect(shapes: &BTreeMap<String, Vec<usize>>) -> anyhow::Result<Architecture> {
    let any = |prefix: &str| shapes.range(prefix.to_string()..).next().is_some_and(|(k, _)| k.starts_with(prefix));
    let first = shapes.keys().next().cloned().unwrap_or_default();
    if !any(UNET_PREFIX) {
        if any("lora_unet_") || any("lora_te") || shapes.keys().any(|k| k.ends_with(".lora_A.weight")) {
            bail!("this is a LoRA, not a model: apply it with --lora");
        }
        if any("encoder.down.") || any("decoder.up.") || any("encoder.down_blocks.") {
            bail!("this is a VAE, not a model: give it with --vae");
        }
        if any("control_model.") {
            bail!("this is a ControlNet checkpoint, which sd-rbee does not run");
        }
        if any("down_blocks.") || shapes.contains_key("conv_in.weight") {
            bail!("this is one diffusers component (a UNet?), not a single-file checkpoint: use the pipeline folder");
        }
        bail!("not a Stable Diffusion checkpoint: it has no `{UNET_PREFIX}*` tensors (the first tensor is `{first}`)");
    }
    let family = if any(XL_OPEN_CLIP) && any(XL_CLIP) {
        Family::Sdxl
    } else if any("conditioner.embedders.0.model.") {
        bail!("SDXL refiner checkpoints are not supported (it has only the OpenCLIP text tower)");
    } else if any(SD2_OPEN_CLIP) {
        Family::Sd2
    } else if any(SD1_CLIP) {
        Family::Sd1
    } else if any("model.diffusion_model.joint_blocks.") || any("model.diffusion_model.double_blocks.") {
        bail!("this is an SD3 or Flux checkpoint; sd-rbee runs SD 1.x, 2.x and XL");
    } else {
        bail!(
            "a UNet without a text encoder sd-rbee recognises (no `{SD1_CLIP}*`, `{SD2_OPEN_CLIP}*` or \
             `conditioner.embedders.*`): give the whole checkpoint, or a diffusers folder"
        );
    };
    let conv_in = format!("{UNET_PREFIX}input_blocks.0.0.weight");
    let inputs = shapes.get(&conv_in).and_then(|s| s.get(1).copied()).unwrap_or(0);
    let inpainting = match inputs {
        4 => false,
        9 => true,
        8 => bail!("an instruct-pix2pix UNet (8 input channels) is not supported"),
        5 => bail!("a depth-conditioned UNet (5 input channels) is not supported"),
        n => bail!("`{conv_in}` takes {n} channels; expected 4, or 9 for inpainting"),
    };
    let has_vae = shapes.contains_key(&format!("{VAE_PREFIX}decoder.conv_in.weight"));
    Ok(Architecture { family, inpainting, has_vae })
}

/// A component to read from a checkpoint, with what its map needs.
pub enum Part<'a> {
    Unet(&'a UNet2DConditionConfig),
    /// The VAE; `up_blocks` is its decoder's block count.
    Vae {
        up_blocks: usize,
    },
    /// The first (or only) text encoder, with its hidden width (for OpenCLIP's stacked q/k/v).
    TextEncoder {
        width: usize,
    },
    TextEncoder2 {
        width: usize,
    },
}

/// A mapped single-file checkpoint.
pub struct Checkpoint {
    path: PathBuf,
    file: Arc<ReleasingSafetensors>,
    shapes: BTreeMap<String, Vec<usize>>,
    pub arch: Architecture,
}

/// Why a `.ckpt`-style file is refused.
pub const PICKLE_REFUSAL: &str = "is a Python pickle, which can run arbitrary code when it is loaded; sd-rbee reads \
     only .safetensors. Convert it once where you trust it, e.g. `python -c \"import torch, safetensors.torch as s; \
     sd = torch.load('IN.ckpt', weights_only=True); s.save_file(sd.get('state_dict', sd), 'OUT.safetensors')\"`";

/// Whether `path` names a pickle by its extension.
pub fn is_pickle(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin" | "pkl")
}

impl Checkpoint {
    /// Maps `path` and reads its architecture.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if is_pickle(path) {
            bail!("{} {PICKLE_REFUSAL}", path.display());
        }
        let file = ReleasingSafetensors::open(path)?;
        let shapes = file.shapes();
        let arch = detect(&shapes).with_context(|| format!("{}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), file: Arc::new(file), shapes, arch })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn shapes(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.shapes
    }

    /// A `VarBuilder` that reads `part`'s tensors, by their diffusers names, from the file.
    pub fn var_builder(&self, part: Part, dtype: DType, device: &Device) -> anyhow::Result<VarBuilder<'static>> {
        let map: super::weights::NameMap = match part {
            Part::Unet(config) => {
                let numbering = UnetNumbering::from_config(config)?;
                Box::new(move |name| names::unet(&numbering, UNET_PREFIX, name))
            }
            Part::Vae { up_blocks } => {
                if !self.arch.has_vae {
                    bail!("{} holds no VAE (`{VAE_PREFIX}*`): give one with --vae", self.path.display());
                }
                Box::new(move |name| names::vae(VAE_PREFIX, up_blocks, name))
            }
            Part::TextEncoder { width } => match self.arch.family {
                Family::Sd1 => Box::new(|name| names::clip(SD1_CLIP, name)),
                Family::Sd2 => Box::new(move |name| names::open_clip(SD2_OPEN_CLIP, width, name)),
                Family::Sdxl => Box::new(|name| names::clip(XL_CLIP, name)),
            },
            Part::TextEncoder2 { width } => Box::new(move |name| names::open_clip(XL_OPEN_CLIP, width, name)),
        };
        Ok(renamed_var_builder(self.file.clone(), map, dtype, device))
    }
}

/// A VAE given apart from the model (`--vae`): a diffusers `vae/` folder, or one `.safetensors` file in the
/// diffusers layout, the original one (`encoder.down.0…`), or a whole checkpoint's `first_stage_model.*`.
pub enum VaeFile {
    /// Tensors named as diffusers names them.
    Diffusers(Arc<ReleasingSafetensors>),
    /// Tensors in the original layout under `prefix` (empty for a VAE-only file).
    Original(Arc<ReleasingSafetensors>, &'static str),
}

impl VaeFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if is_pickle(path) {
            bail!("--vae {} {PICKLE_REFUSAL}", path.display());
        }
        let file = ReleasingSafetensors::open(path)?;
        let shapes = file.shapes();
        let file = Arc::new(file);
        if shapes.contains_key("decoder.conv_in.weight") && shapes.keys().any(|k| k.starts_with("decoder.up_blocks.")) {
            Ok(Self::Diffusers(file))
        } else if shapes.contains_key("decoder.conv_in.weight") {
            Ok(Self::Original(file, ""))
        } else if shapes.contains_key(&format!("{VAE_PREFIX}decoder.conv_in.weight")) {
            Ok(Self::Original(file, VAE_PREFIX))
        } else {
            bail!("--vae {}: not a VAE (no `decoder.conv_in.weight`)", path.display())
        }
    }

    pub fn var_builder(&self, up_blocks: usize, dtype: DType, device: &Device) -> VarBuilder<'static> {
        match self {
            Self::Diffusers(file) => renamed_var_builder(
                file.clone(),
                Box::new(|n| Some(names::Source::Tensor(n.to_string()))),
                dtype,
                device,
            ),
            Self::Original(file, prefix) => {
                let prefix: &'static str = prefix;
                renamed_var_builder(file.clone(), Box::new(move |n| names::vae(prefix, up_blocks, n)), dtype, device)
            }
        }
    }
}

#[cfg(test)]
mod tests;
