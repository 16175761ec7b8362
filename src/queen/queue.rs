//! Where a job stands in its queue: its status view (queue position, ETA, whether it waits for a worker or
//! for a redelivery), and how many jobs of each model wait. Read from the jobs stream's consumers and the
//! fleet's view, never stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::jobs::Jobs;
use crate::api::{JobState, JobStatus, StatusView};
use crate::protocol;
use crate::vocab::Priority;

impl Jobs {
    /// A job's status with its queue position, ETA, and whether it waits for a worker.
    pub async fn view(&self, status: JobStatus) -> StatusView {
        let now = protocol::now_millis();
        let mut v = StatusView {
            status,
            queue_position: None,
            eta_ms: None,
            waiting_for_worker: false,
            waiting_for_redelivery: false,
            image_urls: Vec::new(),
        };
        let s = &v.status;
        match s.state {
            JobState::Queued => {
                if let Some(seq) = s.stream_seq {
                    v.queue_position = self.queue_position(&s.model, s.priority, seq).await;
                }
                let workers = self.fleet.serving(&s.model, now);
                v.waiting_for_worker = workers == 0 && self.fleet.has_heard_everyone();
                if let (Some(pos), Some(job_ms)) = (v.queue_position, self.stats.job_ms(&s.model)) {
                    v.eta_ms = Some(((pos as f64 + 1.0) * job_ms / workers.max(1) as f64) as u64);
                }
            }
            JobState::Running => {
                v.eta_ms = s.progress.as_ref().and_then(|p| p.eta_ms);
                v.waiting_for_redelivery = s.worker_id.as_deref().is_some_and(|w| self.fleet.is_lost(w, now));
            }
            _ => {}
        }
        v.image_urls = s
            .images
            .iter()
            .map(|i| i.url.clone().unwrap_or_else(|| format!("/v1/jobs/{}/images/{}", s.job_id, i.index)))
            .collect();
        v
    }

    /// Jobs of each of `models` waiting for a worker: its consumer's undelivered jobs, or, before any worker
    /// created the consumer, every job on its subject. `None` where NATS cannot say.
    pub async fn queue_depths(&self, models: &[&str]) -> Vec<Option<u64>> {
        let Ok(stream) = self.bus.jetstream().get_stream(self.bus.subjects().jobs_stream()).await else {
            return vec![None; models.len()];
        };
        let depth = |model: &str| {
            let stream = &stream;
            let model = model.to_string();
            async move {
                let mut total = 0;
                for priority in Priority::ALL {
                    total += self.waiting(stream, &model, priority).await?;
                }
                Some(total)
            }
        };
        futures::future::join_all(models.iter().map(|m| depth(m))).await
    }

    /// Jobs of `model` waiting at `priority`: its consumer's undelivered jobs, or, before any worker or
    /// queen created the consumer, every job on its subject.
    async fn waiting(
        &self,
        stream: &async_nats::jetstream::stream::Stream,
        model: &str,
        priority: Priority,
    ) -> Option<u64> {
        use futures::StreamExt;
        let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
            stream.get_consumer(&crate::bus::priority_consumer_name(model, priority)).await;
        if let Ok(c) = consumer {
            return Some(c.cached_info().num_pending);
        }
        let subject = self.bus.subjects().jobs_at(model, priority).ok()?;
        let counts = stream.info_with_subjects(subject.as_str()).await.ok()?;
        Some(counts.fold(0u64, |sum, entry| async move { sum + entry.map_or(0, |(_, n)| n as u64) }).await)
    }

    /// How many jobs of `model` a worker takes before the one at stream sequence `seq`, at `priority`: every
    /// job waiting at a higher priority, and those before it at its own (read from the shared [`QueueWalks`]).
    /// Workers' low-priority share moves low jobs earlier than this says and high and normal ones later.
    async fn queue_position(&self, model: &str, priority: Priority, seq: u64) -> Option<u64> {
        let stream = self.bus.jetstream().get_stream(self.bus.subjects().jobs_stream()).await.ok()?;
        let mut position = 0;
        for higher in Priority::ALL.into_iter().filter(|p| *p < priority) {
            position += self.waiting(&stream, model, higher).await?;
        }
        let ahead = self.walks.ahead_of(self, &stream, model, priority, seq).await?;
        Some(position + ahead)
    }
}

