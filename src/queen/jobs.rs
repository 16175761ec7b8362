//! The queen's job service: what the HTTP handlers ask for, over the bus, the status bucket, the object
//! store and the fleet's view: lists, cancellation of queued and running jobs, images, and the model
//! catalogue that decides which models jobs may name. Submission is in `submit.rs`; a job's view with its
//! queue position in `queue.rs`. Errors are [`JobsError`], classified for HTTP by `http/error.rs`.

use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

use super::aggregator::ModelStats;
use super::expiry::DequeuedCheck;
use super::fleet::Fleet;
use super::index::{records, JobIndex, SCAN_LIMIT};
use super::status::{StatusStore, StatusTooLarge};
use super::tenancy::Scope;
use crate::api::{CancelResponse, CancelState, JobList, JobState, JobStatus, UploadResponse};
use crate::bus::BusClient;
use crate::protocol::{self, Event, Limits, ProtocolError};
use crate::storage::{Store, StoreError};

/// How long after a queued job's cancel its [`DequeuedCheck`] looks for its end: well past the
/// queen's own first try at publishing it (10 s).
pub(super) const DEQUEUED_CHECK_AFTER: Duration = Duration::from_secs(30);

/// A `cancelled` event, at `at`, for a job no worker ran.
pub(super) fn cancelled(job_id: Uuid, at: u64) -> Event {
    Event::Cancelled(protocol::Cancelled { v: protocol::PROTOCOL_VERSION, job_id, at, at_step: None })
}

/// Why the queen stops a job: its user cancelled it, or its ttl passed (the sweeper).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StopCause {
    Cancel,
    Expiry,
}

/// The end of a job the queen took off the queue: `cancelled`, or `failed` (`TIMEOUT`) when its ttl passed.
pub(super) fn dequeued_end(job_id: Uuid, at: u64, expired: bool) -> Event {
    if !expired {
        return cancelled(job_id, at);
    }
    let message = "the job expired (its ttl passed) while it was queued".into();
    let (v, code) = (protocol::PROTOCOL_VERSION, protocol::ErrorCode::Timeout);
    Event::Failed(protocol::Failed { v, job_id, at, code, message, field: None })
}

/// Why a request of the service failed.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// The request breaks a rule (422), naming the field.
    #[error(transparent)]
    Invalid(#[from] ProtocolError),
    /// Something is over its size limit (413).
    #[error("{message}")]
    TooLarge { field: Option<String>, message: String },
    /// The token submitted more jobs than its rate allows (429): the next one after `wait`.
    #[error("this token's submit_rate is {rate}: the next job in {} s", whole_seconds(*.wait))]
    RateLimited { rate: super::rate::SubmitRate, wait: Duration },
    /// The token's tenant may not do this (403), naming the field when one is at fault.
    #[error("{message}")]
    Forbidden { field: Option<String>, message: String },
    #[error("no job {0}")]
    NotFound(Uuid),
    #[error("job {0} expired (its ttl_s passed): its status and images are gone")]
    Expired(Uuid),
    #[error("{0}")]
    NoImage(String),
    #[error("job {id} is already {}", state.name())]
    AlreadyFinished { id: Uuid, state: JobState },
    #[error("job {id} is {}", state.name())]
    NotCompleted { id: Uuid, state: JobState },
    /// A request that waits for its job's end saw it fail on its worker (502), not for what it asked.
    #[error("job {id} failed on its worker ({code}): {message}")]
    JobFailed { id: Uuid, code: crate::protocol::ErrorCode, message: String },
    /// A request that waits for its job's end stopped waiting (504); the job goes on.
    #[error("job {id} has not ended: {why}; it goes on: follow it at GET /v1/jobs/{id}")]
    WaitTimeout { id: Uuid, why: String },
    /// NATS or the object store cannot be reached now (503): the same request may succeed later.
    #[error("{0:#}")]
    Unavailable(anyhow::Error),
    /// A bug, or data the queen cannot read (500).
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

/// `wait` in whole seconds, rounded up, at least 1 (what `Retry-After` can say).
pub fn whole_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

impl From<super::tenancy::Forbidden> for JobsError {
    fn from(e: super::tenancy::Forbidden) -> Self {
        JobsError::Forbidden { field: e.field, message: e.message }
    }
}

impl JobsError {
    /// An error from the bus or the status bucket: unavailable, unless it is about what was read.
    pub fn bus(e: anyhow::Error) -> Self {
        if e.is::<serde_json::Error>() || e.is::<StatusTooLarge>() {
            JobsError::Internal(e)
        } else {
            JobsError::Unavailable(e)
        }
    }

    pub(super) fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        JobsError::Invalid(ProtocolError::invalid(field, message))
    }
}

