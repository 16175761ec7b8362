//! The job message, [`JobRequest`], and the types it is made of: its kind, input images, output format and
//! LoRAs. Its rules are checked in `validate.rs` ([`JobRequest::validate`]).

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[cfg(feature = "new-ids")]
use super::now_millis;
use super::serde_util::{default_mask_blur, default_num_images, default_true, is_default, is_true, uuid_str};
use super::strict::{self, WireNames};
use super::PROTOCOL_VERSION;
use crate::vocab::{
    ImageFormat, Priority, ResizeMode, DEFAULT_IMG2IMG_STRENGTH, DEFAULT_INPAINT_STRENGTH, DEFAULT_MASK_BLUR,
    DEFAULT_NUM_IMAGES,
};

/// What a job makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema, strum::VariantNames)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum JobKind {
    Txt2Img,
    Img2Img,
    Inpaint,
}

impl JobKind {
    /// Whether the job starts from an init image.
    pub fn needs_init_image(self) -> bool {
        matches!(self, JobKind::Img2Img | JobKind::Inpaint)
    }
}

/// An input image: inline bytes (an encoded PNG/JPEG/WebP, at most
/// [`Limits::max_inline_image_bytes`](super::Limits::max_inline_image_bytes)) or the key of an object in the
/// fleet's bucket. On the wire: `{"inline": <bin>}` or `{"object_key": "..."}`.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageSource {
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    ObjectKey(String),
}

impl fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Inline(b) => write!(f, "Inline({} bytes)", b.len()),
            ImageSource::ObjectKey(k) => f.debug_tuple("ObjectKey").field(k).finish(),
        }
    }
}

// The names serde writes, listed by strum from the same `lowercase` rule.
impl WireNames for JobKind {
    const NAMES: &'static [&'static str] = <JobKind as strum::VariantNames>::VARIANTS;
}

impl WireNames for ResizeMode {
    const NAMES: &'static [&'static str] = <ResizeMode as strum::VariantNames>::VARIANTS;
}

impl WireNames for Priority {
    const NAMES: &'static [&'static str] = <Priority as strum::VariantNames>::VARIANTS;
}

impl WireNames for ImageFormat {
    const NAMES: &'static [&'static str] = <ImageFormat as strum::VariantNames>::VARIANTS;
}

/// How results are encoded. `quality` (1–100) is for JPEG and WebP only; `None`: the encoder's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFormat {
    #[serde(default, deserialize_with = "strict::by_name")]
    pub format: ImageFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u8>,
}

/// A generation job, published by the queen on [`Subjects::jobs`](super::Subjects::jobs) and pulled by one
/// worker.
///
/// Required on the wire: `v`, `id`, `kind`, `model`, `prompt`, `created_at`; every other field has a default
/// and may be left out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    pub v: u32,
    /// The job id: the de-duplication id, the events subject and the results prefix.
    #[serde(with = "uuid_str")]
    pub id: Uuid,
    #[serde(deserialize_with = "strict::by_name")]
    pub kind: JobKind,
    /// The short name of a model the fleet serves (a subject token).
    pub model: String,
    pub prompt: String,
    /// `None` and `Some("")` differ for SDXL (zero embeddings without a negative prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// Pixels; `None`: the model's default size (the worker's model decides: 1024 for SDXL, 512 for SD 1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Denoising steps; `None`: the model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale; `None`: the model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    /// One of [`SCHEDULERS`](crate::vocab::SCHEDULERS); `None`: the model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// One of [`TIMESTEP_SPACINGS`](crate::vocab::TIMESTEP_SPACINGS); `None`: the scheduler config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<String>,
    /// Image *i* uses seed + *i*; `None`: a random seed, reported in the results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default = "default_num_images")]
    pub num_images: u32,
    /// img2img and inpaint: the starting image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<ImageSource>,
    /// inpaint: white = repaint, black = keep (unless `invert_mask`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<ImageSource>,
    /// img2img and inpaint: how much of the init image is noised away, in (0, 1]; `None`:
    /// [`DEFAULT_IMG2IMG_STRENGTH`] or [`DEFAULT_INPAINT_STRENGTH`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// inpaint: Gaussian blur radius of the mask, in pixels.
    #[serde(default = "default_mask_blur")]
    pub mask_blur: u32,
    /// inpaint: swap the mask's black and white.
    #[serde(default, skip_serializing_if = "is_default")]
    pub invert_mask: bool,
    /// inpaint: paste the original pixels back outside the (blurred) mask.
    #[serde(default = "default_true")]
    pub paste_back: bool,
    /// img2img and inpaint: how an input of another size is resized.
    #[serde(default, skip_serializing_if = "is_default", deserialize_with = "strict::by_name")]
    pub resize_mode: ResizeMode,
    #[serde(default, deserialize_with = "strict::map_only")]
    pub output: OutputFormat,
    /// Unix milliseconds after which the job is worthless; a worker fails it with `TIMEOUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// Unix milliseconds at which the job expires (its `ttl`): its status answers `410 Gone`, a sweeper
    /// deletes its images, and a worker still running it then stops it with `TIMEOUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The client's idempotency key (the queen maps it to one job id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// LoRAs to apply, by the names in the workers' catalogues, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraRef>,
    /// A1111's clip skip (1 = the text encoder's last layer); SD 1.x/2.x models only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_skip: Option<u32>,
    /// Unix milliseconds when the queen accepted the job.
    pub created_at: u64,
    /// Whether a seeded job may be answered from the result cache, and its result kept there (see
    /// [`cache_description`](super::cache_description)).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub cache: bool,
    /// Which of the model's queues the job waits in (its subject: [`Subjects::jobs_at`](super::Subjects::jobs_at)).
    #[serde(default, skip_serializing_if = "is_default", deserialize_with = "strict::by_name")]
    pub priority: Priority,
    /// The tenant whose API token submitted the job ([`validate_tenant`](super::validate_tenant)): only its
    /// tokens (and operators') see the job, and its results are cached apart from other tenants'. Set by the
    /// queen from the token, never from a request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// A LoRA a job applies: a catalogue name (never a path or URL) and its scale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoraRef {
    /// The LoRA's name in the workers' catalogue (`--lora-dir`): letters, digits, `_`, `-`, `.`.
    pub name: String,
    /// 1.0 as trained; negative values subtract it. At most [`MAX_LORA_SCALE`] either way.
    #[serde(default = "default_lora_scale")]
    pub scale: f64,
}

