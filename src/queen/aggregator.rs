//! Folds every worker event into the job status bucket. The queens share one durable consumer on the
//! events stream, so each event is applied once (by whichever queen pulls it); a queen that was down catches
//! up where the consumer stopped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, AckKind};
use futures::FutureExt;

use super::index::JobIndex;
use super::metrics::Metrics;
use super::status::{StatusStore, Updated};
use super::webhooks::plan::{owes_start, shows_terminal};
use super::webhooks::{Planner, Webhooks};
use crate::api::JobStatus;
use crate::bus::{self, StreamSettings};
use crate::protocol::{self, Event, Subjects};

/// The queens' shared consumer of the events stream.
pub const AGGREGATOR_CONSUMER: &str = "queen-aggregator";

/// Deliveries of one event before the aggregator gives up applying it.
const MAX_EVENT_DELIVERIES: i64 = 5;

/// The most models [`ModelStats`] keeps figures for.
const MAX_MODEL_STATS: usize = 1024;

/// Recent per-model figures, for ETAs, and the queen's metrics (this queen's share of the events).
#[derive(Clone, Default)]
pub struct ModelStats {
    pub metrics: Metrics,
    inner: Arc<Mutex<HashMap<String, Stat>>>,
    /// Each running job's last progress, for step times.
    last_progress: Arc<Mutex<HashMap<uuid::Uuid, LastStep>>>,
}

/// A job's last progress event: its time and step, and when this queen heard it.
#[derive(Clone, Copy)]
struct LastStep {
    at: u64,
    step: u32,
    heard: Instant,
}

#[derive(Clone, Copy, Default)]
struct Stat {
    /// Exponential moving average of a job's generation time.
    job_ms: f64,
    completed: u64,
}

impl ModelStats {
    pub fn record_completed(&self, model: &str, generation_ms: u64) {
        let mut map = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Events come from the bus, under any model name: past the bound, a new name gets no ETA figures.
        if map.len() < MAX_MODEL_STATS || map.contains_key(model) {
            let s = map.entry(model.to_string()).or_default();
            s.job_ms =
                if s.completed == 0 { generation_ms as f64 } else { 0.8 * s.job_ms + 0.2 * generation_ms as f64 };
            // Sums saturate rather than overflow.
            s.completed = s.completed.saturating_add(1);
        }
        drop(map);
        self.metrics.generation(model, generation_ms);
    }

    /// A progress event of a job of `model`: the time since the previous step's, per step.
    pub fn record_progress(&self, model: &str, job_id: uuid::Uuid, at: u64, step: u32) {
        let previous = {
            let mut last = self.last_progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            let previous = last.insert(job_id, LastStep { at, step, heard: now });
            forget_quiet_jobs(&mut last, now, |last| last.heard);
            previous
        };
        if let Some(prev) = previous {
            if step > prev.step && at >= prev.at {
                self.metrics.steps(model, step - prev.step, at - prev.at);
            }
        }
    }

    /// The job ended: forget its progress.
    pub fn forget(&self, job_id: uuid::Uuid) {
        self.last_progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&job_id);
    }

    /// Typical generation time of one job of `model`, if any completed.
    pub fn job_ms(&self, model: &str) -> Option<f64> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(model)
            .filter(|s| s.completed > 0)
            .map(|s| s.job_ms)
    }
}

/// Running jobs tracked per queen before those quiet for [`FORGET_QUIET_JOBS`] are dropped (queens share the
/// events, so the one that saw a job's progress may not see its end).
const TRACKED_JOBS: usize = 4096;
const FORGET_QUIET_JOBS: Duration = Duration::from_secs(600);

/// Past [`TRACKED_JOBS`] entries, drops the jobs this queen has not heard of for [`FORGET_QUIET_JOBS`] (by its
/// own clock: an event's time is its sender's word, and one dated 0 would otherwise never look quiet), and
/// if that is not enough (a burst of new jobs, or of events made up for them), all but the half heard of
/// last: the map stays bounded, and each pass over it frees room for many more inserts.
fn forget_quiet_jobs<V>(jobs: &mut HashMap<uuid::Uuid, V>, now: Instant, heard: impl Fn(&V) -> Instant) {
    if jobs.len() <= TRACKED_JOBS {
        return;
    }
    jobs.retain(|_, v| now.duration_since(heard(v)) < FORGET_QUIET_JOBS);
    if jobs.len() > TRACKED_JOBS {
        let mut times: Vec<Instant> = jobs.values().map(&heard).collect();
        let keep_from = times.len() - TRACKED_JOBS / 2;
        let cut = *times.select_nth_unstable(keep_from).1;
        jobs.retain(|_, v| heard(v) >= cut);
    }
}