impl From<StoreError> for JobsError {
    fn from(e: StoreError) -> Self {
        JobsError::Unavailable(e.into())
    }
}

pub type JobsResult<T> = Result<T, JobsError>;

/// Which models jobs may name.
#[derive(Clone, Debug)]
pub struct ModelPolicy {
    /// `false`: any model (`--accept-unserved-models`; its jobs wait in the queue).
    pub require_known: bool,
    /// Models always accepted, served now or not (`--model-catalogue`).
    pub catalogue: Vec<String>,
    /// How long a model stays accepted after the last worker that served it went away.
    pub retention: Duration,
}

impl Default for ModelPolicy {
    fn default() -> Self {
        Self { require_known: true, catalogue: Vec::new(), retention: Duration::from_secs(7 * 24 * 3600) }
    }
}

/// What `GET /v1/jobs` asks for.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub state: Option<JobState>,
    pub model: Option<String>,
    /// Only this tenant's jobs (a tenant's token lists no others).
    pub tenant: Option<String>,
    pub limit: usize,
    pub offset: usize,
    /// Take up a walk where an earlier page's `next_cursor` left it.
    pub cursor: Option<u64>,
}

/// The service; cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    pub bus: BusClient,
    pub status: StatusStore,
    pub index: JobIndex,
    pub store: Store,
    pub fleet: Fleet,
    pub stats: ModelStats,
    pub limits: Limits,
    pub models: ModelPolicy,
    pub expiry: super::expiry::Expiry,
    pub webhooks: super::webhooks::Webhooks,
    /// How often a live event feed reads its job's record ([`super::feed::feed`]).
    pub feed_recheck: std::time::Duration,
    /// How long after its submission a keyed job the bus did not confirm is published again
    /// ([`super::submit::PUBLISH_CONFIRM_WINDOW`]).
    pub publish_confirm_window: std::time::Duration,
    /// The queues as last walked, shared by every status request (`queue_walk::QueueWalks`).
    pub walks: std::sync::Arc<super::queue_walk::QueueWalks>,
    /// The submission limiters of tokens with a `submit_rate`.
    pub submit_rates: super::rate::SubmitRates,
}

impl Jobs {
    /// Whether jobs may name `model`: a live worker serves it, one did within the retention window (as this
    /// queen heard, or as its job consumer on the bus shows), or the queen's catalogue lists it. A bus that
    /// cannot answer is unavailable (503), not a reason to refuse the model.
    pub async fn accepts_model(&self, model: &str) -> JobsResult<bool> {
        let now = protocol::now_millis();
        if self.models.catalogue.iter().any(|m| m == model)
            || self.fleet.advertised_within(model, now, self.models.retention)
        {
            return Ok(true);
        }
        // A worker that served it before this queen started left its durable consumer behind.
        let stream = self
            .bus
            .jetstream()
            .get_stream(self.bus.subjects().jobs_stream())
            .await
            .map_err(|e| JobsError::Unavailable(anyhow::anyhow!("cannot read the jobs stream: {e}")))?;
        match stream.consumer_info(crate::bus::consumer_name(model)).await {
            Ok(_) => Ok(true),
            Err(e) if crate::bus::consumer_missing(&e) => Ok(false),
            Err(e) => Err(JobsError::Unavailable(anyhow::anyhow!("cannot ask the bus about model {model}: {e}"))),
        }
    }

    /// The models jobs may name, as this queen knows them (its catalogue and what workers advertised).
    pub async fn catalogue(&self) -> Vec<String> {
        let now = protocol::now_millis();
        let mut names = self.models.catalogue.clone();
        names.extend(self.fleet.advertised(now, self.models.retention));
        names.sort();
        names.dedup();
        names
    }

    /// `POST /v1/uploads`: an image to use as `init_image` or `mask` by key.
    pub async fn upload(&self, body: Bytes, scope: &Scope) -> JobsResult<UploadResponse> {
        self.store_input(body, "body", "upload", scope).await
    }

