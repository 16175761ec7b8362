//! Submitting a job: its checks (rules, input images, the model), the idempotency key's claim, queuing it
//! on the bus, and recording it. A publish the bus did not confirm may still have been stored, so with a key
//! it is published again in the background under the same message id ([`Jobs::confirm_queued`]), and ended
//! when the bus takes none of it in time ([`Jobs::abandon_unqueued`], also run by whichever queen takes the
//! job's queued check from the schedule, should this one stop first: scheduled for every job, since a queen
//! killed between the job's record and its publish would otherwise leave it `queued` for ever).

use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

use super::jobs::{decode_error, Jobs, JobsError, JobsResult};
use super::rate::SubmitRate;
use super::status::{idempotency_entry, KeyClaim, StatusStore};
use super::tenancy::Scope;
use super::webhooks::WebhookCheckError;
use crate::api::{JobCheckError, JobState, JobStatus, JobSubmission, SubmitResponse, WebhookInfo, WebhookSpec};
use crate::bus::PublishError;
use crate::protocol::{self, Event, ImageSource, JobRequest};
use crate::storage::StoreError;

/// How long after its first try a job whose publish failed is published again: well inside the jobs
/// stream's duplicate window (`JOBS_DUPLICATE_WINDOW_SECS`), so every copy that reaches it is one job.
pub const PUBLISH_CONFIRM_WINDOW: Duration = Duration::from_secs(protocol::JOBS_DUPLICATE_WINDOW_SECS - 20);

/// The longest a job's queue is looked through for it before it is ended as one the bus never took (then
/// it is tried again later).
const FIND_QUEUED_BUDGET: Duration = Duration::from_secs(20);

/// Whose cancel is stored for a job ended unqueued: the queen's own, its user's, or the sweeper's (its ttl
/// passed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoredCancel {
    Ours,
    Users,
    Expired,
}

/// The longest a request waits for the submission that holds its idempotency key to be recorded or released.
const CLAIM_WAIT: Duration = Duration::from_secs(5);
/// How long after its record a submission may still remove it (its first publish failing): a bit longer than
/// that publish is tried.
const SETTLING: Duration = Duration::from_secs(15);
/// How long an idempotency key stays held by a job that has no record before another request takes it over:
/// far longer than writing the record takes (its queen stopped in between).
const STALE_CLAIM: Duration = Duration::from_secs(120);

/// The reason of the cancel stored for a job the bus never took.
const UNQUEUED_CANCEL: &str = "the bus did not take the job in time";

/// An idempotency key's claim on a job id, given up when dropped unless the job was queued ([`Self::keep`]).
struct IdempotencyClaim {
    status: StatusStore,
    entry: Option<String>,
}

impl IdempotencyClaim {
    fn keep(mut self) {
        self.entry = None;
    }
}

impl Drop for IdempotencyClaim {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            let status = self.status.clone();
            tokio::spawn(async move { status.release_idempotency(&entry).await });
        }
    }
}

/// Who submits a job: the caller's identity (it scopes idempotency keys and keys the submission rate),
/// whose jobs it sees (its tenant), and how fast it may submit.
#[derive(Clone, Debug)]
pub struct Submitter {
    pub id: String,
    pub scope: Scope,
    pub rate: Option<SubmitRate>,
}

impl Jobs {
    /// Checks a submission, queues it, and records its status; `who` scopes its idempotency key, gives the
    /// job its tenant and limits the inputs it may name ([`Scope::claim`]), and takes its rate once the job
    /// is a new one that passed every check. Runs to
    /// its end even when the client goes away mid-way (a dropped request would otherwise release the
    /// idempotency claim of a job already queued, and a retry would queue it twice).
    pub async fn submit(
        &self,
        who: &Submitter,
        sub: JobSubmission,
        idempotency_key: Option<String>,
    ) -> JobsResult<SubmitResponse> {
        let (this, who) = (self.clone(), who.clone());
        tokio::spawn(async move { this.submit_attached(&who, sub, idempotency_key).await })
            .await
            .map_err(|e| JobsError::Internal(anyhow::anyhow!("the submission task failed: {e}")))?
    }

