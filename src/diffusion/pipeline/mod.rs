//! The text-to-image pipeline: loads a diffusers-format pipeline folder once (tokenizers, text encoders,
//! UNet, VAE, scheduler config), then turns [`GenerationRequest`]s into images with diffusers' exact
//! sequence of operations — prompt encoding (SD 1.x/2.x last layer; SDXL penultimate layers of both
//! encoders plus the pooled projection and size/crop time ids), seeded PyTorch-compatible noise,
//! classifier-free guidance, the scheduler loop, and VAE decoding. Reports progress per step and stops
//! between steps when cancelled. Loading (folders and single-file checkpoints) is in [`load`].

mod generate;
mod load;
mod resume;

pub use generate::{BatchKey, BatchMember, StepCallback};
pub use resume::ResumeState;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};

use super::adapt::LayerTable;
use super::clip::ClipTextModel;
use super::lora::{Adapters, LoraWeight};
use super::schedulers::{SchedulerConfig, SchedulerKind, TimestepSpacing};
use super::tokenizer::ClipTokenizer;
use super::unet_2d::{AddedConditions, UNet2DConditionModel};
use super::vae::AutoencoderKL;

/// Which conditioning scheme a pipeline uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFamily {
    /// One CLIP encoder, last hidden state (SD 1.x and 2.x).
    StableDiffusion,
    /// Two CLIP encoders, penultimate states, pooled embedding and time ids.
    StableDiffusionXl,
}

/// How weights are loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// For a single-file checkpoint: the diffusers folder whose configs, scheduler and tokenizers to use
    /// (`None`: the built-in ones of its architecture).
    pub config: Option<PathBuf>,
    /// A VAE to use instead of the model's: a diffusers `vae/` folder or one `.safetensors` file.
    pub vae: Option<PathBuf>,
    /// `epsilon`, `v_prediction` or `sample` instead of the scheduler config's.
    pub prediction_type: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32, config: None, vae: None, prediction_type: None }
    }
}

/// A text encoder and the tokenizer that feeds it.
struct TextTower {
    tokenizer: ClipTokenizer,
    encoder: ClipTextModel,
    /// The encoder's adaptable layers, for LoRAs.
    layers: LayerTable,
}

impl std::fmt::Debug for TextTower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTower").field("encoder", &self.encoder.config()).finish_non_exhaustive()
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: String,
    /// `None` and `Some("")` differ for SDXL: with no negative prompt, SDXL pipelines use zero embeddings.
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    /// `None`: the model's own scheduler when it is one of ours, else DPM++ 2M.
    pub scheduler: Option<SchedulerKind>,
    pub timestep_spacing: Option<TimestepSpacing>,
    /// `None`: a random seed, reported in the result.
    pub seed: Option<u64>,
    pub num_images: usize,
    /// Replaces the seeded starting noise: `[1, C, H/8, W/8]` (used for every image) or `[N, ...]`.
    pub initial_latents: Option<Tensor>,
    /// Image-to-image (and, with a mask, inpainting by re-blending) instead of text-to-image.
    pub init: Option<InitImage>,
    /// LoRAs applied for this generation only, in order.
    pub loras: Vec<LoraWeight>,
    /// A1111's clip skip for single-encoder models: 1 (or `None`) uses the last layer, 2 the one before, ...
    pub clip_skip: Option<usize>,
    /// Decode in tiles (diffusers' `enable_vae_tiling()`); `None`: past 1536 × 1536 pixels.
    pub vae_tiling: Option<bool>,
    /// Continue from this state instead of step 0: the run then ends exactly as the one that saved it would
    /// have (the same request, model, device class and dtype).
    pub resume: Option<std::sync::Arc<ResumeState>>,
}

/// The image an img2img or inpainting run starts from.
#[derive(Clone, Debug)]
pub struct InitImage {
    /// `[1, 3, H, W]` in [0, 1], already at the request's width and height.
    pub pixels: Tensor,
    /// How much of the schedule to run, in (0, 1]: 1 repaints from pure noise.
    pub strength: f64,
    /// `[1, 1, H, W]` in [0, 1], white = repaint (binarised at 0.5). With a regular UNet the unmasked region
    /// is re-blended with the re-noised original latents after every step.
    pub mask: Option<Tensor>,
    /// Replaces the seeded noise added to the encoded image: `[1, C, H/8, W/8]`.
    pub noise: Option<Tensor>,
}

