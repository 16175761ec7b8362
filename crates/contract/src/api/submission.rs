//! `POST /v1/jobs` and `POST /v1/uploads`: what a client sends and what it gets back, and the conversions
//! between a submission and the bus's [`JobRequest`] (one place where a field added to one meets the other).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::protocol::{ImageSource, JobKind, JobRequest, LoraRef, ProtocolError};
use crate::vocab::{ImageFormat, Priority, ResizeMode, DEFAULT_NUM_IMAGES};

/// An input image: base64 (optionally a `data:` URL), or a key returned by `POST /v1/uploads`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ImageInput {
    Base64(String),
    Upload { object_key: String },
}

/// The most bytes an input image (init image, mask, upload) may have.
pub const MAX_DECODED_IMAGE_BYTES: usize = 32 * 1024 * 1024;

/// Base64 text (optionally a `data:<type>;base64,` URL) decoded; the error, a sentence naming `what`.
pub fn decode_base64(text: &str, what: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let text = text.trim();
    let payload = match text.strip_prefix("data:") {
        Some(rest) => match rest.split_once(',') {
            Some((meta, data)) if meta.ends_with(";base64") => data,
            _ => return Err(format!("{what}: a data: URL must be of the form data:<type>;base64,<data>")),
        },
        None => text,
    };
    if payload.len() > MAX_DECODED_IMAGE_BYTES / 3 * 4 + 4 {
        return Err(format!("{what}: more than the {} MiB limit once decoded", MAX_DECODED_IMAGE_BYTES >> 20));
    }
    let compact: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(compact.as_bytes()))
        .map_err(|e| format!("{what}: not valid base64: {e}"))
}

fn default_num_images() -> u32 {
    DEFAULT_NUM_IMAGES
}

/// The body of `POST /v1/jobs`: txt2img, img2img (with `init_image`) and inpaint (with `mask`) in one
/// schema. Unknown fields are an error. What is left out takes the model's default (size, steps, guidance,
/// scheduler) or the protocol's (the rest).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSubmission {
    /// Inferred from the images when absent.
    #[serde(default)]
    pub kind: Option<JobKind>,
    pub model: String,
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// The model's default when absent (1024 for SDXL, 512 for SD 1.5, 768 for SD 2.x).
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub guidance: Option<f64>,
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default = "default_num_images")]
    pub num_images: u32,
    #[serde(default)]
    pub init_image: Option<ImageInput>,
    #[serde(default)]
    pub mask: Option<ImageInput>,
    #[serde(default)]
    pub strength: Option<f64>,
    #[serde(default)]
    pub mask_blur: Option<u32>,
    #[serde(default)]
    pub invert_mask: bool,
    #[serde(default)]
    pub paste_back: Option<bool>,
    #[serde(default)]
    pub resize_mode: Option<ResizeMode>,
    #[serde(default)]
    pub output_format: Option<ImageFormat>,
    #[serde(default)]
    pub quality: Option<u8>,
    /// Seconds after which the job is worthless (it fails with TIMEOUT).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Seconds after submission at which the job expires: its status answers `410 Gone` and its images are
    /// deleted (presigned URLs never outlive it); a job still queued or running then is stopped. None: the
    /// queen's `--default-ttl`, if it has one.
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// LoRAs to apply, by catalogue name (see `GET /v1/models`), in order.
    #[serde(default)]
    pub loras: Vec<LoraRef>,
    /// A1111's clip skip (1 = the last layer); SD 1.x/2.x models only.
    #[serde(default)]
    pub clip_skip: Option<u32>,
    /// `false`: never answer this job from the result cache, nor keep its result there. A job without a
    /// `seed` never uses the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<bool>,
    /// `high`, `normal` or `low`; none: the token's default (normal unless its `--token-file` line says
    /// otherwise), and never above the token's maximum. Workers take higher priorities first, and give a
    /// share of their picks to the lower ones so that they never starve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// POST the job's events to a URL, signed (see the API reference's Webhooks section).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<super::WebhookSpec>,
}

