//! Each job's status, as the queen serves it ([`JobStatus`], whose shape is the API's): a record in a
//! JetStream KV bucket (`SD_STATUS`), created when the job is submitted and moved along by the workers' events. Several queens share the bucket; every
//! update is a compare-and-set on the entry's revision, and the rules in [`JobStatus::apply`] make the
//! order of concurrent updates irrelevant (a terminal state is final; older events never overwrite newer).

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use uuid::Uuid;

use crate::api::{ErrorInfo, JobState, JobStatus, ProgressInfo, RequestSummary};
use crate::protocol::{Event, JobKind, JobRequest};

impl JobStatus {
    /// A job just submitted.
    pub fn queued(job: &JobRequest, stream_seq: Option<u64>) -> Self {
        Self {
            job_id: job.id,
            model: job.model.clone(),
            kind: Some(job.kind),
            state: JobState::Queued,
            created_at: job.created_at,
            updated_at: job.created_at,
            started_at: None,
            finished_at: None,
            worker_id: None,
            deliveries: 0,
            progress: None,
            images: Vec::new(),
            timings: None,
            warnings: Vec::new(),
            error: None,
            cancelled_at_step: None,
            request: Some(RequestSummary::of(job)),
            stream_seq,
            last_event_at: 0,
        }
    }

    /// A job first heard of through an event (published on the bus without the queen).
    pub fn unknown(job_id: Uuid, at: u64) -> Self {
        let mut s = Self::queued(&JobRequest::new(JobKind::Txt2Img, "", ""), None);
        s.job_id = job_id;
        s.kind = None;
        s.request = None;
        s.created_at = at;
        s.updated_at = at;
        s
    }

    /// Moves the status along by `event`. Returns false when the event changes nothing (a terminal state
    /// is final; an event older than the newest applied is ignored, except a terminal one).
    pub fn apply(&mut self, event: &Event) -> bool {
        if self.state.is_terminal() {
            return false;
        }
        let at = event.at();
        if !event.is_terminal() && at < self.last_event_at {
            return false;
        }
        match event {
            // Anyone on the bus can publish events: a worker id that is no subject token is not kept.
            Event::Accepted(a) if crate::protocol::validate_worker_id(&a.worker_id).is_err() => return false,
            Event::Accepted(a) => {
                // A job published without the queen learns its model from the worker that took it.
                if self.model.is_empty() && crate::protocol::validate_model_name(&a.model).is_ok() {
                    self.model = a.model.clone();
                }
                self.state = JobState::Running;
                self.worker_id = Some(a.worker_id.clone());
                self.started_at.get_or_insert(a.at);
                self.deliveries += 1;
                self.progress = None;
            }
            Event::Progress(p) => {
                self.state = JobState::Running;
                self.progress = Some(ProgressInfo {
                    step: p.step,
                    total: p.total,
                    percent: p.percent,
                    eta_ms: p.eta_ms,
                    phase: p.phase,
                });
            }
            Event::Completed(c) => {
                self.state = JobState::Completed;
                self.images = c.images.clone();
                // Anyone on the bus can publish events: what the record keeps of one is bounded.
                self.warnings = c
                    .warnings
                    .iter()
                    .take(crate::protocol::MAX_WARNINGS)
                    .map(|w| crate::protocol::truncate(w, crate::protocol::MAX_WARNING_BYTES).to_string())
                    .collect();
                self.timings = Some(c.timings);
                self.finished_at = Some(c.at);
                if let Some(p) = &mut self.progress {
                    p.step = p.total;
                    p.percent = 100.0;
                    p.eta_ms = Some(0);
                }
            }
            Event::Failed(f) => {
                self.state = JobState::Failed;
                // Anyone on the bus can publish events: what the record keeps of one is bounded.
                let message = crate::protocol::truncate(&f.message, crate::protocol::MAX_ERROR_MESSAGE_BYTES);
                let field = f.field.as_deref().map(|x| crate::protocol::truncate(x, 128).to_string());
                self.error = Some(ErrorInfo { code: f.code, message: message.to_string(), field });
                self.finished_at = Some(f.at);
            }
            Event::Cancelled(c) => {
                self.state = JobState::Cancelled;
                self.cancelled_at_step = c.at_step;
                self.finished_at = Some(c.at);
            }
        }
        self.last_event_at = self.last_event_at.max(at);
        self.updated_at = self.updated_at.max(at);
        true
    }
}

/// The most bytes of one job's status record.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// A status record that would not fit in a NATS message (an event from the bus made it so).
#[derive(Debug, thiserror::Error)]
#[error("the status of job {job_id} would be {bytes} bytes, too large for the bus")]
pub struct StatusTooLarge {
    pub job_id: Uuid,
    pub bytes: usize,
}