fn default_lora_scale() -> f64 {
    1.0
}

/// The largest scale a LoRA may be applied at (either sign); past this, weights are noise.
pub const MAX_LORA_SCALE: f64 = 100.0;

/// LoRA names a heartbeat lists (so it stays small whatever the catalogue holds).
pub const MAX_HEARTBEAT_LORAS: usize = 256;

/// LoRAs one job may name, whatever a deployment configures.
pub const MAX_LORAS_PER_JOB: usize = 64;

impl JobRequest {
    /// When a worker must stop the job: its deadline or its expiry, whichever comes first.
    pub fn stop_at(&self) -> Option<u64> {
        self.deadline.into_iter().chain(self.expires_at).min()
    }

    /// A job with a fresh id, created now, every optional parameter at its default (the size included: the
    /// model's).
    #[cfg(feature = "new-ids")]
    pub fn new(kind: JobKind, model: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self::with_id(Uuid::new_v4(), now_millis(), kind, model, prompt)
    }

    /// A job with id `id`, created at `created_at` (unix ms), every optional parameter at its default.
    pub fn with_id(
        id: Uuid,
        created_at: u64,
        kind: JobKind,
        model: impl Into<String>,
        prompt: impl Into<String>,
    ) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id,
            kind,
            model: model.into(),
            prompt: prompt.into(),
            negative_prompt: None,
            width: None,
            height: None,
            steps: None,
            guidance: None,
            scheduler: None,
            timestep_spacing: None,
            seed: None,
            num_images: DEFAULT_NUM_IMAGES,
            init_image: None,
            mask: None,
            strength: None,
            mask_blur: DEFAULT_MASK_BLUR,
            invert_mask: false,
            paste_back: true,
            resize_mode: ResizeMode::Fit,
            output: OutputFormat::default(),
            deadline: None,
            expires_at: None,
            idempotency_key: None,
            loras: Vec::new(),
            clip_skip: None,
            created_at,
            cache: true,
            priority: Priority::Normal,
            tenant: None,
        }
    }

    /// The `Nats-Msg-Id` header value: the job id.
    pub fn msg_id(&self) -> String {
        self.id.to_string()
    }

    /// The strength to use: the job's, or the kind's default; `None` for txt2img.
    pub fn strength_or_default(&self) -> Option<f64> {
        match self.kind {
            JobKind::Txt2Img => None,
            JobKind::Img2Img => Some(self.strength.unwrap_or(DEFAULT_IMG2IMG_STRENGTH)),
            JobKind::Inpaint => Some(self.strength.unwrap_or(DEFAULT_INPAINT_STRENGTH)),
        }
    }

    /// Whether the deadline or the expiry has passed at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.stop_at().is_some_and(|d| now_ms >= d)
    }

    /// The seed to use: the job's, or one derived from its id, so a redelivered job makes the same images.
    pub fn seed_or_derived(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            let b = self.id.as_bytes();
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64
        })
    }
}