impl GenerationRequest {
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: None,
            width: 512,
            height: 512,
            steps: 30,
            guidance_scale: 7.5,
            scheduler: None,
            timestep_spacing: None,
            seed: None,
            num_images: 1,
            initial_latents: None,
            init: None,
            loras: Vec::new(),
            clip_skip: None,
            vae_tiling: None,
            resume: None,
        }
    }
}

/// Limits a request is checked against.
pub const MAX_SIDE: usize = 4096;
pub const MAX_IMAGES: usize = 64;

/// Why generation did not produce images.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("invalid request: `{field}` {message}")]
    InvalidRequest { field: &'static str, message: String },
    #[error("generation cancelled after {completed} of {total} steps")]
    Cancelled { completed: usize, total: usize },
    #[error("the model produced NaN or infinite values in the {stage} (try --dtype f32)")]
    NonFinite { stage: &'static str },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
    /// A call shared by a batch's members failed for all of them (out of memory for the batch, as like as not):
    /// each may succeed alone.
    #[error("{0:#}")]
    Batch(anyhow::Error),
}

fn invalid(field: &'static str, message: impl Into<String>) -> GenerateError {
    GenerateError::InvalidRequest { field, message: message.into() }
}

/// Whether every value of `t` is finite.
fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    // A sum propagates NaN and inf, which a max may skip.
    let s = t.to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    Ok(s.is_finite())
}

/// A cancellation flag shared between the generator and whoever may cancel it.
#[derive(Clone, Debug, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Reported after each denoising step.
pub struct StepInfo<'a> {
    /// Steps completed so far (1-based).
    pub step: usize,
    pub total: usize,
    /// Time since the denoising loop started.
    pub elapsed: Duration,
    /// Duration of this step.
    pub step_time: Duration,
    pub timestep: f64,
    /// The step a resumed run took up from (0: it started from the beginning).
    pub resumed_from: usize,
    latents: &'a Tensor,
    sdxl: bool,
    /// The run's state after this step, made on demand (only a caller that keeps checkpoints pays for it).
    checkpoint: &'a dyn Fn() -> anyhow::Result<ResumeState>,
}

impl StepInfo<'_> {
    /// The latents after this step, `[N, C, h, w]`.
    pub fn latents(&self) -> &Tensor {
        self.latents
    }

    /// The run's state after this step, from which a later run can continue ([`GenerationRequest::resume`]).
    pub fn checkpoint(&self) -> anyhow::Result<ResumeState> {
        (self.checkpoint)()
    }

    /// A cheap RGB preview of image `index` at latent resolution (no VAE decode).
    pub fn preview(&self, index: usize) -> anyhow::Result<image::RgbImage> {
        super::image::latent_preview(&self.latents.get(index)?, self.sdxl)
    }
}

/// One generated image.
#[derive(Debug)]
pub struct GeneratedImage {
    pub seed: u64,
    /// `[3, H, W]` f32 in [0, 1], on the CPU.
    pub pixels: Tensor,
}

/// Where the time went.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// Merging and swapping in the request's LoRAs (0 when they were already in effect).
    pub lora_ms: f64,
    pub text_encoding_ms: f64,
    pub denoising_ms: f64,
    pub step_ms: Vec<f64>,
    pub decoding_ms: f64,
    pub total_ms: f64,
}

impl Timings {
    pub fn median_step_ms(&self) -> f64 {
        median(&self.step_ms)
    }
}

pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The images and what happened making them.
#[derive(Debug)]
pub struct GenerationOutput {
    pub images: Vec<GeneratedImage>,
    pub scheduler: SchedulerKind,
    /// Things the caller should show the user (e.g. a truncated prompt).
    pub warnings: Vec<String>,
    pub timings: Timings,
}

/// An encoded prompt: embeddings, SDXL's pooled embedding, and the truncation warning.
type Encoded = (Tensor, Option<Tensor>, Option<String>);

/// Prompts encoded for a batch, by text and clip skip.
type EncodedPrompts = std::collections::HashMap<(String, Option<usize>), Encoded>;

/// Text conditioning for a batch, ready for the UNet (unconditional half first when guidance is on).
struct Conditioning {
    context: Tensor,
    added: Option<AddedConditions>,
}

/// A loaded Stable Diffusion pipeline.
#[derive(Debug)]
pub struct StableDiffusion {
    root: PathBuf,
    family: ModelFamily,
    text: TextTower,
    text_2: Option<TextTower>,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    vae_dtype: DType,
    scheduler_config: SchedulerConfig,
    force_zeros_for_empty_prompt: bool,
    adapters: Adapters,
    device: Device,
    dtype: DType,
}

