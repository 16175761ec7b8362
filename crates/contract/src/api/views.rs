//! What the queen answers about jobs and the fleet: a job's status record and its view, job lists,
//! cancellation, models and workers.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::protocol::Limits;
use crate::protocol::{ErrorCode, Heartbeat, ImageResult, JobKind, JobPhase, JobRequest, LoraRef, Timings};
use crate::vocab::{self, ImageFormat};

/// Where a job is in its life.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    strum::IntoStaticStr,
    strum::EnumString,
    strum::VariantArray,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed | JobState::Cancelled)
    }

    /// The state a terminal `event` ends its job in; `None` for any other event.
    pub fn ended_by(event: &crate::protocol::Event) -> Option<JobState> {
        use crate::protocol::Event;
        match event {
            Event::Completed(_) => Some(JobState::Completed),
            Event::Failed(_) => Some(JobState::Failed),
            Event::Cancelled(_) => Some(JobState::Cancelled),
            Event::Accepted(_) | Event::Progress(_) => None,
        }
    }

    /// The wire name, e.g. `queued`.
    pub fn name(self) -> &'static str {
        self.into()
    }

    pub const ALL: &'static [JobState] = <JobState as strum::VariantArray>::VARIANTS;

    /// A state by its name; the error lists the names.
    pub fn parse(text: &str) -> Result<Self, String> {
        text.parse().map_err(|_| {
            let names: Vec<&str> = Self::ALL.iter().map(|s| s.name()).collect();
            format!("unknown state {} ({})", crate::protocol::quoted(text), names.join(", "))
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProgressInfo {
    pub step: u32,
    pub total: u32,
    #[serde(deserialize_with = "null_as_zero")]
    pub percent: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// `loading` while the worker loads the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
}

/// A percent stored as `null` reads as 0: the JSON of a NaN one, which queens before 2026-12 wrote from an
/// event (a record holding one could not be read at all).
fn null_as_zero<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(0.0))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// What was asked for (the parts worth showing; inputs are not kept).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RequestSummary {
    pub prompt: String,
    /// Absent: the model's default size (the images say which it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub num_images: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<String>,
    /// img2img and inpainting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Inpainting: the mask's blur radius, whether it was inverted, whether the result was pasted back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_blur: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invert_mask: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paste_back: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_skip: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_format: Option<ImageFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u8>,
}

impl RequestSummary {
    /// What a job asked for; inpainting's options only for inpainting jobs.
    pub fn of(job: &JobRequest) -> Self {
        let inpaint = job.kind == JobKind::Inpaint;
        Self {
            prompt: job.prompt.clone(),
            width: job.width,
            height: job.height,
            steps: job.steps,
            seed: job.seed,
            num_images: job.num_images,
            negative_prompt: job.negative_prompt.clone(),
            guidance: job.guidance,
            scheduler: job.scheduler.clone(),
            timestep_spacing: job.timestep_spacing.clone(),
            strength: job.strength,
            mask_blur: inpaint.then_some(job.mask_blur),
            invert_mask: inpaint.then_some(job.invert_mask),
            paste_back: inpaint.then_some(job.paste_back),
            loras: job.loras.clone(),
            clip_skip: job.clip_skip,
            output_format: Some(job.output.format),
            quality: job.output.quality,
        }
    }
}

/// One job's status record (JSON in the queen's KV bucket, and the core of `GET /v1/jobs/{id}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobStatus {
    pub job_id: Uuid,
    /// Empty only until the first event of a job published on the bus without the queen arrives from a
    /// worker that names it.
    #[serde(default)]
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<JobKind>,
    pub state: JobState,
    pub created_at: u64,
    pub updated_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// How many times a worker took the job (more than one: a redelivery).
    #[serde(default)]
    pub deliveries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    /// What the worker wants the submitter to know (a prompt cut to the text encoder's 77 tokens).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Steps done when it was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_at_step: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestSummary>,
    /// The job's sequence in the jobs stream (for its queue position and for removing it when cancelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_seq: Option<u64>,
    /// `at` of the newest event applied.
    #[serde(default)]
    pub last_event_at: u64,
    /// Completed from the result cache: its images are copies of an earlier job's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
    /// The queue the job waits in (`normal` is left out).
    #[serde(default, skip_serializing_if = "is_normal")]
    pub priority: vocab::Priority,
    /// When the job expires (its `ttl_s`): from then on its status is `410 Gone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The job's webhook and its deliveries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<super::WebhookInfo>,
    /// The tenant of the token that submitted it: only that tenant's tokens and operators' (tokens without
    /// a tenant) see the job. Left out for an operator's job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl JobStatus {
    /// The record as the API shows it: its webhook's URL as its origin alone ([`WebhookInfo::shown`]).
    ///
    /// [`WebhookInfo::shown`]: super::WebhookInfo::shown
    pub fn shown(mut self) -> Self {
        self.webhook = self.webhook.map(super::WebhookInfo::shown);
        self
    }

    /// Whether the job's ttl has passed at `now`.
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

fn is_normal(p: &vocab::Priority) -> bool {
    *p == vocab::Priority::Normal
}

/// `GET /v1/jobs/{id}`: a job's status with what the queen knows beside the record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusView {
    #[serde(flatten)]
    pub status: JobStatus,
    /// Jobs ahead of it in its model's queue (queued jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// Estimated time to completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// Queued for a model no live worker serves now: it runs when one starts (a fleet that scales from
    /// zero on queue depth starts one for it).
    #[serde(default)]
    pub waiting_for_worker: bool,
    /// The worker holding it stopped sending heartbeats: the job waits for redelivery.
    #[serde(default)]
    pub waiting_for_redelivery: bool,
    /// Where to fetch each image: a presigned URL, else this API's image endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_urls: Vec<String>,
}