    async fn submit_attached(
        &self,
        who: &Submitter,
        mut sub: JobSubmission,
        idempotency_key: Option<String>,
    ) -> JobsResult<SubmitResponse> {
        let fingerprint = idempotency_key.is_some().then(|| super::status::request_fingerprint(&sub));
        let mut webhook = sub.webhook.take();
        let mut job = JobRequest::try_from(sub)?;
        who.scope.claim(&mut job)?;
        job.idempotency_key = idempotency_key;
        self.expiry.apply_default(&mut job);
        self.check_rules(&job)?;
        // NATS refuses messages over its max_payload (1 MiB by default): say so at once, counting what will be
        // sent (the headers too, as long as a requeued copy's), instead of failing later; and before its inline
        // images are decoded (the queen's two decoders are shared by every caller).
        let max_payload = self.bus.nats().max_payload();
        let size = crate::bus::job_message_size(job.id, protocol::encode(&job).len());
        if size > max_payload {
            return Err(JobsError::TooLarge {
                field: None,
                message: format!(
                    "the job is {size} bytes as a bus message (with its inline images and headers), over the bus's \
                     {max_payload} byte message limit: upload the images (POST /v1/uploads) and send their object keys"
                ),
            });
        }
        self.check(&job).await?;
        if let Some(spec) = &mut webhook {
            self.webhooks.check(spec).await.map_err(|e| match e {
                WebhookCheckError::Invalid(e) => JobsError::from(e),
                WebhookCheckError::NotKnownYet(e) => JobsError::Unavailable(anyhow::anyhow!("cannot check {e}")),
            })?;
        }
        let queued =
            |seq| JobStatus { webhook: webhook.as_ref().map(WebhookInfo::new), ..JobStatus::queued(&job, seq) };
        let mut claim = None;
        if let Some(key) = &job.idempotency_key {
            let entry = idempotency_entry(&who.id, who.scope.tenant(), key);
            let ours = KeyClaim::new(job.id, fingerprint.unwrap_or_default());
            if let Some(owner) = self.claim_key(&entry, &ours).await? {
                if !owner.same_request(&ours) {
                    return Err(JobsError::invalid(
                        "Idempotency-Key",
                        format!(
                            "was sent before with another request (job {}): a retry sends the same body; a new job \
                             needs a new key",
                            owner.job_id
                        ),
                    ));
                }
                return Ok(SubmitResponse::new(owner.job_id, false));
            }
            claim = Some(IdempotencyClaim { status: self.status.clone(), entry: Some(entry) });
        }
        // A new job now, that passed every check: it takes the token's rate (refused, the key is released).
        if let Some(rate) = who.rate {
            self.submit_rates.take(&who.id, rate).map_err(|wait| JobsError::RateLimited { rate, wait })?;
        }
        let window = self.publish_confirm_window;
        // A queen that stops (or is killed) before the bus confirms the job, or during a keyed job's
        // background publish, takes the job's only way out of `queued` with it: the schedule holds the check
        // that ends it then, a fifth of the window after the last try. Scheduled before the record is
        // written, so that no record is ever left without it (a check that finds no record does nothing).
        // Both counted from here: the background publish's last try keeps its fifth of the window before it.
        let first_try = tokio::time::Instant::now();
        let queued_by = protocol::now_millis() + (window + window / 5).as_millis() as u64;
        let scheduled =
            tokio::try_join!(self.expiry.schedule_queued_check(&job, queued_by), self.expiry.schedule(&job));
        scheduled.map_err(JobsError::bus)?;
        // The record exists before any worker can report on the job.
        self.status.create(&queued(None)).await.map_err(JobsError::bus)?;
        let indexed = match self.index.add(job.id, job.tenant.as_deref()).await {
            Ok(seq) => seq,
            Err(e) => {
                self.status.remove(job.id).await;
                return Err(JobsError::bus(e));
            }
        };
        let seq = match self.bus.submit_with_seq(&job).await {
            Ok(seq) => seq,
            Err(e) if claim.is_some() && matches!(e.downcast_ref(), Some(PublishError::Unavailable { .. })) => {
                // The job may be stored though every ack was lost: released, the key would let a retry queue it
                // twice. Kept, it answers retries with this job, which is queued in the background under the
                // same message id (so once, however many copies reach the stream) or else ends `failed`.
                claim.take().expect("checked").keep();
                let id = job.id;
                tokio::spawn(self.clone().confirm_queued(job, webhook, first_try + window));
                return Err(JobsError::Unavailable(e.context(format!(
                    "cannot queue job {id} now: the queen goes on trying until {} s after the submission, and a \
                     retry with the same Idempotency-Key answers this job",
                    window.as_secs()
                ))));
            }
            Err(e) => {
                // The bus may have stored the job though every ack was lost, and the client, told 503, submits
                // it again: a stored cancel stops that copy before it runs. Without one, the record stays for the
                // job's queued check to end it (it cancels any copy that reaches the queue).
                let maybe_stored = matches!(e.downcast_ref(), Some(PublishError::Unavailable { .. }));
                let cancelled =
                    !maybe_stored || self.bus.store_cancel(job.id, Some(UNQUEUED_CANCEL.into())).await.is_ok();
                if cancelled {
                    self.status.remove(job.id).await;
                    self.index.remove(indexed).await;
                }
                return Err(JobsError::Unavailable(e.context("cannot queue the job")));
            }
        };
        if let Some(claim) = claim {
            claim.keep();
        }
        self.record_queued(&job, webhook.as_ref(), seq).await;
        Ok(SubmitResponse::new(job.id, true))
    }

