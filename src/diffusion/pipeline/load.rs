//! Loading a pipeline: a diffusers folder, or a single-file checkpoint with the configuration of a diffusers
//! folder (`--config`) or the built-in one of its architecture; a VAE given apart (`--vae`) and the prediction
//! type (`--prediction-type`) override the model's. Every component is built from a `VarBuilder`, whichever
//! layout the weights are in, and its adaptable layers are recorded for LoRAs.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::DType;
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::{LoadOptions, ModelFamily, StableDiffusion, TextTower};
use crate::diffusion::adapt;
use crate::diffusion::checkpoint::configs::ConfigFolder;
use crate::diffusion::checkpoint::{Architecture, Checkpoint, Family, Part, VaeFile};
use crate::diffusion::clip::{ClipTextConfig, ClipTextModel};
use crate::diffusion::lora::names::LayerIndex;
use crate::diffusion::lora::{Adapters, Component};
use crate::diffusion::random_weights::random_var_builder;
use crate::diffusion::schedulers::SchedulerConfig;
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::diffusion::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::diffusion::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::diffusion::weights::{find_weights, var_builder};

/// Each component's own random stream (tensor names repeat across components).
fn name_seed(component: &str) -> u64 {
    component.bytes().fold(0, |h: u64, b| h.rotate_left(8) ^ b as u64)
}

/// `model_index.json`: which components the pipeline has.
#[derive(Clone, Debug, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name", default)]
    class_name: String,
    #[serde(default)]
    force_zeros_for_empty_prompt: Option<bool>,
    #[serde(default)]
    requires_aesthetics_score: Option<bool>,
    #[serde(flatten)]
    components: std::collections::HashMap<String, serde_json::Value>,
}

impl ModelIndex {
    fn has(&self, component: &str) -> bool {
        match self.components.get(component) {
            Some(serde_json::Value::Array(v)) => v.iter().any(|x| !x.is_null()),
            _ => false,
        }
    }
}

/// Where a pipeline's weights are: each component's folder, one checkpoint file, or made up from a seed.
enum Weights<'a> {
    Folder(&'a Path),
    Checkpoint(&'a Checkpoint),
    Random(u64),
}

impl Weights<'_> {
    /// The `VarBuilder` of `component` (its folder name, e.g. `unet`).
    fn var_builder(
        &self,
        component: &str,
        part: Part,
        opts: &LoadOptions,
        dtype: DType,
    ) -> anyhow::Result<VarBuilder<'static>> {
        match self {
            Weights::Folder(root) => {
                let stem = if component.starts_with("text_encoder") { "model" } else { "diffusion_pytorch_model" };
                var_builder(&find_weights(&root.join(component), stem, opts.dtype == DType::F16)?, dtype, &opts.device)
            }
            Weights::Checkpoint(c) => c.var_builder(part, dtype, &opts.device),
            Weights::Random(seed) => Ok(random_var_builder(*seed ^ name_seed(component), dtype, &opts.device)),
        }
    }

    fn describe(&self, component: &str) -> String {
        match self {
            Weights::Folder(root) => root.join(component).display().to_string(),
            Weights::Checkpoint(c) => format!("{} ({component})", c.path().display()),
            Weights::Random(seed) => format!("random weights (seed {seed}, {component})"),
        }
    }
}

impl TextTower {
    fn load(
        config_root: &Path,
        tokenizer: &str,
        encoder: &str,
        weights: &Weights,
        opts: &LoadOptions,
    ) -> anyhow::Result<Self> {
        let tok = ClipTokenizer::from_dir(&config_root.join(tokenizer))?;
        let config = ClipTextConfig::from_file(&config_root.join(encoder).join("config.json"))?;
        let width = config.hidden_size;
        let part = if encoder == "text_encoder_2" { Part::TextEncoder2 { width } } else { Part::TextEncoder { width } };
        let vb = weights.var_builder(encoder, part, opts, opts.dtype)?;
        let (built, layers) = adapt::record(|| ClipTextModel::new(vb, config));
        let encoder =
            built.with_context(|| format!("cannot build the text encoder from {}", weights.describe(encoder)))?;
        Ok(Self { tokenizer: tok, encoder, layers })
    }
}

