//! Each job's status, as the queen serves it ([`JobStatus`], whose shape is the API's): a record in a
//! JetStream KV bucket (`SD_STATUS`), created when the job is submitted and moved along by the workers'
//! events. Several queens share the bucket; every update is a compare-and-set on the entry's revision, and
//! the rules in [`JobStatus::apply`] (in the contract, `api::status`) make the order of concurrent updates
//! irrelevant (a terminal state is final; older events never overwrite newer).

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use uuid::Uuid;

use crate::api::{JobState, JobStatus};
use crate::protocol;

/// The most bytes of one job's status record.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// A status record that would not fit in a NATS message (an event from the bus made it so).
#[derive(Debug, thiserror::Error)]
#[error("the status of job {job_id} would be {bytes} bytes, too large for the bus")]
pub struct StatusTooLarge {
    pub job_id: Uuid,
    pub bytes: usize,
}

/// A stored record that does not read back as a status (written by an older queen from an event a newer
/// one refuses): the job list skips it rather than fail every page that holds it.
#[derive(Debug, thiserror::Error)]
#[error("the stored status of job {job_id} is unreadable: {reason}")]
pub struct UnreadableStatus {
    pub job_id: Uuid,
    pub reason: String,
    /// Its `state`, when that much reads.
    pub state: Option<JobState>,
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
    /// The age the bucket is created with.
    max_age: Duration,
    /// The age of its entries as the bucket was when bound (0: kept for ever).
    bucket_age: Duration,
}

/// The KV key of an idempotency key (hashed with the caller's identity and its tenant, so keys of different
/// callers never meet, nor those of a token moved to another tenant).
pub fn idempotency_entry(caller: &str, tenant: Option<&str>, key: &str) -> String {
    use sha2::Digest;
    // An operator's entries stay what they were before tenants.
    let scoped = match tenant {
        Some(tenant) => format!("{caller}\n{tenant}\n{key}"),
        None => format!("{caller}\n{key}"),
    };
    let digest = sha2::Sha256::digest(scoped.as_bytes());
    format!("idem-{}", hex::encode(&digest[..16]))
}

/// An idempotency key's claim: the job that claimed it and a fingerprint of its request, so that the key
/// sent again with another request is told apart from a retry. The entry holds the job id; the fingerprint
/// is kept beside it (`<entry>-body`: `<job id> <fingerprint>`); a claim without one (written by an earlier
/// version) matches any request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyClaim {
    pub job_id: Uuid,
    pub fingerprint: Option<String>,
}

impl KeyClaim {
    /// `job_id`'s claim for a request of fingerprint `fingerprint` (see [`request_fingerprint`]).
    pub fn new(job_id: Uuid, fingerprint: String) -> Self {
        Self { job_id, fingerprint: Some(fingerprint) }
    }

    /// Whether a request of `other`'s fingerprint may be answered with this claim's job.
    pub fn same_request(&self, other: &KeyClaim) -> bool {
        match (&self.fingerprint, &other.fingerprint) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }
}

/// Where an idempotency entry's request fingerprint is kept.
fn fingerprint_key(entry: &str) -> String {
    format!("{entry}-body")
}

