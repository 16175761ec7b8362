//! [`BusClient`]: the client side of the bus, used by `sd-rbee submit`, the queen and the tests: publish a
//! job, follow its events (replayed from the events stream, so a late follower misses nothing), cancel it.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::{Stream, StreamExt};
use uuid::Uuid;

use super::StreamSettings;
use crate::bus;
use crate::protocol::{self, CancelRequest, Event, JobRequest, Limits, Subjects, PROTOCOL_VERSION};

/// How long a cancel may wait for NATS to take it (as long as its requests wait for an answer).
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// The most event bytes [`BusClient::stored_events`] reads for one job: a real job's events, previews
/// included, take a few MB (150 steps of ~20 KB previews).
pub const MAX_STORED_EVENT_BYTES: usize = 16 << 20;

/// A connection to a fleet's bus.
#[derive(Clone)]
pub struct BusClient {
    client: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    limits: Limits,
}

impl BusClient {
    /// Connects to NATS at `url`, for the fleet under `prefix` (`sd` by default), and makes sure the streams
    /// exist so a job published before any worker starts is kept.
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<Self> {
        let subjects = Subjects::new(prefix).map_err(|e| anyhow::anyhow!("--prefix {e}"))?;
        let client = bus::connect(url, "sd-rbee client", Duration::from_secs(5)).await?;
        let js = jetstream::new(client.clone());
        bus::ensure_streams(&js, &subjects, &StreamSettings::default()).await?;
        Ok(Self { client, js, subjects, limits: Limits::default() })
    }

    /// A client on an existing connection (the streams must exist).
    pub fn from_parts(client: async_nats::Client, subjects: Subjects) -> Self {
        let js = jetstream::new(client.clone());
        Self { client, js, subjects, limits: Limits::default() }
    }

    /// Validates jobs against `limits` instead of the defaults (a queen with raised limits).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    /// Validates and publishes `job` (a retried publish of the same id is not a second job).
    pub async fn submit(&self, job: &JobRequest) -> anyhow::Result<()> {
        self.submit_with_seq(job).await.map(|_| ())
    }

    /// [`submit`](Self::submit), returning the job's sequence in the jobs stream.
    pub async fn submit_with_seq(&self, job: &JobRequest) -> anyhow::Result<u64> {
        bus::publish_job(&self.js, &self.subjects, job, &self.limits).await
    }

    /// The job's events in order, from its first one, then live; ends after the terminal event.
    pub async fn events(&self, job_id: Uuid) -> anyhow::Result<impl Stream<Item = anyhow::Result<Event>>> {
        Ok(self.events_after(job_id, None).await?.map(|e| e.map(|(_, event)| event)))
    }