impl StableDiffusion {
    /// Loads `root`: a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder[_2]/,
    /// tokenizer[_2]/, scheduler/), or a single-file `.safetensors` checkpoint.
    pub fn load(root: &Path, opts: &LoadOptions) -> anyhow::Result<Self> {
        if opts.dtype == DType::BF16 && opts.device.is_cpu() {
            bail!(
                "--dtype bf16 is not supported on the CPU (Candle has no bf16 matrix multiply there); use f32 or f16"
            );
        }
        if !matches!(opts.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            bail!("unsupported dtype {:?}: use f32, f16 or bf16", opts.dtype);
        }
        if root.is_file() {
            return Self::load_single_file(root, opts);
        }
        if let Some(config) = &opts.config {
            bail!("--config {} is for single-file checkpoints; {} is a folder", config.display(), root.display());
        }
        Self::assemble(root, root, &Weights::Folder(root), opts)
    }

    /// The real architecture `arch` (its built-in configuration) with seeded random weights: for benchmarks
    /// without downloads. Generation runs as with real weights; the images are noise.
    pub fn random(arch: Architecture, seed: u64, opts: &LoadOptions) -> anyhow::Result<Self> {
        let folder = ConfigFolder::write(arch).context("cannot write the built-in configuration")?;
        let source = std::path::PathBuf::from(format!("random {arch} (seed {seed})"));
        Self::assemble(&source, folder.path(), &Weights::Random(seed), opts)
    }

    fn load_single_file(path: &Path, opts: &LoadOptions) -> anyhow::Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let arch = checkpoint.arch;
        let Some(config) = &opts.config else {
            let folder = ConfigFolder::write(arch).context("cannot write the built-in configuration")?;
            return Self::assemble(path, folder.path(), &Weights::Checkpoint(&checkpoint), opts).with_context(|| {
                format!(
                    "{} is an {arch} checkpoint but does not fit the real {arch} architecture; if it is another \
                     size, give its diffusers configuration with --config DIR",
                    path.display()
                )
            });
        };
        let folder_xl = config.join("text_encoder_2").is_dir();
        if folder_xl != (arch.family == Family::Sdxl) {
            bail!(
                "--config {} is {} pipeline but {} is an {arch} checkpoint",
                config.display(),
                if folder_xl { "an SDXL" } else { "an SD 1.x/2.x" },
                path.display()
            );
        }
        Self::assemble(path, config, &Weights::Checkpoint(&checkpoint), opts)
    }

    /// Builds the pipeline from the configuration in `config_root` and the weights in `weights`.
    fn assemble(source: &Path, config_root: &Path, weights: &Weights, opts: &LoadOptions) -> anyhow::Result<Self> {
        let index_path = config_root.join("model_index.json");
        let index_text = std::fs::read_to_string(&index_path).with_context(|| {
            format!("{} is not a diffusers pipeline folder (cannot read model_index.json)", config_root.display())
        })?;
        let index: ModelIndex =
            serde_json::from_str(&index_text).with_context(|| format!("{} is not valid JSON", index_path.display()))?;
        for needed in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            if !index.has(needed) {
                bail!("{} lists no `{needed}` component (pipeline class {:?})", index_path.display(), index.class_name);
            }
        }
        if index.requires_aesthetics_score == Some(true) {
            bail!("{}: SDXL refiner pipelines (requires_aesthetics_score) are not supported", index_path.display());
        }
        let sdxl = index.has("text_encoder_2");
        let family = if sdxl { ModelFamily::StableDiffusionXl } else { ModelFamily::StableDiffusion };

        let text = TextTower::load(config_root, "tokenizer", "text_encoder", weights, opts)?;
        let text_2 = if sdxl {
            if !index.has("tokenizer_2") {
                bail!("{} has text_encoder_2 but no tokenizer_2", index_path.display());
            }
            Some(TextTower::load(config_root, "tokenizer_2", "text_encoder_2", weights, opts)?)
        } else {
            None
        };

        let unet_config = UNet2DConditionConfig::from_file(&config_root.join("unet").join("config.json"))?;
        let unet_vb = weights.var_builder("unet", Part::Unet(&unet_config), opts, opts.dtype)?;
        let (unet, unet_layers) = adapt::record(|| UNet2DConditionModel::new(unet_vb, unet_config.clone()));
        let unet = unet.with_context(|| format!("cannot build the UNet from {}", weights.describe("unet")))?;

        let (vae, vae_dtype) = load_vae(config_root, weights, opts)?;

        let mut scheduler_config =
            SchedulerConfig::from_file(&config_root.join("scheduler").join("scheduler_config.json"))?;
        if let Some(p) = &opts.prediction_type {
            scheduler_config.prediction_type = Some(p.clone());
        }
        scheduler_config.prediction()?;

        let mut tables = vec![(Component::Unet, &unet_layers), (Component::TextEncoder, &text.layers)];
        if let Some(t2) = &text_2 {
            tables.push((Component::TextEncoder2, &t2.layers));
        }
        let what = match family {
            ModelFamily::StableDiffusionXl => "this SDXL model".to_string(),
            ModelFamily::StableDiffusion => {
                format!("this SD 1.x/2.x model ({}-wide text encoder)", text.encoder.config().hidden_size)
            }
        };
        let adapters = Adapters::new(LayerIndex::new(&tables), what);
        let pipeline = Self {
            adapters,
            root: source.to_path_buf(),
            family,
            text,
            text_2,
            unet,
            vae,
            vae_dtype,
            scheduler_config,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(sdxl),
            device: opts.device.clone(),
            dtype: opts.dtype,
        };
        pipeline.check_dimensions()?;
        Ok(pipeline)
    }

    /// Cross-checks the components' widths so a mismatched folder fails at load, not mid-generation.
    fn check_dimensions(&self) -> anyhow::Result<()> {
        let ucfg = self.unet.config();
        let text_width = self.text.encoder.config().hidden_size
            + self.text_2.as_ref().map(|t| t.encoder.config().hidden_size).unwrap_or(0);
        if ucfg.context_dim() != text_width {
            bail!(
                "unet `cross_attention_dim` is {} but the text encoder(s) produce {text_width}-wide embeddings",
                ucfg.context_dim()
            );
        }
        if let (Some(t2), Some(time_dim), Some(proj)) =
            (&self.text_2, ucfg.addition_time_embed_dim, ucfg.projection_class_embeddings_input_dim)
        {
            let pooled = t2.encoder.config().projection_dim.unwrap_or(t2.encoder.config().hidden_size);
            if pooled + 6 * time_dim != proj {
                bail!("unet `projection_class_embeddings_input_dim` is {proj}, expected pooled {pooled} + 6 time ids × {time_dim}");
            }
        }
        if self.family == ModelFamily::StableDiffusionXl && !self.unet.needs_added_conditions() {
            bail!("this pipeline has two text encoders but its UNet has no `text_time` add-embedding");
        }
        let vae_latents = self.vae.config().latent_channels;
        if ucfg.out_channels != vae_latents {
            bail!("unet `out_channels` {} differs from the VAE's `latent_channels` {vae_latents}", ucfg.out_channels);
        }
        if ucfg.in_channels != vae_latents && ucfg.in_channels != 2 * vae_latents + 1 {
            bail!(
                "unet `in_channels` is {}: expected {vae_latents} (the VAE's latents) or {} (an inpainting UNet)",
                ucfg.in_channels,
                2 * vae_latents + 1
            );
        }
        Ok(())
    }
}