    /// An input image checked (`field` names it in errors, `what` in their messages) and stored under
    /// `uploads/` (a tenant's under `uploads/<tenant>/`), as `POST /v1/uploads` does; a job then names it by key.
    pub async fn store_input(&self, body: Bytes, field: &str, what: &str, scope: &Scope) -> JobsResult<UploadResponse> {
        // Only its size is kept: the decoded pixels go with the decode's slot, not held while the store is slow.
        let size = |img: image::DynamicImage| Ok((img.width(), img.height()));
        let (width, height) = crate::image_input::decode_bounded_then(body.clone(), what, size)
            .await
            .map_err(|e| decode_error(field, e))?;
        let format = image::guess_format(&body).map_err(|e| JobsError::invalid(field, e))?;
        let ext = format.extensions_str().first().copied().unwrap_or("img");
        let key = format!("{}{}.{ext}", protocol::uploads_prefix(scope.tenant()), Uuid::new_v4());
        self.store.put(&key, body.clone(), format.to_mime_type()).await?;
        Ok(UploadResponse { object_key: key, bytes: body.len(), width, height })
    }

    /// Job `id`'s record, when the job is within `scope` (another tenant's is not found, expired or not).
    pub async fn get(&self, id: Uuid, scope: &Scope) -> JobsResult<JobStatus> {
        let status = self.status.get(id).await.map_err(JobsError::bus)?;
        let status = status.filter(|s| scope.sees(s)).ok_or(JobsError::NotFound(id))?;
        if status.is_expired(protocol::now_millis()) {
            return Err(JobsError::Expired(id));
        }
        Ok(status)
    }

    /// One page of jobs, newest first: the index walked from its newest end (or from `cursor`), reading
    /// only the records it passes, never the whole status bucket.
    pub async fn list(&self, query: &ListQuery) -> JobsResult<JobList> {
        let filtered = query.state.is_some() || query.model.is_some() || query.tenant.is_some();
        let now = protocol::now_millis();
        let keep = |s: &JobStatus| {
            query.state.is_none_or(|w| s.state == w)
                && query.model.as_deref().is_none_or(|m| s.model == m)
                && query.tenant.as_ref().is_none_or(|t| s.tenant.as_ref() == Some(t))
                && !s.is_expired(now)
        };
        // One request looks through at most SCAN_LIMIT index entries: a page that cannot fill within them
        // is answered short, with the cursor to go on from.
        let (count, mut walk) = self.index.walk(query.cursor, SCAN_LIMIT).await.map_err(JobsError::bus)?;
        let (mut jobs, mut matched) = (Vec::new(), 0usize);
        // The index sequence of the page's last job: the next page starts after it.
        let mut last_shown = None;
        loop {
            // Without filters the total is the index's count: stop at a full page. With filters, go on
            // counting for the total, as far as one request may look.
            if (jobs.len() >= query.limit && !filtered) || walk.stopped() {
                break;
            }
            let mut entries = Vec::with_capacity(32);
            while entries.len() < 32 {
                match walk.next().await.map_err(JobsError::bus)? {
                    // Another tenant's entry (or an operator's) is passed over without reading its record.
                    Some(entry) if query.tenant.is_some() && entry.tenant != query.tenant => {}
                    Some(entry) => entries.push((entry.seq, entry.id)),
                    None => break,
                }
            }
            let ids: Vec<Uuid> = entries.iter().map(|&(_, id)| id).collect();
            let found = records(ids, |id| self.status.get(id)).await;
            for ((seq, _), record) in entries.iter().zip(found) {
                // A record gone with its max age (or a job that was never queued) is skipped, and so is one
                // that does not read back (said in the log): one bad record must not hide every page.
                let status = match record {
                    Ok(Some(status)) => status,
                    Ok(None) => continue,
                    Err(e) if e.is::<super::status::UnreadableStatus>() => {
                        tracing::warn!("job list: {e:#}");
                        continue;
                    }
                    Err(e) => return Err(JobsError::bus(e)),
                };
                if keep(&status) {
                    matched += 1;
                    if matched > query.offset && jobs.len() < query.limit {
                        jobs.push(status.shown());
                        last_shown = Some(*seq);
                    }
                }
            }
        }
        let (total, total_exact) =
            if filtered { (matched, walk.done() && query.cursor.is_none()) } else { (count as usize, true) };
        let shown = query.offset + jobs.len();
        let page_full = jobs.len() >= query.limit;
        // More: jobs read past the page, or an index not read to its end. (Not the index's whole count: from a
        // cursor, a full last page then pointed to an empty one.)
        let more = matched > shown || !walk.done();
        let next_offset = (page_full && more).then_some(shown);
        let next_cursor = match (page_full, last_shown) {
            (true, Some(seq)) if more => Some(seq),
            (false, _) if !walk.done() => Some(walk.cursor()),
            _ => None,
        };
        Ok(JobList { jobs, total, total_exact, next_offset, next_cursor })
    }

