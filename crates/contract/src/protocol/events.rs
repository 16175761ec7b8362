//! What travels besides jobs: the [`Event`]s a worker publishes about a job, worker [`Heartbeat`]s, and
//! [`CancelRequest`]s.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::{ErrorCode, ProtocolError};
use super::serde_util::{is_default, uuid_str};
use super::PROTOCOL_VERSION;

/// Something that happened to a job, published by the worker on [`Subjects::events`](super::Subjects::events).
/// On the wire a map with `type` (`accepted`, `progress`, `completed`, `failed`, `cancelled`) next to the
/// variant's fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[derive(strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Event {
    Accepted(Accepted),
    Progress(Progress),
    Completed(Completed),
    Failed(Failed),
    Cancelled(Cancelled),
}

impl Event {
    /// The job the event is about.
    pub fn job_id(&self) -> Uuid {
        match self {
            Event::Accepted(e) => e.job_id,
            Event::Progress(e) => e.job_id,
            Event::Completed(e) => e.job_id,
            Event::Failed(e) => e.job_id,
            Event::Cancelled(e) => e.job_id,
        }
    }

    /// When it happened (unix milliseconds).
    pub fn at(&self) -> u64 {
        match self {
            Event::Accepted(e) => e.at,
            Event::Progress(e) => e.at,
            Event::Completed(e) => e.at,
            Event::Failed(e) => e.at,
            Event::Cancelled(e) => e.at,
        }
    }

    /// The `type` on the wire.
    pub fn type_name(&self) -> &'static str {
        self.into()
    }

    /// Whether this is the job's last event (completed, failed or cancelled).
    pub fn is_terminal(&self) -> bool {
        matches!(self, Event::Completed(_) | Event::Failed(_) | Event::Cancelled(_))
    }
}

/// A worker took the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub v: u32,
    #[serde(with = "uuid_str")]
    pub job_id: Uuid,
    pub at: u64,
    pub worker_id: String,
    /// The job's model (so a job published on the bus without the queen is listed with it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// The job's tenant (so a record made from events alone stays its tenant's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// A denoising step finished.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub v: u32,
    #[serde(with = "uuid_str")]
    pub job_id: Uuid,
    pub at: u64,
    /// Denoising steps done (1-based), of `total`.
    pub step: u32,
    pub total: u32,
    /// 0–100.
    pub percent: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// A small JPEG of the current latents, when the worker makes previews.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub preview_jpeg: Option<Vec<u8>>,
    /// `loading` while the worker loads the model (step 0); absent while denoising.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// The step this delivery took the job up from, a checkpoint an earlier delivery left; absent when it
    /// started from the beginning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<u32>,
}

/// What a running job is doing, beside denoising.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    /// The model's weights are loading (the worker had it in its catalogue, not in memory).
    Loading,
}

/// `step` of `total` as a percentage, 0–100.
fn percent_of(step: u32, total: u32) -> f32 {
    if total == 0 {
        0.0
    } else {
        (100.0 * f64::from(step) / f64::from(total)).min(100.0) as f32
    }
}

impl Progress {
    /// A progress event at `at`, with `percent` computed from `step` and `total`.
    pub fn new(job_id: Uuid, step: u32, total: u32, at: u64) -> Self {
        let percent = percent_of(step, total);
        Self {
            v: PROTOCOL_VERSION,
            job_id,
            at,
            step,
            total,
            percent,
            eta_ms: None,
            preview_jpeg: None,
            phase: None,
            resumed_from_step: None,
        }
    }

    /// The percent a reader can keep: anyone on the bus can publish events, and a NaN or infinite one
    /// would be written as JSON `null`, which no status record or client reads back. Such a value is
    /// computed from `step` and `total`; any other is clamped to 0–100.
    pub fn checked_percent(&self) -> f32 {
        match self.percent.is_finite() {
            true => self.percent.clamp(0.0, 100.0),
            false => percent_of(self.step, self.total),
        }
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progress")
            .field("v", &self.v)
            .field("job_id", &self.job_id)
            .field("at", &self.at)
            .field("step", &self.step)
            .field("total", &self.total)
            .field("percent", &self.percent)
            .field("eta_ms", &self.eta_ms)
            .field("preview_jpeg", &self.preview_jpeg.as_ref().map(|b| format!("{} bytes", b.len())))
            .field("phase", &self.phase)
            .field("resumed_from_step", &self.resumed_from_step)
            .finish()
    }
}

/// One stored result image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageResult {
    /// 0-based, in seed order.
    pub index: u32,
    /// The object key ([`result_key`](super::result_key)).
    pub key: String,
    /// A URL for it (e.g. presigned), when the worker makes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    /// Size of the stored object.
    pub bytes: u64,
    pub content_type: String,
}

#[cfg(test)]
impl ImageResult {
    /// An 8×8 image stored under `key`, for tests of what is kept of a result.
    pub(crate) fn stored(index: u32, key: String, content_type: &str) -> Self {
        Self { index, key, url: None, width: 8, height: 8, seed: 1, bytes: 10, content_type: content_type.into() }
    }
}

/// Where the time went, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Timings {
    /// From `created_at` to the worker taking the job.
    pub queue_ms: u64,
    /// Part of `generation_ms`: merging the job's LoRAs into the weights (0 when they were in effect already).
    #[serde(default)]
    pub lora_ms: u64,
    /// Loading the model's weights first, when it was not resident (0 when it was).
    #[serde(default)]
    pub load_ms: u64,
    pub generation_ms: u64,
    pub upload_ms: u64,
    /// From `created_at` to completion.
    pub total_ms: u64,
}