/// The VAE: `--vae` (a diffusers `vae/` folder with its own config, or one file read with the pipeline's VAE
/// config), else the pipeline's own. Kept in f32 for f16 models whose config asks for it (`force_upcast`).
fn load_vae(config_root: &Path, weights: &Weights, opts: &LoadOptions) -> anyhow::Result<(AutoencoderKL, DType)> {
    if let Some(path) = opts.vae.as_ref().filter(|p| !p.exists()) {
        bail!("--vae {}: no such file or folder", path.display());
    }
    let own_config = config_root.join("vae").join("config.json");
    let config_path = match &opts.vae {
        Some(dir) if dir.is_dir() && dir.join("config.json").is_file() => dir.join("config.json"),
        _ => own_config,
    };
    let config = AutoencoderKLConfig::from_file(&config_path)?;
    let dtype = if config.force_upcast && opts.dtype == DType::F16 { DType::F32 } else { opts.dtype };
    let up_blocks = config.block_out_channels.len();
    let (vb, from) = match &opts.vae {
        Some(dir) if dir.is_dir() => {
            let files = find_weights(dir, "diffusion_pytorch_model", opts.dtype == DType::F16)?;
            (var_builder(&files, dtype, &opts.device)?, dir.display().to_string())
        }
        Some(file) => (VaeFile::open(file)?.var_builder(up_blocks, dtype, &opts.device), file.display().to_string()),
        None => (weights.var_builder("vae", Part::Vae { up_blocks }, opts, dtype)?, weights.describe("vae")),
    };
    let vae = AutoencoderKL::new(vb, config).with_context(|| format!("cannot build the VAE from {from}"))?;
    Ok((vae, dtype))
}