    /// Cancels a job: a queued one is removed from the queue and reported `cancelled` at once; a running
    /// one is asked to stop (its worker reports `cancelled` within a step).
    pub async fn cancel(&self, id: Uuid, scope: &Scope) -> JobsResult<CancelResponse> {
        self.cancel_record(self.get(id, scope).await?, StopCause::Cancel).await
    }

    /// Stops the job `status` is the record of: cancels it, or, for `StopCause::Expiry`, ends it as timed
    /// out (a running one by its worker).
    pub(super) async fn cancel_record(&self, status: JobStatus, cause: StopCause) -> JobsResult<CancelResponse> {
        let id = status.job_id;
        if status.state.is_terminal() {
            return Err(JobsError::AlreadyFinished { id, state: status.state });
        }
        // Tell the workers in any case: one may be taking it right now.
        let told = match cause {
            StopCause::Cancel => self.bus.cancel(id, Some("cancelled through the API".into())).await,
            StopCause::Expiry => self.bus.cancel_expired(id).await,
        };
        told.map_err(JobsError::Unavailable)?;
        let expired = cause == StopCause::Expiry;
        if let (JobState::Queued, Some(seq)) = (status.state, status.stream_seq) {
            let stream = self.jobs_stream().await.map_err(JobsError::Unavailable)?;
            // Once its message is deleted, no worker will ever take the job, and unless one holds it now, the
            // `cancelled` this queen publishes is all that ends it: should the queen stop before that is
            // stored, any queen ends the job at this check.
            let at = protocol::now_millis();
            let check_at = at + DEQUEUED_CHECK_AFTER.as_millis() as u64;
            let check = DequeuedCheck { job_id: id, dequeued_seq: seq, cancelled_at: at, check_at, expired };
            // Without the check, a queen stopped before the end is stored would leave the job queued for ever.
            self.expiry.schedule_dequeued_check(&check).await.map_err(JobsError::Unavailable)?;
            if matches!(stream.delete_message(seq).await, Ok(true)) {
                // A worker may have finished the job and not yet settled its message (a result-cache answer
                // is that quick), with its record behind: the end it published stays the job's. One that took
                // the job as it was cancelled ended it `cancelled` on this request's word: cancelled, as asked.
                match self.bus.last_event(id).await.ok().flatten().as_ref().and_then(JobState::ended_by) {
                    Some(JobState::Cancelled) if cause == StopCause::Cancel => {
                        return Ok(CancelResponse { job_id: id, state: CancelState::Cancelled })
                    }
                    Some(state) => return Err(JobsError::AlreadyFinished { id, state }),
                    None => {}
                }
                self.report_dequeued(status, dequeued_end(id, at, expired)).await;
                return Ok(CancelResponse { job_id: id, state: CancelState::Cancelled });
            }
        }
        Ok(CancelResponse { job_id: id, state: CancelState::Cancelling })
    }

    /// Ends a job cancelled while queued whose end is still not stored at its check ([`DequeuedCheck`]; its
    /// queen stopped after or before deleting its message): its message goes if it is still there, then its
    /// `cancelled` is published, the same event its queen would have published. Not when the job's last
    /// event is an end already (a worker that took the job just as it was cancelled finished it, and the
    /// queens have not folded that yet: several fold in parallel, and the first end folded stays).
    pub(super) async fn end_dequeued(&self, check: &DequeuedCheck) -> anyhow::Result<()> {
        let (id, seq) = (check.job_id, check.dequeued_seq);
        let Some(status) = self.status.get(id).await? else { return Ok(()) };
        if status.state != JobState::Queued || status.stream_seq != Some(seq) {
            return Ok(());
        }
        if self.bus.last_event(id).await?.is_some_and(|e| e.is_terminal()) {
            return Ok(());
        }
        let stream = self.jobs_stream().await?;
        if let Err(e) = stream.delete_message(seq).await {
            // (Already deleted: the direct get below says so.)
            tracing::debug!(job_id = %id, error = %e, "the cancelled job's message was not deleted");
        }
        match stream.direct_get(seq).await {
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {}
            Ok(_) => anyhow::bail!("its message {seq} is still on the jobs stream"),
            Err(e) => return Err(e.into()),
        }
        tracing::warn!(job_id = %id, "a job cancelled while queued had no end stored: it is ended now");
        self.publish_dequeued(&dequeued_end(id, check.cancelled_at, check.expired), Duration::from_secs(10)).await?;
        Ok(())
    }