/// A record [`StatusStore::update`] changed: its state before (`None`: the record was created now) and the
/// record after.
#[derive(Clone, Debug, PartialEq)]
pub struct Updated {
    pub before: Option<JobState>,
    pub status: JobStatus,
}

/// The status bucket.
#[derive(Clone)]
pub struct StatusStore {
    js: jetstream::Context,
    kv: kv::Store,
    max_age: Duration,
}

/// The KV key of an idempotency key (hashed with the caller's identity, so keys of different callers
/// never meet).
pub fn idempotency_entry(caller: &str, key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{caller}\n{key}").as_bytes());
    format!("idem-{}", hex::encode(&digest[..16]))
}

impl StatusStore {
    /// Creates or binds the bucket `name`; entries live for `max_age`.
    pub async fn open(js: &jetstream::Context, name: &str, max_age: Duration) -> anyhow::Result<Self> {
        let kv = match js.get_key_value(name).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: name.to_string(),
                    description: "sd-rbee job status".into(),
                    history: 1,
                    max_age,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("cannot create the KV bucket {name}"))?,
        };
        Ok(Self { js: js.clone(), kv, max_age })
    }

    /// Creates the bucket again if it is gone (this handle, and its clones, then work with the new one).
    pub async fn recreate(&self) -> anyhow::Result<()> {
        Self::open(&self.js, &self.kv.name, self.max_age).await.map(drop)
    }

    /// `kv.create(key, value)`, once more after creating the bucket again if that failed (it may have been
    /// deleted, or lost with the server's store). Ok(false): the key exists.
    async fn create_key(&self, key: &str, value: bytes::Bytes) -> anyhow::Result<bool> {
        let mut retried = false;
        loop {
            match self.kv.create(key, value.clone()).await {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Ok(false),
                Err(e) if !retried => {
                    tracing::warn!(error = %e, "cannot write to the status bucket; binding it again");
                    self.recreate().await?;
                    retried = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub async fn get(&self, job_id: Uuid) -> anyhow::Result<Option<JobStatus>> {
        Ok(self.entry(job_id).await?.map(|(s, _)| s))
    }

    async fn entry(&self, job_id: Uuid) -> anyhow::Result<Option<(JobStatus, u64)>> {
        match self.kv.entry(job_id.to_string()).await? {
            Some(e) if e.operation == kv::Operation::Put => {
                let status = serde_json::from_slice(&e.value).context("unreadable job status")?;
                Ok(Some((status, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Stores a new job's status (replaces nothing: a job id is created once).
    pub async fn create(&self, status: &JobStatus) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(status)?;
        self.create_key(&status.job_id.to_string(), bytes.into()).await.map(drop)
    }

    /// Applies `change` to the job's status with compare-and-set, retrying on conflicts; creates the record
    /// from `missing` when there is none. Returns the state before and the stored status, or `None` when
    /// `change` declined.
    pub async fn update(
        &self,
        job_id: Uuid,
        missing: impl Fn() -> JobStatus,
        change: impl Fn(&mut JobStatus) -> bool,
    ) -> anyhow::Result<Option<Updated>> {
        for _ in 0..20 {
            let key = job_id.to_string();
            match self.entry(job_id).await? {
                Some((mut status, revision)) => {
                    let before = Some(status.state);
                    if !change(&mut status) {
                        return Ok(None);
                    }
                    match self.kv.update(&key, self.record(&status)?.into(), revision).await {
                        Ok(_) => return Ok(Some(Updated { before, status })),
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                None => {
                    let mut status = missing();
                    // An event that changes nothing (a worker id that is no subject token) makes no record.
                    if !change(&mut status) {
                        return Ok(None);
                    }
                    match self.kv.create(&key, self.record(&status)?.into()).await {
                        Ok(_) => return Ok(Some(Updated { before: None, status })),
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        anyhow::bail!("job {job_id}: too many concurrent status updates")
    }

    /// The stored form of a status: JSON of at most [`MAX_RECORD_BYTES`] (a real job's is a few KB: its
    /// prompts, up to eight images with their URLs, an error), else [`StatusTooLarge`] (never retried: the
    /// same event would make the same record). A page of the job list reads its records, so each stays small.
    fn record(&self, status: &JobStatus) -> anyhow::Result<Vec<u8>> {
        let bytes = serde_json::to_vec(status)?;
        let max = self.js.client().max_payload().saturating_sub(512);
        if bytes.len() > MAX_RECORD_BYTES.min(max) {
            return Err(StatusTooLarge { job_id: status.job_id, bytes: bytes.len() }.into());
        }
        Ok(bytes)
    }

    /// Maps an idempotency entry to `job_id` unless it already maps to a job: returns the job it maps to.
    pub async fn claim_idempotency(&self, entry: &str, job_id: Uuid) -> anyhow::Result<Uuid> {
        if self.create_key(entry, job_id.to_string().into()).await? {
            return Ok(job_id);
        }
        let existing = self.kv.get(entry).await?.context("idempotency entry vanished")?;
        Uuid::parse_str(std::str::from_utf8(&existing)?).context("unreadable idempotency entry")
    }

    /// Forgets a job (one that could not be queued).
    pub async fn remove(&self, job_id: Uuid) {
        let _ = self.kv.purge(job_id.to_string()).await;
    }

    pub async fn release_idempotency(&self, entry: &str) {
        let _ = self.kv.delete(entry).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Accepted, Cancelled, Completed, ErrorCode, Failed, Progress, Timings, PROTOCOL_VERSION};

    fn accepted(id: Uuid, at: u64, w: &str) -> Event {
        Event::Accepted(Accepted { v: PROTOCOL_VERSION, job_id: id, at, worker_id: w.into(), model: "tiny".into() })
    }

    #[test]
    fn events_move_the_status_and_terminal_states_are_final() {
        let job = JobRequest::new(JobKind::Txt2Img, "tiny", "x");
        let mut s = JobStatus::queued(&job, Some(4));
        assert!(s.apply(&accepted(job.id, job.created_at + 10, "w1")));
        assert_eq!((s.state, s.worker_id.as_deref(), s.deliveries), (JobState::Running, Some("w1"), 1));
        assert!(s.apply(&Event::Progress(Progress::new(job.id, 2, 4, job.created_at + 20))));
        assert_eq!(s.progress.as_ref().unwrap().step, 2);
        // An older progress event arriving late changes nothing.
        assert!(!s.apply(&Event::Progress(Progress::new(job.id, 1, 4, job.created_at + 15))));
        assert_eq!(s.progress.as_ref().unwrap().step, 2);
        let done = Completed {
            v: PROTOCOL_VERSION,
            job_id: job.id,
            at: job.created_at + 30,
            images: vec![],
            timings: Timings::default(),
            warnings: vec!["the prompt was cut".into()],
        };
        assert!(s.apply(&Event::Completed(done)));
        assert_eq!(s.state, JobState::Completed);
        let failed = Failed {
            v: PROTOCOL_VERSION,
            job_id: job.id,
            at: job.created_at + 40,
            code: ErrorCode::Internal,
            message: "late".into(),
            field: None,
        };
        assert!(!s.apply(&Event::Failed(failed)));
        assert!(!s.apply(&Event::Cancelled(Cancelled { v: 1, job_id: job.id, at: 1, at_step: None })));
        assert_eq!(s.state, JobState::Completed);
    }

    #[test]
    fn a_bus_job_learns_its_model_and_keeps_bounded_warnings() {
        let id = Uuid::new_v4();
        let mut s = JobStatus::unknown(id, 5);
        assert!(s.apply(&accepted(id, 10, "w1")));
        assert_eq!(s.model, "tiny", "named by the worker that took it");
        let done = Completed {
            v: PROTOCOL_VERSION,
            job_id: id,
            at: 20,
            images: vec![],
            timings: Timings::default(),
            warnings: vec!["w".repeat(10_000); 100],
        };
        assert!(s.apply(&Event::Completed(done)));
        assert_eq!(s.warnings.len(), crate::protocol::MAX_WARNINGS);
        assert!(s.warnings.iter().all(|w| w.len() <= crate::protocol::MAX_WARNING_BYTES));
    }

    #[test]
    fn a_redelivery_counts_and_resets_progress() {
        let job = JobRequest::new(JobKind::Txt2Img, "tiny", "x");
        let mut s = JobStatus::queued(&job, None);
        s.apply(&accepted(job.id, 10, "w1"));
        s.apply(&Event::Progress(Progress::new(job.id, 3, 10, 20)));
        s.apply(&accepted(job.id, 30, "w2"));
        assert_eq!((s.deliveries, s.worker_id.as_deref(), s.progress.is_none()), (2, Some("w2"), true));
    }

    #[test]
    fn idempotency_entries_depend_on_the_caller_and_are_kv_keys() {
        let a = idempotency_entry("token-a", "order-1");
        assert_eq!(a, idempotency_entry("token-a", "order-1"));
        assert_ne!(a, idempotency_entry("token-b", "order-1"));
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }
}
