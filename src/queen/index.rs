//! The jobs in the order the queens first heard of them: a JetStream stream (`SD_INDEX`, subject
//! `sd.index`) with one small message per job (its id, and its tenant in a header), kept as long as the
//! status records. `GET /v1/jobs` walks it from the newest end and reads only the records of the page it
//! serves (and, for a filtered list, of the entries it looks through), never the whole status bucket.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use uuid::Uuid;

use crate::protocol::Subjects;

/// The header of an entry that names its job's tenant (a tenant's list passes over the others' entries
/// without reading their records).
const TENANT_HEADER: &str = "Sd-Tenant";

/// One job's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub seq: u64,
    pub id: Uuid,
    pub tenant: Option<String>,
}

/// How many index entries one list request looks through at most (for its page and, filtered, its total),
/// counting the sequences of removed entries it passes.
pub const SCAN_LIMIT: usize = 2000;

/// The job index of one fleet.
#[derive(Clone)]
pub struct JobIndex {
    js: jetstream::Context,
    stream: String,
    subject: String,
    max_age: Duration,
}

/// Index entries from the newest, with their stream sequences.
pub struct Walk<'a> {
    index: &'a JobIndex,
    stream: stream::Stream,
    next: u64,
    first: u64,
    /// How many more sequences this walk may read.
    budget: usize,
}

impl JobIndex {
    /// Binds (creating if needed) the index of the fleet under `subjects`; entries live for `max_age`.
    pub async fn open(js: &jetstream::Context, subjects: &Subjects, max_age: Duration) -> anyhow::Result<Self> {
        let index = Self { js: js.clone(), stream: subjects.index_stream(), subject: subjects.index(), max_age };
        index.bind().await?;
        Ok(index)
    }

    async fn bind(&self) -> anyhow::Result<stream::Stream> {
        self.js
            .get_or_create_stream(stream::Config {
                name: self.stream.clone(),
                description: Some("sd-rbee queens: every job's id, in the order they were first heard of".into()),
                subjects: vec![self.subject.clone()],
                max_age: self.max_age,
                storage: stream::StorageType::File,
                // No longer than the entries live (the server refuses it): a `--keep-status` under two minutes.
                duplicate_window: Duration::from_secs(120).min(self.max_age),
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot create the job index stream {}", self.stream))
    }

    /// Adds a job of `tenant` (once: the job id is the message id). Returns its sequence.
    pub async fn add(&self, job_id: Uuid, tenant: Option<&str>) -> anyhow::Result<u64> {
        let mut headers = crate::bus::msg_id_headers(&format!("index-{job_id}"));
        if let Some(tenant) = tenant {
            headers.insert(TENANT_HEADER, tenant);
        }
        let payload = bytes::Bytes::from(job_id.to_string());
        let ack = crate::bus::publish_rebinding(&self.js, &self.subject, headers, payload, || self.bind()).await;
        Ok(ack.context("cannot add the job to the index")?.sequence)
    }

    /// Removes an entry (of a job that could not be queued).
    pub async fn remove(&self, seq: u64) {
        if let Ok(stream) = self.js.get_stream(&self.stream).await {
            let _ = stream.delete_message(seq).await;
        }
    }

    /// How many entries the index holds, and a walk over them from the newest (from the one before
    /// sequence `before`, when given) that reads at most `budget` sequences.
    pub async fn walk(&self, before: Option<u64>, budget: usize) -> anyhow::Result<(u64, Walk<'_>)> {
        let mut stream = self.bind().await?;
        let info = stream.info().await.context("cannot read the job index")?;
        let (first, last, count) = (info.state.first_sequence, info.state.last_sequence, info.state.messages);
        let next = before.map_or(last, |b| b.saturating_sub(1).min(last));
        Ok((count, Walk { index: self, stream, next, first: first.max(1), budget }))
    }
}

impl Walk<'_> {
    /// The next (older) entry, `None` at the oldest entry or once the budget is spent. Entries removed in
    /// between are skipped, each spending the budget as a read does.
    pub async fn next(&mut self) -> anyhow::Result<Option<IndexEntry>> {
        while self.next >= self.first && self.next > 0 && self.budget > 0 {
            let seq = self.next;
            self.next -= 1;
            self.budget -= 1;
            match self.stream.get_raw_message(seq).await {
                Ok(message) => {
                    let id = std::str::from_utf8(&message.payload).ok().and_then(|t| Uuid::parse_str(t).ok());
                    let tenant = message.headers.get(TENANT_HEADER).map(|v| v.as_str().to_string());
                    match id {
                        Some(id) => return Ok(Some(IndexEntry { seq, id, tenant })),
                        None => tracing::debug!(seq, index = %self.index.stream, "unreadable index entry skipped"),
                    }
                }
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(anyhow::anyhow!("cannot read the job index: {e}")),
            }
        }
        Ok(None)
    }

    /// Whether every entry was read.
    pub fn done(&self) -> bool {
        self.next < self.first || self.next == 0
    }

    /// Whether the walk may read no more (its budget is spent, or every entry was read).
    pub fn stopped(&self) -> bool {
        self.budget == 0 || self.done()
    }

    /// The sequence after the next entry to read: where a later walk takes up this one.
    pub fn cursor(&self) -> u64 {
        self.next + 1
    }
}

/// The records of `ids`, read a few at a time (a record gone with its max age is `None`).
pub async fn records<F, Fut, T>(ids: impl IntoIterator<Item = Uuid>, get: F) -> Vec<anyhow::Result<Option<T>>>
where
    F: Fn(Uuid) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    futures::stream::iter(ids.into_iter().map(get)).buffered(16).collect().await
}