    /// The job's events with their sequences in the events stream, from the one after sequence `after`
    /// (from the first with `None`), then live; ends after the terminal event.
    pub async fn events_after(
        &self,
        job_id: Uuid,
        after: Option<u64>,
    ) -> anyhow::Result<impl Stream<Item = anyhow::Result<(u64, Event)>>> {
        let stream =
            self.js.get_stream(self.subjects.events_stream()).await.context("cannot bind the events stream")?;
        let deliver_policy = match after {
            Some(seq) => consumer::DeliverPolicy::ByStartSequence { start_sequence: seq + 1 },
            None => consumer::DeliverPolicy::All,
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subjects.events(job_id),
                deliver_policy,
                ..Default::default()
            })
            .await
            .context("cannot follow the job's events")?;
        let messages = consumer.messages().await.context("cannot follow the job's events")?;
        let events = messages
            .map(move |m| {
                let m = m.map_err(|e| anyhow::anyhow!("event stream: {e}"))?;
                let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                Ok((seq, protocol::decode_event_of(job_id, &m.payload)?))
            })
            .scan(false, |done, e: anyhow::Result<(u64, Event)>| {
                if *done {
                    return futures::future::ready(None);
                }
                *done = matches!(&e, Ok((_, ev)) if ev.is_terminal());
                futures::future::ready(Some(e))
            });
        Ok(events)
    }

    /// The job's events stored so far with their sequences in the events stream (does not wait for more),
    /// up to its first terminal event, and at most [`MAX_STORED_EVENT_BYTES`] of them: anyone on the bus can
    /// publish a job's events, and each reader holds what it read.
    pub async fn stored_events(&self, job_id: Uuid) -> anyhow::Result<Vec<(u64, Event)>> {
        let stream =
            self.js.get_stream(self.subjects.events_stream()).await.context("cannot bind the events stream")?;
        let subject = self.subjects.events(job_id);
        let terminal = |m: &async_nats::jetstream::Message| {
            protocol::decode_event_of(job_id, &m.payload).is_ok_and(|e: Event| e.is_terminal())
        };
        let all = consumer::DeliverPolicy::All;
        let messages = bus::stored_messages_until(&stream, subject, all, MAX_STORED_EVENT_BYTES, terminal)
            .await
            .context("cannot read the job's events")?;
        // An event this version cannot read (or another job's) is skipped, as when following live.
        let out = messages
            .iter()
            .filter_map(|m| {
                let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                protocol::decode_event_of(job_id, &m.payload).ok().map(|e| (seq, e))
            })
            .collect();
        Ok(out)
    }

    /// Follows the job until its terminal event, calling `on_event` for each; `timeout` bounds the wait.
    pub async fn wait(
        &self,
        job_id: Uuid,
        timeout: Duration,
        mut on_event: impl FnMut(&Event),
    ) -> anyhow::Result<Event> {
        let events = self.events(job_id).await?;
        tokio::pin!(events);
        let follow = async {
            while let Some(event) = events.next().await {
                // An event this build cannot read (a newer type) is skipped, as the protocol says.
                let event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping an unreadable event");
                        continue;
                    }
                };
                on_event(&event);
                if event.is_terminal() {
                    return Ok(event);
                }
            }
            anyhow::bail!("the event stream of job {job_id} ended before the job did")
        };
        tokio::time::timeout(timeout, follow)
            .await
            .with_context(|| format!("job {job_id} did not finish within {} s", timeout.as_secs()))?
    }

    /// Asks whoever runs the job to stop.
    pub async fn cancel(&self, job_id: Uuid, reason: Option<String>) -> anyhow::Result<()> {
        let req = CancelRequest { v: PROTOCOL_VERSION, job_id, at: protocol::now_millis(), reason, expired: false };
        self.send_cancel(req).await
    }

    /// [`cancel`](Self::cancel) for a job whose ttl passed: its worker stops it as timed out.
    pub async fn cancel_expired(&self, job_id: Uuid) -> anyhow::Result<()> {
        let reason = Some("the job expired".into());
        self.send_cancel(CancelRequest {
            v: PROTOCOL_VERSION,
            job_id,
            at: protocol::now_millis(),
            reason,
            expired: true,
        })
        .await
    }

    async fn send_cancel(&self, req: CancelRequest) -> anyhow::Result<()> {
        let job_id = req.job_id;
        let send = async {
            self.client.publish(self.subjects.cancel(job_id), protocol::encode(&req).into()).await?;
            self.client.flush().await?;
            anyhow::Ok(())
        };
        // Both wait, without a bound of their own, for a connection that may be re-establishing.
        tokio::time::timeout(CANCEL_TIMEOUT, send).await.with_context(|| {
            format!("NATS did not take the cancel of job {job_id} within {} s", CANCEL_TIMEOUT.as_secs())
        })??;
        Ok(())
    }

    /// [`cancel`](Self::cancel), returning only once `SD_CANCELS` has stored the request: a copy of the job
    /// that reaches the queue later is then cancelled by the worker that takes it, before it runs.
    pub async fn store_cancel(&self, job_id: Uuid, reason: Option<String>) -> anyhow::Result<()> {
        let req = CancelRequest { v: PROTOCOL_VERSION, job_id, at: protocol::now_millis(), reason, expired: false };
        let payload = protocol::encode(&req).into();
        bus::publish_persistent(&self.js, self.subjects.cancel(job_id), Default::default(), payload, CANCEL_TIMEOUT)
            .await
            .with_context(|| format!("the cancel of job {job_id} was not stored"))?;
        Ok(())
    }

    /// The job's last event in the events stream, if it has any; one that does not decode counts as none.
    pub async fn last_event(&self, job_id: Uuid) -> anyhow::Result<Option<Event>> {
        let last = last_payload(&self.js, self.subjects.events_stream(), self.subjects.events(job_id)).await?;
        Ok(last.and_then(|payload| protocol::decode_event_of(job_id, &payload).ok()))
    }

    /// Whether the job has any event in the events stream (one that does not decode, a newer worker's,
    /// counts).
    pub async fn has_events(&self, job_id: Uuid) -> anyhow::Result<bool> {
        Ok(last_payload(&self.js, self.subjects.events_stream(), self.subjects.events(job_id)).await?.is_some())
    }

    /// The stream sequence of job `job_id`'s message among the waiting jobs on `subject` (its queue), if it
    /// is there: read in order, each by a direct get; an error when NATS cannot say, or the queue is too long
    /// to read within `budget`. (A job a worker has taken is still there until it is settled.)
    pub async fn find_queued(&self, subject: &str, job_id: Uuid, budget: Duration) -> anyhow::Result<Option<u64>> {
        use async_nats::jetstream::stream::DirectGetErrorKind;
        let stream = self.js.get_stream_no_info(self.subjects.jobs_stream()).await?;
        let walk = async {
            let mut next = 1;
            loop {
                match stream.direct_get_next_for_subject(subject, Some(next)).await {
                    Ok(msg) if bus::job_id_of(&msg.payload, Some(&msg.headers)) == Some(job_id) => {
                        return Ok(Some(msg.sequence))
                    }
                    Ok(msg) => next = msg.sequence + 1,
                    Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(anyhow::Error::from(e).context("cannot read the queue")),
                }
            }
        };
        tokio::time::timeout(budget, walk)
            .await
            .with_context(|| format!("the queue {subject} is too long to look through in {} s", budget.as_secs()))?
    }

    /// The cancel request stored for the job, if any ([`stored_cancel`]).
    pub async fn stored_cancel(&self, job_id: Uuid) -> anyhow::Result<Option<CancelRequest>> {
        stored_cancel(&self.js, &self.subjects, job_id).await
    }
}

/// The cancel request for `job_id` stored in `SD_CANCELS` (the last one per job is kept), if any; one that
/// does not decode still counts as a cancel, with no reason.
pub async fn stored_cancel(
    js: &jetstream::Context,
    subjects: &Subjects,
    job_id: Uuid,
) -> anyhow::Result<Option<CancelRequest>> {
    let last = last_payload(js, subjects.cancels_stream(), subjects.cancel(job_id)).await?;
    let unreadable = || CancelRequest { v: PROTOCOL_VERSION, job_id, at: 0, reason: None, expired: false };
    Ok(last.map(|payload| protocol::decode_cancel(&payload).unwrap_or_else(|_| unreadable())))
}

/// The payload of the last message on `subject` in `stream` (a direct get), if there is one.
async fn last_payload(
    js: &jetstream::Context,
    stream: String,
    subject: String,
) -> anyhow::Result<Option<bytes::Bytes>> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    let stream = js.get_stream_no_info(stream).await?;
    match stream.direct_get_last_for_subject(subject).await {
        Ok(message) => Ok(Some(message.payload)),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}