impl JobSubmission {
    /// A txt2img submission with every optional field left out.
    pub fn new(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            kind: None,
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
            mask_blur: None,
            invert_mask: false,
            paste_back: None,
            resize_mode: None,
            output_format: None,
            quality: None,
            timeout_s: None,
            ttl_s: None,
            loras: Vec::new(),
            clip_skip: None,
            cache: None,
            priority: None,
            webhook: None,
        }
    }

    /// The job's kind: the one given, else inferred from the images.
    pub fn kind(&self) -> JobKind {
        match (self.kind, &self.init_image, &self.mask) {
            (Some(k), _, _) => k,
            (None, None, _) => JobKind::Txt2Img,
            (None, Some(_), None) => JobKind::Img2Img,
            (None, Some(_), Some(_)) => JobKind::Inpaint,
        }
    }
}

/// The longest `ttl_s`: ten years.
pub const MAX_TTL_S: u64 = 10 * 365 * 24 * 3600;

/// The bus job's fields as a submission calls them, for the errors of the job checked after the mapping:
/// `(the job's, the submission's)`. The rest have the same names on both.
pub const SUBMISSION_FIELD_NAMES: &[(&str, &str)] = &[
    ("output.quality", "quality"),
    ("output.format", "output_format"),
    ("deadline", "timeout_s"),
    ("expires_at", "ttl_s"),
    ("idempotency_key", "Idempotency-Key"),
];

/// The same job as an HTTP submission: inline images as base64, the deadline as `timeout_s` and the expiry
/// as `ttl_s` from its creation (rounded up to whole seconds).
impl From<&JobRequest> for JobSubmission {
    fn from(job: &JobRequest) -> Self {
        use base64::Engine;
        let image = |s: &Option<ImageSource>| match s {
            Some(ImageSource::Inline(bytes)) => {
                Some(ImageInput::Base64(base64::engine::general_purpose::STANDARD.encode(bytes)))
            }
            Some(ImageSource::ObjectKey(k)) => Some(ImageInput::Upload { object_key: k.clone() }),
            None => None,
        };
        Self {
            kind: Some(job.kind),
            model: job.model.clone(),
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone(),
            width: job.width,
            height: job.height,
            steps: job.steps,
            guidance: job.guidance,
            scheduler: job.scheduler.clone(),
            timestep_spacing: job.timestep_spacing.clone(),
            seed: job.seed,
            num_images: job.num_images,
            init_image: image(&job.init_image),
            mask: image(&job.mask),
            strength: job.strength,
            mask_blur: Some(job.mask_blur),
            invert_mask: job.invert_mask,
            paste_back: Some(job.paste_back),
            resize_mode: Some(job.resize_mode),
            output_format: Some(job.output.format),
            quality: job.output.quality,
            timeout_s: job.deadline.map(|d| d.saturating_sub(job.created_at).div_ceil(1000).max(1)),
            ttl_s: job.expires_at.map(|e| e.saturating_sub(job.created_at).div_ceil(1000).max(1)),
            loras: job.loras.clone(),
            clip_skip: job.clip_skip,
            cache: (!job.cache).then_some(false),
            priority: (job.priority != Priority::Normal).then_some(job.priority),
            // A job's webhook is the queen's, not the bus message's.
            webhook: None,
        }
    }
}

/// A submission as a bus job with a fresh id, created now (see [`JobSubmission::into_job`]).
#[cfg(feature = "new-ids")]
impl TryFrom<JobSubmission> for JobRequest {
    type Error = ProtocolError;

    fn try_from(sub: JobSubmission) -> Result<Self, ProtocolError> {
        sub.into_job(uuid::Uuid::new_v4(), crate::protocol::now_millis())
    }
}