/// The job's images are stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completed {
    pub v: u32,
    #[serde(with = "uuid_str")]
    pub job_id: Uuid,
    pub at: u64,
    pub images: Vec<ImageResult>,
    pub timings: Timings,
    /// What the submitter should know about how the job ran (a prompt cut to the text encoder's 77 tokens),
    /// at most [`MAX_WARNINGS`] of at most [`MAX_WARNING_BYTES`] each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The images are copies of an earlier job's with the same parameters, seed and model weights: nothing
    /// was generated (the result cache).
    #[serde(default, skip_serializing_if = "is_default")]
    pub cached: bool,
}

impl Completed {
    /// The images that are the job's own results ([`super::is_result_of`]): all of them, from a worker. Anyone on
    /// the bus can publish events, and a manifest or cached result is read back from the store, so whatever lists
    /// a job's images to be kept, served or copied takes these.
    /// Each index once (the first listed): an event listing one key a thousand times is no thousand images.
    /// An image's `url` is kept only when it is a [plain web URL](is_plain_web_url): browsers are sent to it.
    pub fn own_images(&self) -> Vec<ImageResult> {
        let mut seen = std::collections::HashSet::new();
        self.images
            .iter()
            .filter(|i| super::is_result_of(i, self.job_id) && seen.insert(i.index))
            .map(|i| ImageResult { url: i.url.clone().filter(|u| is_plain_web_url(u)), ..i.clone() })
            .collect()
    }

    /// The first image that is not one of the job's own results, if any.
    pub fn foreign_image(&self) -> Option<&ImageResult> {
        self.images.iter().find(|i| !super::is_result_of(i, self.job_id))
    }
}

/// The longest image URL kept (a presigned S3 URL is about 1.5 KB).
const MAX_IMAGE_URL_BYTES: usize = 4096;

/// An `http(s)` URL of at most [`MAX_IMAGE_URL_BYTES`] made only of the characters RFC 3986 allows (the rest
/// percent-encoded, as a presigned URL is): what is kept of the URL a worker gives an image, which browsers
/// are sent to. Not a `javascript:` or `data:` one, nor control characters or quotes, which JSON writes as
/// six bytes each (the API serves the image by its key either way).
pub fn is_plain_web_url(url: &str) -> bool {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    url.len() <= MAX_IMAGE_URL_BYTES
        && (lower.starts_with("https://") || lower.starts_with("http://"))
        && url.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(&b))
}

/// The most warnings a `completed` event carries.
pub const MAX_WARNINGS: usize = 8;

/// The most bytes of one warning.
pub const MAX_WARNING_BYTES: usize = 512;

/// The job failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub v: u32,
    #[serde(with = "uuid_str")]
    pub job_id: Uuid,
    pub at: u64,
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl Failed {
    /// The failure of `job_id` for a protocol error (an undecodable or invalid job).
    pub fn from_error(job_id: Uuid, err: &ProtocolError, at: u64) -> Self {
        Self { v: PROTOCOL_VERSION, job_id, at, code: err.code, message: err.message.clone(), field: err.field.clone() }
    }
}

/// The job was cancelled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancelled {
    pub v: u32,
    #[serde(with = "uuid_str")]
    pub job_id: Uuid,
    pub at: u64,
    /// Steps done when it stopped; `None`: before generation started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_step: Option<u32>,
}

/// What a worker is doing. On the wire `{"status": "idle"}` or `{"status": "busy", "job_id": "..."}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum WorkerState {
    Idle,
    Busy {
        #[serde(with = "uuid_str")]
        job_id: Uuid,
    },
}

/// A worker's periodic sign of life, on [`Subjects::heartbeat`](super::Subjects::heartbeat) every
/// [`HEARTBEAT_INTERVAL_SECS`](super::HEARTBEAT_INTERVAL_SECS).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Heartbeat {
    pub v: u32,
    pub at: u64,
    pub worker_id: String,
    pub hostname: String,
    /// E.g. `cuda:0 (NVIDIA H100 80GB HBM3)`.
    pub device: String,
    /// The models it serves (it consumes their job subjects).
    pub models: Vec<String>,
    /// The LoRAs jobs can name on this worker (its catalogue), at most
    /// [`MAX_HEARTBEAT_LORAS`](super::MAX_HEARTBEAT_LORAS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<String>,
    /// Of `models`, those whose weights are in memory now (the others load when a job needs them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resident: Vec<String>,
    pub state: WorkerState,
    pub jobs_done: u64,
    pub jobs_failed: u64,
    pub uptime_s: u64,
    /// The worker's software version (the crate version).
    pub version: String,
    /// Set on the last heartbeat of a worker that shuts down cleanly: it is gone, not lost.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
    /// The most images it generates in one batch (`--max-batch`); 0 from workers that predate batching.
    #[serde(default)]
    pub max_batch: u32,
    /// The batches it has run since it started, by size: `batches[i]` counts batches of `i + 1` images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batches: Vec<u64>,
    /// Jobs it answered from the result cache since it started, generating nothing.
    #[serde(default)]
    pub cache_hits: u64,
}

/// Asks whoever runs `job_id` to stop, on [`Subjects::cancel`](super::Subjects::cancel).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub v: u32,
    #[serde(with = "uuid_str")]
    pub job_id: Uuid,
    pub at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Sent by the queens' sweeper: the job's ttl passed, and it is stopped as timed out (`TIMEOUT`), not
    /// cancelled.
    #[serde(default, skip_serializing_if = "is_default")]
    pub expired: bool,
}
