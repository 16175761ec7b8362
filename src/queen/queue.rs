//! Where a job stands in its queue: its status view (queue position, ETA, whether it waits for a worker or
//! for a redelivery), and how many jobs of each model wait. Read from the jobs stream's consumers and the
//! fleet's view, never stored.

use super::jobs::Jobs;
use crate::api::{JobState, JobStatus, StatusView};
use crate::protocol;
use crate::vocab::Priority;

impl Jobs {
    /// A job's status with its queue position, ETA, and whether it waits for a worker.
    pub async fn view(&self, status: JobStatus) -> StatusView {
        let now = protocol::now_millis();
        let mut v = StatusView {
            status: status.shown(),
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
    /// job waiting at a higher priority, and those before it at its own (read from the shared [`super::queue_walk::QueueWalks`]).
    /// Workers' low-priority share moves low jobs earlier than this says and high and normal ones later.
    async fn queue_position(&self, model: &str, priority: Priority, seq: u64) -> Option<u64> {
        let subject = self.bus.subjects().jobs_at(model, priority).ok()?;
        let stream = self.bus.jetstream().get_stream(self.bus.subjects().jobs_stream()).await.ok()?;
        let mut position = 0;
        for higher in Priority::ALL.into_iter().filter(|p| *p < priority) {
            position += self.waiting(&stream, model, higher).await?;
        }
        let ahead = self.walks.ahead_of(&stream, &subject, model, priority, seq).await?;
        Some(position + ahead)
    }
}