/// How often a running job's status record takes a progress event. The events themselves all reach SSE
/// followers; the record (for `GET /v1/jobs/{id}`) need not be rewritten for each step of a fast GPU.
pub const PROGRESS_WRITE_INTERVAL: Duration = Duration::from_millis(250);

/// Which progress events are written to the status bucket: a job's first, its last step, and otherwise at
/// most one per [`PROGRESS_WRITE_INTERVAL`].
#[derive(Default)]
struct ProgressThrottle {
    /// Per running job: when its record last took progress, and its model (for the step statistics of
    /// events that are not written).
    written: HashMap<uuid::Uuid, (std::time::Instant, String)>,
}

impl ProgressThrottle {
    /// The model of a job whose progress event `p` need not be written now; `None`: write it.
    fn skip(&self, p: &protocol::Progress, now: std::time::Instant) -> Option<&str> {
        let (at, model) = self.written.get(&p.job_id)?;
        (p.step < p.total && now.duration_since(*at) < PROGRESS_WRITE_INTERVAL).then_some(model.as_str())
    }

    fn wrote(&mut self, job_id: uuid::Uuid, model: &str, now: std::time::Instant) {
        self.written.insert(job_id, (now, model.to_string()));
        // Another queen may apply a job's terminal event: forget jobs quiet for a while.
        forget_quiet_jobs(&mut self.written, now, |(at, _)| *at);
    }

    fn forget(&mut self, job_id: uuid::Uuid) {
        self.written.remove(&job_id);
    }
}

/// What the aggregator writes to: the status bucket, the job index, the statistics.
#[derive(Clone)]
pub struct Aggregation {
    pub status: StatusStore,
    pub index: JobIndex,
    pub stats: ModelStats,
}

/// Pulls events and applies them until the process ends; reconnects and retries on errors. When the streams
/// or the status bucket are gone (deleted, or a server that lost its store) it creates them again.
pub async fn run(js: jetstream::Context, subjects: Subjects, to: Aggregation, webhooks: Webhooks) {
    loop {
        if let Err(e) = pull(&js, &subjects, &to, &webhooks).await {
            tracing::warn!(error = %e, "event aggregation interrupted; resuming");
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Err(e) = bus::ensure_streams(&js, &subjects, &StreamSettings::default()).await {
                tracing::debug!(error = %e, "cannot bind the streams yet");
            }
            if let Err(e) = to.status.recreate().await {
                tracing::debug!(error = %e, "cannot bind the status bucket yet");
            }
        }
    }
}