    /// Claims idempotency entry `entry` for job `id` (`None`), or finds the job that holds it. The holder's
    /// record is written just after its claim, and removed with the claim released when the bus refuses the
    /// job: a request that finds a claim without a record, or with one not settled yet (queued without its
    /// place, written less than [`SETTLING`] ago), waits for the record to settle or the claim to go (a job
    /// id that never exists, answered now, would answer 404 for ever), up to [`CLAIM_WAIT`], then answers
    /// 503. A claim without a record for [`STALE_CLAIM`] (its queen stopped in between) is taken over.
    async fn claim_key(&self, entry: &str, claim: &KeyClaim) -> JobsResult<Option<KeyClaim>> {
        let (waited, id) = (tokio::time::Instant::now(), claim.job_id);
        loop {
            match self.status.claim_idempotency(entry, claim).await.map_err(JobsError::bus)? {
                Some(owner) if owner.job_id == id => return Ok(None),
                Some(held) => match self.status.settled(held.job_id, SETTLING).await.map_err(JobsError::bus)? {
                    Some(true) => return Ok(Some(held)),
                    // Its first publish may still fail, and the record go with it.
                    Some(false) => {}
                    None => {
                        let stale = held.job_id;
                        let took = self.status.take_over_idempotency(entry, stale, claim, STALE_CLAIM).await;
                        if took.map_err(JobsError::bus)? {
                            tracing::warn!(job_id = %id, %stale, "an idempotency key held by a job that was never recorded is taken over");
                            return Ok(None);
                        }
                    }
                },
                // Released since: claimed again after the pause.
                None => {}
            }
            if waited.elapsed() >= CLAIM_WAIT {
                return Err(JobsError::Unavailable(anyhow::anyhow!(
                    "a request with the same Idempotency-Key is still being submitted; retry in a moment"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Records the stream sequence of a job just queued. Tried for a minute (and then found on the queue by
    /// the job's queued check).
    async fn record_queued(&self, job: &JobRequest, webhook: Option<&WebhookSpec>, seq: u64) {
        self.stats.metrics.transition(None, JobState::Queued);
        let queued = || JobStatus { webhook: webhook.map(WebhookInfo::new), ..JobStatus::queued(job, Some(seq)) };
        let record = |s: &mut JobStatus| {
            s.stream_seq = Some(seq);
            true
        };
        let mut pause = Duration::from_millis(100);
        for _ in 0..10 {
            match self.status.update(job.id, &queued, &record).await {
                Ok(_) => {
                    tracing::info!(job_id = %job.id, model = %job.model, seq, "job queued");
                    return;
                }
                Err(e) => {
                    tracing::warn!(job_id = %job.id, error = %e, "cannot record the job's place in the queue yet")
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(15));
        }
        tracing::error!(job_id = %job.id, seq, "gave up recording the job's place in the queue");
    }

    /// Publishes again, until `until`, a job whose publish failed and may yet have been stored; the message
    /// id makes every copy within the stream's duplicate window one job. Past `until` the job is ended
    /// ([`Self::abandon_unqueued`]): its record would otherwise say `queued` for ever.
    async fn confirm_queued(self, job: JobRequest, webhook: Option<WebhookSpec>, until: tokio::time::Instant) {
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            // No try outlasts the window: a copy stored after it could be a second job. (One the client
            // still holds may land later; the stored cancel of the job's end stops it before it runs.)
            match tokio::time::timeout(left, self.bus.submit_with_seq(&job)).await {
                Ok(Ok(seq)) => return self.record_queued(&job, webhook.as_ref(), seq).await,
                Ok(Err(e)) => {
                    tracing::warn!(job_id = %job.id, error = %format!("{e:#}"), "the job is not queued yet; trying again");
                    tokio::time::sleep(left.min(Duration::from_secs(2))).await;
                }
                Err(_) => {}
            }
        }
        tracing::error!(job_id = %job.id, "gave up queuing the job");
        if let Err(e) = self.abandon_unqueued(job.id, true).await {
            tracing::warn!(job_id = %job.id, error = %format!("{e:#}"), "cannot end the job yet; its queued check will");
        }
    }

    /// Ends job `id` if its record still says it was never queued and the bus has neither it on its queue
    /// nor an event of it: a cancel is stored first, so a copy that reaches the queue after all is cancelled
    /// by the worker that takes it, before it runs; then the job is reported `failed`, or `cancelled` when
    /// its user cancelled it meanwhile. Nothing for a job queued or ended. Without `require_cancel`, a cancel the bus will not store (no `SD_CANCELS`, or a bus refusing
    /// it for long) does not keep the job from ending.
    pub(super) async fn abandon_unqueued(&self, id: Uuid, require_cancel: bool) -> anyhow::Result<()> {
        let Some(status) = self.status.get(id).await? else { return Ok(()) };
        if status.state != JobState::Queued || status.stream_seq.is_some() {
            return Ok(());
        }
        // The record may only lack its place: the bus took the job, and its queen could not say so (the
        // status bucket was out) or stopped first. Such a job is left to run: found on its queue, its place
        // is recorded; taken off it already, it has events (a worker publishes before it settles the message,
        // so they are looked for after the queue).
        let subject = self.bus.subjects().jobs_at(&status.model, status.priority)?;
        if let Some(seq) = self.bus.find_queued(&subject, id, FIND_QUEUED_BUDGET).await? {
            tracing::warn!(job_id = %id, seq, "a job whose place in the queue was not recorded is found there");
            let place = |s: &mut JobStatus| {
                let unplaced = s.state == JobState::Queued && s.stream_seq.is_none();
                unplaced && s.stream_seq.replace(seq).is_none()
            };
            return self.status.update(id, || status.clone(), place).await.map(drop);
        }
        if self.bus.has_events(id).await? {
            return Ok(());
        }
        let stored = match self.store_unqueued_cancel(id).await {
            Ok(stored) => stored,
            Err(e) if !require_cancel => {
                tracing::warn!(job_id = %id, error = %format!("{e:#}"), "ending a job the bus never took without a stored cancel: a copy of it that reaches the queue later would run");
                StoredCancel::Ours
            }
            Err(e) => return Err(e),
        };
        let (v, at) = (protocol::PROTOCOL_VERSION, protocol::now_millis());
        let cancelled = stored == StoredCancel::Users;
        let event = if stored != StoredCancel::Ours {
            super::jobs::dequeued_end(id, at, stored == StoredCancel::Expired)
        } else {
            // Counted from the record: the queen ending the job may not be the one that took it.
            let waited = at.saturating_sub(status.created_at) / 1000;
            let message = format!("the bus did not take the job within {waited} s of its submission");
            let code = protocol::ErrorCode::Internal;
            Event::Failed(protocol::Failed { v, job_id: id, at, code, message, field: None })
        };
        tracing::warn!(job_id = %id, cancelled, "a job the bus never took is ended");
        // Its check tries again while the end is stored nowhere (this queen may stop before its background try).
        anyhow::ensure!(self.report_dequeued(status, event).await, "the end of job {id} is not stored yet");
        Ok(())
    }

    /// Stores the cancel of a job ended unqueued, unless one is stored already; whose that one is.
    async fn store_unqueued_cancel(&self, id: Uuid) -> anyhow::Result<StoredCancel> {
        Ok(match self.bus.stored_cancel(id).await? {
            Some(request) if request.expired => StoredCancel::Expired,
            // The queen's own, from an earlier try at ending the job.
            Some(request) if request.reason.as_deref() == Some(UNQUEUED_CANCEL) => StoredCancel::Ours,
            Some(_) => StoredCancel::Users,
            None => self.bus.store_cancel(id, Some(UNQUEUED_CANCEL.into())).await.map(|()| StoredCancel::Ours)?,
        })
    }

    /// The most bytes a job message may have on the bus (NATS's `max_payload`).
    pub fn max_message_bytes(&self) -> usize {
        self.bus.nats().max_payload()
    }

    /// The job's rules, which need nothing but the job (an inline image over the limit named).
    fn check_rules(&self, job: &JobRequest) -> JobsResult<()> {
        crate::api::check_job(job, &self.limits).map_err(|e| match e {
            JobCheckError::TooLarge { field, message } => JobsError::TooLarge { field: Some(field), message },
            JobCheckError::Invalid(e) => JobsError::Invalid(e),
        })
    }

    /// What the job's rules cannot tell: its images decode (or exist), its model is the fleet's.
    async fn check(&self, job: &JobRequest) -> JobsResult<()> {
        for (field, image) in [("init_image", &job.init_image), ("mask", &job.mask)] {
            if let Some(source) = image {
                self.check_image(source, field).await?;
            }
        }
        if self.models.require_known && !self.accepts_model(&job.model).await? {
            let listed = match self.catalogue().await {
                known if known.is_empty() => "none".to_string(),
                known => first_ten(&known),
            };
            return Err(JobsError::invalid(
                "model",
                format!(
                    "{} is not a model of this fleet: no worker serves it now or did within {}, and it is not in the \
                     queen's --model-catalogue (known: {listed})",
                    protocol::quoted(&job.model),
                    humantime::format_duration(self.models.retention)
                ),
            ));
        }
        Ok(())
    }

    /// An input image decodes (inline), or exists and is not too large (an upload).
    async fn check_image(&self, source: &ImageSource, field: &str) -> JobsResult<()> {
        match source {
            ImageSource::Inline(bytes) => {
                crate::image_input::decode_bounded(Bytes::copy_from_slice(bytes), field)
                    .await
                    .map_err(|e| decode_error(field, e))?;
            }
            ImageSource::ObjectKey(key) => match self.store.size(key).await {
                Ok(Some(size)) if size > crate::image_input::MAX_ENCODED_BYTES as u64 => {
                    return Err(JobsError::invalid(
                        field,
                        format!(
                            "upload {} is {size} bytes, over the {} MiB limit for input images",
                            protocol::quoted(key),
                            crate::image_input::MAX_ENCODED_BYTES >> 20
                        ),
                    ))
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(JobsError::invalid(field, format!("upload {} does not exist", protocol::quoted(key))))
                }
                // What the store refuses as a key is the client's error; only an unreachable store is ours.
                Err(e @ (StoreError::InvalidKey { .. } | StoreError::Denied { .. })) => {
                    return Err(JobsError::invalid(field, e))
                }
                Err(e) => return Err(e.into()),
            },
        }
        Ok(())
    }
}

/// `names`, the first ten of them at most (a catalogue may hold thousands), for a message.
pub(crate) fn first_ten(names: &[String]) -> String {
    match names.len() {
        n if n <= 10 => names.join(", "),
        n => format!("{}, and {} more", names[..10].join(", "), n - 10),
    }
}