impl StableDiffusion {
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn family(&self) -> ModelFamily {
        self.family
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }
    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// The scheduler the model ships with, as configured, when it is one we implement.
    pub fn default_scheduler(&self) -> Option<SchedulerKind> {
        match crate::diffusion::schedulers::model_default(&self.scheduler_config) {
            Ok((kind, None)) => Some(kind),
            _ => None,
        }
    }

    /// Whether the UNet is an inpainting UNet (latents, mask and masked-image latents in, 9 channels for SD).
    pub fn is_inpainting(&self) -> bool {
        self.unet.config().in_channels == 2 * self.vae.config().latent_channels + 1
    }

    /// Latents and scheduler arithmetic stay in f32 for half-precision models (f64 for f64 models).
    fn latent_dtype(&self) -> DType {
        if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Pixels per latent cell.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().scale_factor()
    }

    /// Token ids of the first tokenizer for `text` (with the truncation warning, if any).
    pub fn tokenize(&self, text: &str) -> anyhow::Result<super::tokenizer::TokenizedPrompt> {
        self.text.tokenizer.encode(text)
    }

    fn ids_tensor(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        Tensor::new(ids, &self.device)?.unsqueeze(0)
    }

    /// Encodes one prompt: `(embeddings [1, 77, D], pooled [1, P] for SDXL, warning)`.
    pub fn encode_prompt(&self, text: &str) -> anyhow::Result<(Tensor, Option<Tensor>, Option<String>)> {
        self.encode_prompt_skipping(text, None)
    }

    /// [`Self::encode_prompt`] with A1111's clip skip (single-encoder models).
    fn encode_prompt_skipping(
        &self,
        text: &str,
        clip_skip: Option<usize>,
    ) -> anyhow::Result<(Tensor, Option<Tensor>, Option<String>)> {
        let tokens = self.text.tokenizer.encode(text)?;
        let warning = tokens.truncated_text.as_ref().map(|cut| {
            format!(
                "the prompt is longer than {} tokens; this part was dropped: {cut:?}",
                self.text.tokenizer.max_length()
            )
        });
        if let (Some(skip), None) = (clip_skip.filter(|&s| s > 1), &self.text_2) {
            let hidden = self.text.encoder.forward_clip_skip(&self.ids_tensor(&tokens.ids)?, skip)?;
            return Ok((hidden, None, warning));
        }
        let out = self.text.encoder.forward(&self.ids_tensor(&tokens.ids)?)?;
        match &self.text_2 {
            None => Ok((out.last_hidden_state, None, warning)),
            Some(t2) => {
                let tokens_2 = t2.tokenizer.encode(text)?;
                let out_2 = t2.encoder.forward(&self.ids_tensor(&tokens_2.ids)?)?;
                let embeds = Tensor::cat(&[&out.penultimate_hidden_state, &out_2.penultimate_hidden_state], 2)?;
                Ok((embeds, Some(out_2.pooled), warning))
            }
        }
    }

    /// [`Self::encode_prompt_skipping`] through `cache`: members of a batch often share a (negative) prompt.
    fn encode_cached(
        &self,
        text: &str,
        clip_skip: Option<usize>,
        cache: &mut EncodedPrompts,
    ) -> anyhow::Result<Encoded> {
        let key = (text.to_string(), clip_skip);
        if let Some(hit) = cache.get(&key) {
            return Ok(hit.clone());
        }
        let encoded = self.encode_prompt_skipping(text, clip_skip)?;
        cache.insert(key, encoded.clone());
        Ok(encoded)
    }