async fn pull(
    js: &jetstream::Context,
    subjects: &Subjects,
    to: &Aggregation,
    webhooks: &Webhooks,
) -> anyhow::Result<()> {
    let stream = js.get_stream(subjects.events_stream()).await?;
    let mut consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            AGGREGATOR_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(AGGREGATOR_CONSUMER.into()),
                description: Some("sd-rbee queens: job status aggregation".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let mut throttle = ProgressThrottle::default();
    let mut planner = Planner::new(webhooks.config.progress_interval);
    loop {
        let msg = bus::next_message(&mut consumer, &mut messages, Duration::from_secs(5)).await?;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        // An event about another job than its subject names is not applied: readers of one job's events
        // (its feed, a compat reply) skip it too, and would tell a different story than its record.
        let decoded = match subjects.job_of_events_subject(&msg.subject) {
            Some(job_id) => protocol::decode_event_of(job_id, &msg.payload),
            None => Err(protocol::ProtocolError::malformed(format!("{:?} names no job", msg.subject.as_str()))),
        };
        match decoded {
            Ok(event) => {
                // The delivery is queued before the event is acknowledged: a queen that stops in between applies
                // the event again, and the queue takes its delivery once.
                let applied = async {
                    let status = apply(to, &mut throttle, &event).await?;
                    if let Some(delivery) = status.and_then(|s| planner.plan(&s, &event, seq)) {
                        webhooks.enqueue(&delivery).await?;
                    }
                    anyhow::Ok(())
                };
                // A panic on one event (a defect its contents reach) skips that event: left to end this task,
                // every job's status would stop moving while the API still answered, and the event, redelivered,
                // would do the same to the next queen.
                let result = std::panic::AssertUnwindSafe(applied)
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| Err(EventPanicked.into()));
                if let Err(e) = result {
                    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
                    match after_failure(&e, delivered, matches!(event, Event::Progress(_))) {
                        Settle::Skip => {
                            let job_id = event.job_id();
                            tracing::error!(%job_id, subject = %msg.subject, seq, delivered, error = %format!("{e:#}"), "event skipped (and any webhook it owed)");
                        }
                        Settle::Retry(wait) => {
                            // The status bucket may be gone (deleted, or lost with the server's store).
                            if let Err(e) = to.status.recreate().await {
                                tracing::debug!(error = %e, "cannot bind the status bucket yet");
                            }
                            tracing::warn!(subject = %msg.subject, seq, delivered, error = %format!("{e:#}"), "event not applied; tried again in {wait:?}");
                            msg.ack_with(AckKind::Nak(Some(wait))).await.map_err(|e| anyhow::anyhow!("nak: {e}"))?;
                            continue;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(subject = %msg.subject, error = %e, "unreadable event skipped"),
        }
        msg.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
    }
}

/// What becomes of an event that could not be applied.
#[derive(Debug, PartialEq)]
enum Settle {
    /// Acknowledged without being applied.
    Skip,
    /// Delivered again after the wait, while the events behind it go on.
    Retry(Duration),
}

/// The policy for an event that failed on its `delivered`-th delivery with `error`. One that can never apply
/// (a panic it reaches, a record it would make too large or cannot read) is skipped at once: it would come
/// back for ever. Otherwise (the status bucket unreachable, out of quorum, contended) it is tried again
/// later: a `progress` one up to [`MAX_EVENT_DELIVERIES`] times (a later one says more), any other for as
/// long as it takes (a dropped end leaves the job running at the queen for good; a dropped `accepted`, its
/// worker unknown).
fn after_failure(error: &anyhow::Error, delivered: i64, progress: bool) -> Settle {
    let never = error.is::<EventPanicked>()
        || error.is::<super::status::StatusTooLarge>()
        || error.is::<super::status::UnreadableStatus>();
    if never || (progress && delivered >= MAX_EVENT_DELIVERIES) {
        return Settle::Skip;
    }
    // 2 s, 4 s, ... up to a minute between tries.
    let exponent = u32::try_from(delivered.clamp(1, 6)).unwrap_or(6);
    Settle::Retry(Duration::from_secs(2u64.pow(exponent)).min(Duration::from_secs(60)))
}

/// Applying an event panicked (the panic itself was reported by the panic hook).
#[derive(Debug, thiserror::Error)]
#[error("applying the event panicked")]
struct EventPanicked;

/// Applies `event` to its job's record. Returns the record to plan the event's webhook delivery against:
/// as the event left it, or as it is when the event changed nothing but its delivery may still be owed;
/// `None` for a step that is owed nothing.
async fn apply(to: &Aggregation, throttle: &mut ProgressThrottle, event: &Event) -> anyhow::Result<Option<JobStatus>> {
    let Aggregation { status: store, index, stats } = to;
    let job_id = event.job_id();
    let at = event.at();
    let now = Instant::now();
    if let Event::Progress(p) = event {
        if let Some(model) = throttle.skip(p, now) {
            stats.record_progress(model, job_id, p.at, p.step);
            return Ok(None);
        }
    }
    let applied = store.update(job_id, || JobStatus::unknown(job_id, at), |s| s.apply(event)).await?;
    if let Some(Updated { before, status }) = &applied {
        stats.metrics.moved(*before, status);
        // A job first heard of through its events (published on the bus without a queen) joins the index.
        if before.is_none() {
            if let Err(e) = index.add(job_id, status.tenant.as_deref()).await {
                tracing::warn!(%job_id, error = %e, "cannot add the job to the index; it is not listed");
            }
        }
    }
    let updated = applied.map(|u| u.status);
    match (&updated, event) {
        (Some(status), Event::Completed(c)) => stats.record_completed(&status.model, c.timings.generation_ms),
        (Some(status), Event::Progress(p)) => {
            stats.record_progress(&status.model, job_id, p.at, p.step);
            throttle.wrote(job_id, &status.model, now);
        }
        _ => {}
    }
    if event.is_terminal() {
        stats.forget(job_id);
        throttle.forget(job_id);
    }
    if updated.is_some() {
        return Ok(updated);
    }
    // An event the record did not take may still be owed to a webhook: a start older than the newest step
    // applied (it came back after a queen stopped before acknowledging it), a terminal event applied before.
    Ok(match event {
        Event::Accepted(a) => store.get(job_id).await?.filter(|s| owes_start(s, a)),
        Event::Completed(_) | Event::Failed(_) | Event::Cancelled(_) => {
            store.get(job_id).await?.filter(|s| shows_terminal(s, event))
        }
        Event::Progress(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_that_cannot_apply_is_skipped_and_only_progress_is_dropped_for_an_outage() {
        let outage = || anyhow::anyhow!("timed out: didn't receive a response");
        assert_eq!(after_failure(&outage(), 1, true), Settle::Retry(Duration::from_secs(2)));
        assert_eq!(after_failure(&outage(), MAX_EVENT_DELIVERIES, true), Settle::Skip, "a progress event gives up");
        for delivered in [1, MAX_EVENT_DELIVERIES, 1000, i64::MAX] {
            assert!(
                matches!(after_failure(&outage(), delivered, false), Settle::Retry(w) if w <= Duration::from_secs(60))
            );
        }
        let too_large =
            anyhow::Error::from(super::super::status::StatusTooLarge { job_id: uuid::Uuid::nil(), bytes: 1 });
        let unreadable = anyhow::Error::from(super::super::status::UnreadableStatus {
            job_id: uuid::Uuid::nil(),
            reason: "x".into(),
            state: None,
        });
        for never in [anyhow::Error::from(EventPanicked), too_large, unreadable] {
            assert_eq!(after_failure(&never, 1, false), Settle::Skip);
        }
    }

    #[test]
    fn a_flood_of_progress_for_made_up_jobs_stays_bounded() {
        // Events dated 0 (an event's time is its sender's word) for ever new job ids.
        let stats = ModelStats::default();
        for step in 0..3 * TRACKED_JOBS as u32 {
            stats.record_progress("tiny", uuid::Uuid::new_v4(), 0, step);
        }
        let tracked = stats.last_progress.lock().unwrap().len();
        assert!((TRACKED_JOBS / 2..=TRACKED_JOBS).contains(&tracked), "{tracked} jobs tracked");
        // A job heard of lately is still tracked through the burst: its next step is timed.
        let job = uuid::Uuid::new_v4();
        stats.record_progress("tiny", job, 1_000, 1);
        for _ in 0..TRACKED_JOBS / 4 {
            stats.record_progress("tiny", uuid::Uuid::new_v4(), 0, 1);
        }
        assert!(stats.last_progress.lock().unwrap().contains_key(&job));
        let mut throttle = ProgressThrottle::default();
        let t0 = Instant::now();
        for k in 0..3 * TRACKED_JOBS as u64 {
            throttle.wrote(uuid::Uuid::new_v4(), "tiny", t0 + Duration::from_micros(k));
        }
        assert!(throttle.written.len() <= TRACKED_JOBS, "{}", throttle.written.len());
    }

    #[test]
    fn progress_is_written_first_last_and_at_most_once_per_interval() {
        let job = uuid::Uuid::new_v4();
        let step = |n| protocol::Progress::new(job, n, 10, 0);
        let mut throttle = ProgressThrottle::default();
        let t0 = std::time::Instant::now();
        assert_eq!(throttle.skip(&step(1), t0), None, "a job's first progress is written");
        throttle.wrote(job, "tiny", t0);
        assert_eq!(throttle.skip(&step(2), t0 + Duration::from_millis(10)), Some("tiny"));
        assert_eq!(throttle.skip(&step(10), t0 + Duration::from_millis(10)), None, "the last step is written");
        assert_eq!(throttle.skip(&step(3), t0 + PROGRESS_WRITE_INTERVAL), None);
        throttle.forget(job);
        assert_eq!(throttle.skip(&step(4), t0), None);

        // Jobs whose end another queen applied are forgotten once quiet for long.
        for _ in 0..TRACKED_JOBS {
            throttle.wrote(uuid::Uuid::new_v4(), "tiny", t0);
        }
        throttle.wrote(job, "tiny", t0 + FORGET_QUIET_JOBS);
        assert_eq!(throttle.written.len(), 1);
    }
}