/// How long a walk of a queue answers positions before it is walked again from the consumer's place.
const WALK_FRESH: Duration = Duration::from_secs(1);
/// The most jobs a walk reads: a job further back has no position.
const MAX_WALK: usize = 1000;
/// Walks kept before the idle ones are forgotten.
const MAX_QUEUES_WALKED: usize = 1024;

/// The waiting jobs of each queue (model and priority), walked once for every caller: each status request of
/// a queued job used to walk its queue up to it, a thousand reads for a job a thousand back, so clients
/// polling many queued jobs multiplied the queue's depth. Now a queue is walked at most as far as the
/// furthest job asked for, once per [`WALK_FRESH`] (positions may be that stale), one walker at a time.
#[derive(Default)]
pub struct QueueWalks {
    walks: parking_lot::Mutex<HashMap<(String, Priority), SharedWalk>>,
}

/// One queue's walk; a caller holds it while it walks, so the others wait and read the same walk.
type SharedWalk = Arc<tokio::sync::Mutex<Walk>>;

/// The stream sequences of the jobs waiting on one queue's subject, in order, as far as walked.
#[derive(Default)]
struct Walk {
    started: Option<Instant>,
    seqs: Vec<u64>,
    /// The sequence to read from next.
    next: u64,
}

impl Walk {
    /// Where `seq` stands among the jobs walked: `Some(n)` with n jobs before it, `None` when it is not
    /// among them.
    fn position(&self, seq: u64) -> Option<u64> {
        let n = self.seqs.partition_point(|&s| s < seq);
        (self.seqs.get(n) == Some(&seq)).then_some(n as u64)
    }

    /// Whether the walk must go on to answer for `seq` (a job past its end) and may (under the cap).
    fn short_of(&self, seq: u64) -> bool {
        self.seqs.last().is_none_or(|&last| last < seq) && self.seqs.len() < MAX_WALK
    }
}

impl QueueWalks {
    /// Jobs before `seq` on the queue of `model` at `priority`; `None` when it is not waiting there (taken,
    /// cancelled, or past [`MAX_WALK`]) or NATS cannot say.
    async fn ahead_of(
        &self,
        jobs: &Jobs,
        stream: &async_nats::jetstream::stream::Stream,
        model: &str,
        priority: Priority,
        seq: u64,
    ) -> Option<u64> {
        let walk = {
            let mut walks = self.walks.lock();
            // Models come and go: forget the walks no one is reading when there are many.
            if walks.len() >= MAX_QUEUES_WALKED {
                walks.retain(|_, walk| Arc::strong_count(walk) > 1);
            }
            walks.entry((model.to_string(), priority)).or_default().clone()
        };
        // Fresh as of the asking: callers that queued behind a long walk read it rather than each walk again.
        let asked = Instant::now();
        let mut walk = walk.lock().await;
        if walk.started.is_none_or(|at| asked.saturating_duration_since(at) >= WALK_FRESH) {
            // Jobs already delivered (running) are not waiting: start after the consumer's last delivery.
            let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
                stream.get_consumer(&crate::bus::priority_consumer_name(model, priority)).await;
            let next = consumer.map(|c| c.cached_info().delivered.stream_sequence + 1).unwrap_or(1);
            *walk = Walk { started: Some(Instant::now()), seqs: Vec::new(), next };
        }
        let subject = jobs.bus.subjects().jobs_at(model, priority).ok()?;
        while walk.short_of(seq) {
            match stream.direct_get_next_for_subject(subject.as_str(), Some(walk.next)).await {
                // (One past the job ends the walk for it, and is kept for the next caller.)
                Ok(msg) => {
                    walk.seqs.push(msg.sequence);
                    walk.next = msg.sequence + 1;
                }
                // No message from there on (or NATS cannot say): asked again, the walk goes on from here.
                Err(_) => break,
            }
        }
        walk.position(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_places_the_jobs_it_read_and_no_other() {
        let walk = Walk { started: Some(Instant::now()), seqs: vec![3, 7, 8, 20], next: 21 };
        assert_eq!([3, 7, 8, 20].map(|s| walk.position(s)), [Some(0), Some(1), Some(2), Some(3)]);
        assert_eq!([1, 5, 21].map(|s| walk.position(s)), [None, None, None], "not waiting, or not read yet");
        assert!(walk.short_of(21) && !walk.short_of(20) && !walk.short_of(4));
        let full = Walk { seqs: (1..=MAX_WALK as u64).collect(), ..Default::default() };
        assert!(!full.short_of(MAX_WALK as u64 + 5), "never past the cap");
    }
}