/// `GET /v1/jobs`: one page, newest first (in the order the queens first heard of the jobs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobStatus>,
    /// Without filters, every job kept; with `state` or `model`, those matching among the jobs looked
    /// through (all of them when `total_exact`).
    pub total: usize,
    /// Whether `total` counts the whole list (false: a filtered list larger than one request looks through).
    #[serde(default)]
    pub total_exact: bool,
    /// The `offset` of the next page, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<usize>,
    /// Where the next page starts (`?cursor=`), when there may be one: also after a page answered short,
    /// past the 2000 index entries one request looks through at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<u64>,
}

/// What `DELETE /v1/jobs/{id}` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, strum::IntoStaticStr)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum CancelState {
    /// It never started: removed from the queue (200).
    Cancelled,
    /// A worker stops it within a step (202).
    Cancelling,
}

impl CancelState {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

impl PartialEq<&str> for CancelState {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CancelResponse {
    pub job_id: Uuid,
    pub state: CancelState,
}

/// `GET /v1/me`: what the token the request presented may do (its `--token-file` line's options).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// The tenant it acts for: it sees that tenant's jobs alone. Absent for an operator's token (every job,
    /// the fleet's workers and metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The priority its jobs get when they name none, and the highest they may ask for.
    pub default_priority: vocab::Priority,
    pub max_priority: vocab::Priority,
    /// How many jobs it may queue (`N/s`, `N/min` or `N/h`); absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submit_rate: Option<String>,
    /// False when the queen checks no token (`--no-auth` without any token).
    pub authenticated: bool,
}

/// `GET /v1/limits`: what a job may ask for from this queen, and the values its choice fields take, so a
/// client can check a form before submitting it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LimitsView {
    #[serde(flatten)]
    pub limits: Limits,
    /// Largest request body (JSON with inline images, or an upload).
    pub max_body_bytes: usize,
    /// Sizes are multiples of this.
    pub size_multiple: u32,
    pub schedulers: Vec<String>,
    pub timestep_spacings: Vec<String>,
    pub output_formats: Vec<String>,
    pub resize_modes: Vec<String>,
    pub default_img2img_strength: f64,
    pub default_inpaint_strength: f64,
    pub default_mask_blur: u32,
}

impl LimitsView {
    pub fn new(limits: Limits, max_body_bytes: usize) -> Self {
        use strum::VariantNames;
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        Self {
            limits,
            max_body_bytes,
            size_multiple: 8,
            schedulers: names(&vocab::SCHEDULERS),
            timestep_spacings: names(&vocab::TIMESTEP_SPACINGS),
            output_formats: names(ImageFormat::VARIANTS),
            resize_modes: names(vocab::ResizeMode::VARIANTS),
            default_img2img_strength: vocab::DEFAULT_IMG2IMG_STRENGTH,
            default_inpaint_strength: vocab::DEFAULT_INPAINT_STRENGTH,
            default_mask_blur: vocab::DEFAULT_MASK_BLUR,
        }
    }
}

/// A model of the fleet's catalogue (`GET /v1/models`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelInfo {
    pub name: String,
    /// Live workers serving it (0: jobs for it wait until one starts).
    pub workers: usize,
    /// Of those, the workers holding it in memory (the others load it for their first job of it).
    #[serde(default)]
    pub resident_workers: usize,
    /// Jobs waiting for one of its workers (absent when NATS cannot say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<u64>,
    /// LoRAs the model's workers can apply (`loras[].name` of a job), sorted.
    #[serde(default)]
    pub loras: Vec<String>,
    /// The defaults of a built-in short name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub defaults: Option<serde_json::Value>,
}

/// A worker and when it was last heard of (`GET /v1/workers`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerInfo {
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
    pub last_seen: u64,
    /// Silent for longer than the queen's `--worker-lost-after` without having said goodbye.
    pub lost: bool,
    /// Said goodbye: its last heartbeat came as it shut down cleanly.
    #[serde(default)]
    pub stopped: bool,
}

impl WorkerInfo {
    /// `busy`, `idle`, `stopped` or `lost`.
    pub fn liveness(&self) -> &'static str {
        match (self.stopped, self.lost, self.heartbeat.state) {
            (true, _, _) => "stopped",
            (false, true, _) => "lost",
            (false, false, crate::protocol::WorkerState::Idle) => "idle",
            (false, false, crate::protocol::WorkerState::Busy { .. }) => "busy",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_summary_keeps_what_changes_the_pixels_and_only_its_kinds_options() {
        use crate::protocol::ImageSource;
        let mut job = JobRequest::new(JobKind::Txt2Img, "tiny", "a kite");
        (job.guidance, job.scheduler, job.negative_prompt) = (Some(5.5), Some("euler".into()), Some("rain".into()));
        job.loras = vec![LoraRef { name: "ink".into(), scale: 0.5 }];
        let summary = RequestSummary::of(&job);
        assert_eq!((summary.guidance, summary.scheduler.as_deref()), (Some(5.5), Some("euler")));
        assert_eq!((summary.mask_blur, summary.paste_back), (None, None), "no inpainting options for txt2img");
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(serde_json::from_value::<RequestSummary>(json.clone()).unwrap(), summary);
        assert!(json.get("mask_blur").is_none());
        job.kind = JobKind::Inpaint;
        job.init_image = Some(ImageSource::ObjectKey("uploads/a.png".into()));
        (job.mask_blur, job.strength) = (9, Some(0.7));
        let summary = RequestSummary::of(&job);
        assert_eq!((summary.mask_blur, summary.strength, summary.paste_back), (Some(9), Some(0.7), Some(true)));
    }
}