    fn conditioning(
        &self,
        req: &GenerationRequest,
        guidance: bool,
        warnings: &mut Vec<String>,
        cache: &mut EncodedPrompts,
    ) -> anyhow::Result<Conditioning> {
        let n = req.num_images;
        let (pos, pos_pooled, warning) = self.encode_cached(&req.prompt, req.clip_skip, cache)?;
        warnings.extend(warning);
        let repeat = |t: &Tensor| -> candle_core::Result<Tensor> { Tensor::cat(&vec![t; n], 0) };
        let mut context = repeat(&pos)?;
        let mut pooled = pos_pooled.as_ref().map(repeat).transpose()?;
        if guidance {
            let zero_negative = self.family == ModelFamily::StableDiffusionXl
                && req.negative_prompt.is_none()
                && self.force_zeros_for_empty_prompt;
            let (neg, neg_pooled) = if zero_negative {
                (pos.zeros_like()?, pos_pooled.as_ref().map(|p| p.zeros_like()).transpose()?)
            } else {
                let negative = req.negative_prompt.as_deref().unwrap_or("");
                let (neg, neg_pooled, warning) = self.encode_cached(negative, req.clip_skip, cache)?;
                warnings.extend(warning.map(|w| w.replacen("the prompt", "the negative prompt", 1)));
                (neg, neg_pooled)
            };
            context = Tensor::cat(&[repeat(&neg)?, context], 0)?;
            pooled = match (neg_pooled, pooled) {
                (Some(np), Some(p)) => Some(Tensor::cat(&[repeat(&np)?, p], 0)?),
                (_, p) => p,
            };
        }
        let added = match pooled {
            Some(text_embeds) => {
                let (h, w) = (req.height as f64, req.width as f64);
                let rows = text_embeds.dim(0)?;
                Some(AddedConditions { text_embeds, time_ids: vec![vec![h, w, 0.0, 0.0, h, w]; rows] })
            }
            None => None,
        };
        Ok(Conditioning { context, added })
    }

    fn validate(&self, req: &GenerationRequest) -> Result<(), GenerateError> {
        let f = self.vae_scale_factor();
        for (field, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % f != 0 {
                return Err(invalid(field, format!("must be a positive multiple of {f}, got {v}")));
            }
            if v > MAX_SIDE {
                return Err(invalid(field, format!("must be at most {MAX_SIDE}, got {v}")));
            }
        }
        let train_steps = self.scheduler_config.num_train_timesteps.unwrap_or(1000);
        if req.steps == 0 || req.steps > train_steps {
            return Err(invalid("steps", format!("must be between 1 and {train_steps}, got {}", req.steps)));
        }
        if !req.guidance_scale.is_finite() || req.guidance_scale < 0.0 {
            return Err(invalid("guidance", format!("must be a finite number ≥ 0, got {}", req.guidance_scale)));
        }
        if let Some(skip) = req.clip_skip {
            let layers = self.text.encoder.config().num_hidden_layers;
            if self.text_2.is_some() && skip > 1 {
                return Err(invalid("clip_skip", "does not apply to SDXL, which always uses its penultimate layers"));
            }
            if skip == 0 || skip > layers {
                return Err(invalid(
                    "clip_skip",
                    format!("must be between 1 and {layers} (1 = the last layer), got {skip}"),
                ));
            }
        }
        if req.num_images == 0 || req.num_images > MAX_IMAGES {
            return Err(invalid("num_images", format!("must be between 1 and {MAX_IMAGES}, got {}", req.num_images)));
        }
        if self.is_inpainting() && req.init.as_ref().and_then(|i| i.mask.as_ref()).is_none() {
            return Err(invalid("mask", "is required: this is an inpainting model (give an init image and a mask)"));
        }
        if let Some(init) = &req.init {
            if !(init.strength > 0.0 && init.strength <= 1.0) {
                return Err(invalid("strength", format!("must be in (0, 1], got {}", init.strength)));
            }
            if (req.steps as f64 * init.strength) < 1.0 {
                return Err(invalid(
                    "strength",
                    format!(
                        "{} × {} steps leaves no step to run; raise the strength or the steps",
                        init.strength, req.steps
                    ),
                ));
            }
            let want = [1, 3, req.height, req.width];
            if init.pixels.dims() != want {
                return Err(invalid("init_image", format!("must be {want:?} pixels, got {:?}", init.pixels.dims())));
            }
            if let Some(mask) = &init.mask {
                let want = [1, 1, req.height, req.width];
                if mask.dims() != want {
                    return Err(invalid("mask", format!("must be {want:?}, got {:?}", mask.dims())));
                }
            }
            if let Some(noise) = &init.noise {
                let want = [1, self.vae.config().latent_channels, req.height / f, req.width / f];
                if noise.dims() != want {
                    return Err(invalid("noise", format!("must have shape {want:?}, got {:?}", noise.dims())));
                }
            }
        }
        if let Some(l) = &req.initial_latents {
            let want = [self.vae.config().latent_channels, req.height / f, req.width / f];
            let dims = l.dims();
            if dims.len() != 4 || dims[1..] != want || (dims[0] != 1 && dims[0] != req.num_images) {
                return Err(invalid(
                    "initial_latents",
                    format!(
                        "must have shape [1, {}, {}, {}] (or N images first), got {dims:?}",
                        want[0], want[1], want[2]
                    ),
                ));
            }
        }
        Ok(())
    }
}