/// A digest of a submission as the client sent it (the body read, before any default is applied): the same
/// request retried gives the same one.
pub fn request_fingerprint(submission: &impl serde::Serialize) -> String {
    use sha2::Digest;
    let body = serde_json::to_vec(submission).unwrap_or_default();
    hex::encode(&sha2::Sha256::digest(&body)[..16])
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
        // The bucket keeps the age it was created with, whatever this queen was given.
        let bucket_age = match kv.status().await {
            Ok(status) => status.max_age(),
            Err(_) => max_age,
        };
        Ok(Self { js: js.clone(), kv, max_age, bucket_age })
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
        match self.stored(job_id).await? {
            Some((status, revision)) => Ok(Some((status?, revision))),
            None => Ok(None),
        }
    }

    /// How often a queued job's record is renewed ([`Self::keep_queued`]): a third of the bucket's age, so a
    /// record looked at no less often than this is never older than two thirds of it. `None` for a bucket
    /// that keeps its entries for ever.
    pub fn keep_every(&self) -> Option<Duration> {
        (!self.bucket_age.is_zero()).then(|| (self.bucket_age / 3).max(Duration::from_secs(1)))
    }

    /// When job `job_id` is still queued, when it was created, its record written again as it is when its
    /// last write is older than `every`: entries live the bucket's age from their last write, and a job
    /// waiting on the queue longer than that (for a model no worker serves yet) would lose its record while
    /// it waits: its status, its webhook, its request. `None` once it has left the queue, or without a
    /// readable record.
    pub async fn keep_queued(&self, job_id: Uuid, every: Duration) -> anyhow::Result<Option<u64>> {
        let key = job_id.to_string();
        for _ in 0..20 {
            let Some(entry) = self.kv.entry(&key).await?.filter(|e| e.operation == kv::Operation::Put) else {
                return Ok(None);
            };
            let Ok(status) = serde_json::from_slice::<JobStatus>(&entry.value) else { return Ok(None) };
            if status.state != JobState::Queued {
                return Ok(None);
            }
            let written_ms = u64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            if protocol::now_millis().saturating_sub(written_ms) < every.as_millis() as u64 {
                return Ok(Some(status.created_at));
            }
            match self.kv.update(&key, entry.value.clone(), entry.revision).await {
                Ok(_) => return Ok(Some(status.created_at)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::bail!("job {job_id}: too many concurrent status updates")
    }

    /// The stored record, read or not, and its revision.
    async fn stored(&self, job_id: Uuid) -> anyhow::Result<Option<(Result<JobStatus, UnreadableStatus>, u64)>> {
        match self.kv.entry(job_id.to_string()).await? {
            Some(e) if e.operation == kv::Operation::Put => {
                let status = serde_json::from_slice(&e.value).map_err(|error| {
                    let value = serde_json::from_slice::<serde_json::Value>(&e.value).ok();
                    let state = value.and_then(|v| serde_json::from_value(v.get("state")?.clone()).ok());
                    UnreadableStatus { job_id, reason: error.to_string(), state }
                });
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
            match self.stored(job_id).await? {
                Some((stored, revision)) => {
                    // A record that does not read back (an older queen's, or a newer one's) is changed only
                    // to end its job, made again from the event: left, it would keep the job from ever
                    // ending. An ended one is left as it is, and so is one that nothing would end.
                    let (mut status, before, unreadable) = match stored {
                        Ok(status) => {
                            let before = Some(status.state);
                            (status, before, None)
                        }
                        Err(e) if e.state.is_some_and(JobState::is_terminal) => return Ok(None),
                        Err(e) => (missing(), e.state, Some(e)),
                    };
                    if !change(&mut status) {
                        return Ok(None);
                    }
                    if let Some(e) = unreadable {
                        if !status.state.is_terminal() {
                            return Err(e.into());
                        }
                        tracing::warn!("{e}: made again from the event that ends the job");
                    }
                    let ends = before.is_none_or(|b| !b.is_terminal());
                    match self.kv.update(&key, self.record_or_slim(&mut status, ends)?.into(), revision).await {
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
                    match self.kv.create(&key, self.record_or_slim(&mut status, true)?.into()).await {
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
    /// [`Self::record`], or, when this update ends the job (`ends` and a terminal state), the record
    /// [slimmed](JobStatus::slim) when the whole is too large: the job's end is kept whatever else has to go.
    /// (A later update of an ended record, a webhook counter, is refused rather than slim it.)
    fn record_or_slim(&self, status: &mut JobStatus, ends: bool) -> anyhow::Result<Vec<u8>> {
        match self.record(status) {
            Err(e) if ends && status.state.is_terminal() && e.is::<StatusTooLarge>() => {
                tracing::warn!(job_id = %status.job_id, "{e}: kept without its request, image URLs and warnings");
                status.slim();
                self.record(status)
            }
            result => result,
        }
    }

    fn record(&self, status: &JobStatus) -> anyhow::Result<Vec<u8>> {
        let bytes = serde_json::to_vec(status)?;
        let max = self.js.client().max_payload().saturating_sub(512);
        if bytes.len() > MAX_RECORD_BYTES.min(max) {
            return Err(StatusTooLarge { job_id: status.job_id, bytes: bytes.len() }.into());
        }
        Ok(bytes)
    }

    /// Maps an idempotency entry to `claim` (a job and the fingerprint of its request) unless it already maps
    /// to a job: returns the claim it holds (`None`: it did, and was released meanwhile).
    pub async fn claim_idempotency(&self, entry: &str, claim: &KeyClaim) -> anyhow::Result<Option<KeyClaim>> {
        if self.create_key(entry, claim.job_id.to_string().into()).await? {
            self.keep_fingerprint(entry, claim).await;
            return Ok(Some(claim.clone()));
        }
        self.idempotency_owner(entry).await
    }

    /// The claim an idempotency entry holds, if any.
    pub async fn idempotency_owner(&self, entry: &str) -> anyhow::Result<Option<KeyClaim>> {
        let Some(owner) = self.kv.get(entry).await? else { return Ok(None) };
        let job_id = Uuid::parse_str(std::str::from_utf8(&owner)?).context("unreadable idempotency entry")?;
        // The fingerprint kept for this job (an older claim's, or none, matches any request).
        let kept = self.kv.get(fingerprint_key(entry)).await?;
        let fingerprint = kept.and_then(|kept| {
            let (id, fingerprint) = std::str::from_utf8(&kept).ok()?.split_once(' ')?;
            (Uuid::parse_str(id).ok()? == job_id).then(|| fingerprint.to_string())
        });
        Ok(Some(KeyClaim { job_id, fingerprint }))
    }

    /// Keeps `claim`'s fingerprint beside its entry, apart from it: queens that read the entry as a job id
    /// alone (of an earlier version, during a rolling update) still read it.
    async fn keep_fingerprint(&self, entry: &str, claim: &KeyClaim) {
        let Some(fingerprint) = &claim.fingerprint else { return };
        let value = format!("{} {fingerprint}", claim.job_id);
        if let Err(e) = self.kv.put(fingerprint_key(entry), value.into()).await {
            tracing::warn!(job_id = %claim.job_id, error = %e, "cannot keep an idempotency key's request fingerprint: the key will answer any body");
        }
    }

    /// Maps an idempotency entry to `claim` instead of `stale`, if it has mapped to `stale` for `older_than`
    /// or longer; whether it now maps to `claim`.
    pub async fn take_over_idempotency(
        &self,
        entry: &str,
        stale: Uuid,
        claim: &KeyClaim,
        older_than: Duration,
    ) -> anyhow::Result<bool> {
        let Some(held) = self.kv.entry(entry).await? else { return Ok(false) };
        let age_ms = protocol::now_millis() as i128 - held.created.unix_timestamp_nanos() / 1_000_000;
        let holder = std::str::from_utf8(&held.value).ok().and_then(|v| Uuid::parse_str(v).ok());
        if held.operation != kv::Operation::Put || holder != Some(stale) || age_ms < older_than.as_millis() as i128 {
            return Ok(false);
        }
        if self.kv.update(entry, claim.job_id.to_string().into(), held.revision).await.is_err() {
            return Ok(false);
        }
        self.keep_fingerprint(entry, claim).await;
        Ok(true)
    }

    /// Whether job `job_id` has a record that is settled: one a submission may still remove (queued without
    /// its place, written within `settling`) is not; one that does not read is.
    pub async fn settled(&self, job_id: Uuid, settling: Duration) -> anyhow::Result<Option<bool>> {
        Ok(self.stored(job_id).await?.map(|(status, _)| match status {
            Ok(s) if s.state == JobState::Queued && s.stream_seq.is_none() => {
                protocol::now_millis().saturating_sub(s.created_at) >= settling.as_millis() as u64
            }
            _ => true,
        }))
    }

    /// Forgets a job (one that could not be queued).
    pub async fn remove(&self, job_id: Uuid) {
        let _ = self.kv.purge(job_id.to_string()).await;
    }

    pub async fn release_idempotency(&self, entry: &str) {
        // The fingerprint first: once the entry is gone, a retry may claim it and keep its own.
        let _ = self.kv.delete(fingerprint_key(entry)).await;
        let _ = self.kv.delete(entry).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_claim_tells_a_retry_from_another_request() {
        let id = Uuid::new_v4();
        let claim = KeyClaim::new(id, "abc".into());
        let old = KeyClaim { job_id: id, fingerprint: None };
        assert!(claim.same_request(&KeyClaim::new(Uuid::new_v4(), "abc".into())));
        assert!(!claim.same_request(&KeyClaim::new(Uuid::new_v4(), "abd".into())));
        assert!(old.same_request(&claim), "an old entry matches any request");
        let body = |prompt: &str| serde_json::json!({"model": "tiny", "prompt": prompt});
        assert_eq!(request_fingerprint(&body("a")), request_fingerprint(&body("a")));
        assert_ne!(request_fingerprint(&body("a")), request_fingerprint(&body("b")));
    }

    #[test]
    fn idempotency_entries_depend_on_the_caller_and_its_tenant_and_are_kv_keys() {
        let a = idempotency_entry("token-a", None, "order-1");
        assert_eq!(a, idempotency_entry("token-a", None, "order-1"));
        assert_ne!(a, idempotency_entry("token-b", None, "order-1"));
        // A token moved to a tenant (or another) does not find its earlier jobs by key.
        assert_ne!(a, idempotency_entry("token-a", Some("acme"), "order-1"));
        assert_ne!(idempotency_entry("token-a", Some("acme"), "k"), idempotency_entry("token-a", Some("globex"), "k"));
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }
}