    async fn jobs_stream(&self) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
        Ok(self.bus.jetstream().get_stream(self.bus.subjects().jobs_stream()).await?)
    }

    /// Publishes the end (`cancelled`, or `failed` when it could not be queued) of a job not in the queue and
    /// folds it into its record. No worker has the job, so this event is all that will ever end it: when the bus cannot take it now,
    /// it is published in the background (the message id makes any repeat one) rather than leave the job
    /// `queued` for ever. Returns whether the end is stored now (as an event, or in the record): if not, it
    /// lasts only as long as this queen's background try.
    pub(super) async fn report_dequeued(&self, status: JobStatus, event: Event) -> bool {
        let (id, kind): (_, &'static str) = (status.job_id, (&event).into());
        let published = self.publish_dequeued(&event, Duration::from_secs(10)).await;
        if let Err(e) = &published {
            tracing::warn!(job_id = %id, event = kind, error = %e, "cannot publish the job's end yet; trying on in the background");
            let (jobs, event) = (self.clone(), event.clone());
            tokio::spawn(async move {
                if let Err(e) = jobs.publish_dequeued(&event, Duration::from_secs(6 * 3600)).await {
                    tracing::error!(job_id = %id, event = kind, error = %e, "gave up publishing the end of a job not in the queue");
                }
            });
        }
        let recorded = match self.status.update(id, || status.clone(), |s| s.apply(&event)).await {
            Ok(Some(updated)) => {
                self.stats.metrics.moved(updated.before, &updated.status);
                true
            }
            Ok(None) => true,
            Err(e) => {
                tracing::warn!(job_id = %id, event = kind, error = %e, "cannot record the job's end; its event will");
                false
            }
        };
        published.is_ok() || recorded
    }

    /// Publishes `event`, the end of a job not in the queue, trying for `patience`.
    async fn publish_dequeued(&self, event: &Event, patience: Duration) -> Result<(), crate::bus::PublishError> {
        let id = event.job_id();
        let kind: &'static str = event.into();
        let headers = crate::bus::msg_id_headers(&format!("{id}:0:{kind}"));
        let payload = protocol::encode(event).into();
        crate::bus::publish_persistent(self.bus.jetstream(), self.bus.subjects().events(id), headers, payload, patience)
            .await
            .map(drop)
    }

    /// Image `n` of a completed job: its bytes as read from the store, its size and its content type.
    pub async fn image(&self, id: Uuid, n: u32, scope: &Scope) -> JobsResult<StoredImage> {
        let status = self.get(id, scope).await?;
        let images = match status.state {
            JobState::Completed => status.images,
            // The events stream (so SSE too) says `completed` before this record has folded the event in;
            // the manifest the worker stored beside the images before publishing it says the same.
            JobState::Queued | JobState::Running => match self.stored_results(id).await? {
                Some(images) => images,
                None => return Err(JobsError::NotCompleted { id, state: status.state }),
            },
            state => return Err(JobsError::NotCompleted { id, state }),
        };
        // (A record written before results were checked may name other objects of the store.)
        let image = images
            .iter()
            .find(|i| i.index == n && protocol::is_result_of(i, id))
            .ok_or_else(|| JobsError::NoImage(format!("job {id} has no image {n}")))?;
        match self.store.get_stream(&image.key).await {
            Ok((size, bytes)) => Ok(StoredImage { bytes, size, content_type: image.content_type.clone() }),
            Err(e) if e.is_missing() => Err(JobsError::NoImage(e.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// The images listed by the job's result manifest in the store, if a worker stored one.
    async fn stored_results(&self, id: Uuid) -> JobsResult<Option<Vec<protocol::ImageResult>>> {
        // A `completed` event: what the bus carries, so this is room enough (anything larger is not one).
        const MAX_MANIFEST_BYTES: u64 = 64 << 20;
        match self.store.get_at_most(&protocol::manifest_key(id), MAX_MANIFEST_BYTES).await {
            Ok(bytes) => match protocol::decode_event(&bytes) {
                Ok(Event::Completed(c)) if c.job_id == id => Ok(Some(c.own_images())),
                _ => Ok(None),
            },
            Err(e) if e.is_missing() || matches!(e, StoreError::TooLarge { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// An image of a job, streamed from the store ([`Jobs::image`]).
pub struct StoredImage {
    pub bytes: futures::stream::BoxStream<'static, std::io::Result<Bytes>>,
    pub size: u64,
    pub content_type: String,
}

/// An image that does not decode is the client's error (422); decoders all busy is the queen's (503).
pub(crate) fn decode_error(field: &str, e: anyhow::Error) -> JobsError {
    if e.is::<crate::image_input::DecodeBusy>() {
        return JobsError::Unavailable(e);
    }
    JobsError::invalid(field, format!("{e:#}"))
}