impl JobSubmission {
    /// The bus job `id`, created at `created_at`: base64 images decoded (a bad one is an error naming its
    /// field), upload keys as object keys. Nothing else is checked here: the queen then checks the job's
    /// rules ([`JobRequest::validate`]), its images and its model.
    pub fn into_job(self, id: uuid::Uuid, created_at: u64) -> Result<JobRequest, ProtocolError> {
        let sub = self;
        let image = |input: Option<ImageInput>, field: &str| -> Result<Option<ImageSource>, ProtocolError> {
            Ok(match input {
                Some(ImageInput::Base64(text)) => Some(ImageSource::Inline(
                    decode_base64(&text, field).map_err(|e| ProtocolError::invalid(field, e))?,
                )),
                Some(ImageInput::Upload { object_key }) => Some(ImageSource::ObjectKey(object_key)),
                None => None,
            })
        };
        let mut job = JobRequest::with_id(id, created_at, sub.kind(), sub.model, sub.prompt);
        job.init_image = image(sub.init_image, "init_image")?;
        job.mask = image(sub.mask, "mask")?;
        job.negative_prompt = sub.negative_prompt;
        job.width = sub.width;
        job.height = sub.height;
        job.steps = sub.steps;
        job.guidance = sub.guidance;
        job.scheduler = sub.scheduler;
        job.timestep_spacing = sub.timestep_spacing;
        job.seed = sub.seed;
        job.num_images = sub.num_images;
        job.strength = sub.strength;
        job.mask_blur = sub.mask_blur.unwrap_or(job.mask_blur);
        job.invert_mask = sub.invert_mask;
        job.paste_back = sub.paste_back.unwrap_or(job.paste_back);
        job.resize_mode = sub.resize_mode.unwrap_or_default();
        job.output.format = sub.output_format.unwrap_or_default();
        job.output.quality = sub.quality;
        job.loras = sub.loras;
        job.clip_skip = sub.clip_skip;
        job.cache = sub.cache.unwrap_or(true);
        job.priority = sub.priority.unwrap_or_default();
        if sub.timeout_s == Some(0) {
            return Err(ProtocolError::invalid("timeout_s", "is 0: it must be at least 1 second"));
        }
        job.deadline = sub.timeout_s.map(|s| job.created_at.saturating_add(s.saturating_mul(1000)));
        if let Some(ttl) = sub.ttl_s.filter(|t| !(1..=MAX_TTL_S).contains(t)) {
            return Err(ProtocolError::invalid(
                "ttl_s",
                format!("is {ttl}: it must be 1 to {MAX_TTL_S} seconds (10 years)"),
            ));
        }
        job.expires_at = sub.ttl_s.map(|s| job.created_at.saturating_add(s.saturating_mul(1000)));
        Ok(job)
    }
}

/// `202 Accepted` to a submission (`200` when an idempotency key mapped it to an earlier job).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubmitResponse {
    pub job_id: Uuid,
    pub status_url: String,
    pub events_url: String,
    /// False when an idempotency key mapped the request to an earlier job.
    pub created: bool,
}

impl SubmitResponse {
    pub fn new(job_id: Uuid, created: bool) -> Self {
        Self {
            job_id,
            status_url: format!("/v1/jobs/{job_id}"),
            events_url: format!("/v1/jobs/{job_id}/events"),
            created,
        }
    }
}

/// `201 Created` to `POST /v1/uploads`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UploadResponse {
    pub object_key: String,
    pub bytes: usize,
    pub width: u32,
    pub height: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_survives_the_round_trip_through_a_submission() {
        let mut job = JobRequest::new(JobKind::Inpaint, "tiny", "a boat");
        job.init_image = Some(ImageSource::Inline(vec![1, 2, 3]));
        job.mask = Some(ImageSource::ObjectKey("uploads/m.png".into()));
        (job.width, job.height, job.steps, job.seed, job.num_images) = (Some(64), Some(48), Some(3), Some(7), 2);
        job.negative_prompt = Some(String::new());
        job.scheduler = Some("euler".into());
        job.strength = Some(0.5);
        (job.mask_blur, job.invert_mask, job.paste_back) = (9, true, false);
        job.resize_mode = ResizeMode::Pad;
        job.output.format = ImageFormat::Webp;
        job.output.quality = Some(80);
        job.deadline = Some(job.created_at + 2500);
        job.loras = vec![LoraRef { name: "style".into(), scale: -0.5 }];
        job.clip_skip = Some(2);
        job.cache = false;
        let sub = JobSubmission::from(&job);
        assert_eq!(sub.timeout_s, Some(3), "rounded up");
        let json = serde_json::to_string(&sub).unwrap();
        let back = JobRequest::try_from(serde_json::from_str::<JobSubmission>(&json).unwrap()).unwrap();
        let same = JobRequest { id: job.id, created_at: job.created_at, deadline: job.deadline, ..back };
        assert_eq!(same, job);
    }

    #[test]
    fn left_out_fields_stay_left_out() {
        let job = JobRequest::try_from(JobSubmission::new("sdxl", "a kite")).unwrap();
        assert_eq!(
            (job.width, job.height, job.steps),
            (None, None, None),
            "the model's defaults, decided by the worker"
        );
        let err = JobRequest::try_from(JobSubmission {
            init_image: Some(ImageInput::Base64("not base64 !!".into())),
            ..JobSubmission::new("tiny", "x")
        })
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("init_image"));
    }
}
