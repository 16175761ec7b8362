//! The worker fleet as heartbeats show it. Every queen listens to every heartbeat (core NATS), so each has
//! the whole picture; a worker silent for `lost_after` is lost, and a job it held waits for redelivery.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;

use crate::protocol::{self, Heartbeat, Subjects};

/// A worker and when it was last heard of.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct WorkerInfo {
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
    pub last_seen: u64,
    pub lost: bool,
}

#[derive(Clone, Default)]
pub struct Fleet {
    workers: Arc<Mutex<HashMap<String, (Heartbeat, u64)>>>,
    lost_after_ms: u64,
}

impl Fleet {
    pub fn new(lost_after: Duration) -> Self {
        Self { workers: Arc::default(), lost_after_ms: lost_after.as_millis() as u64 }
    }

    pub fn record(&self, hb: Heartbeat, now: u64) {
        self.workers.lock().unwrap().insert(hb.worker_id.clone(), (hb, now));
    }

    /// Every worker heard of, lost ones included, sorted by id.
    pub fn workers(&self, now: u64) -> Vec<WorkerInfo> {
        let mut out: Vec<WorkerInfo> = self
            .workers
            .lock()
            .unwrap()
            .values()
            .map(|(hb, seen)| WorkerInfo {
                heartbeat: hb.clone(),
                last_seen: *seen,
                lost: now.saturating_sub(*seen) > self.lost_after_ms,
            })
            .collect();
        out.sort_by(|a, b| a.heartbeat.worker_id.cmp(&b.heartbeat.worker_id));
        out
    }

    /// Whether `worker_id` is lost (heard of, then silent too long). An unknown worker is not lost: this
    /// queen may have started after its last heartbeat.
    pub fn is_lost(&self, worker_id: &str, now: u64) -> bool {
        self.workers
            .lock()
            .unwrap()
            .get(worker_id)
            .is_some_and(|(_, seen)| now.saturating_sub(*seen) > self.lost_after_ms)
    }

    /// Live workers serving `model`.
    pub fn serving(&self, model: &str, now: u64) -> usize {
        self.workers(now).iter().filter(|w| !w.lost && w.heartbeat.models.iter().any(|m| m == model)).count()
    }

    /// The models live workers serve, with how many serve each.
    pub fn models(&self, now: u64) -> Vec<(String, usize)> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for w in self.workers(now).into_iter().filter(|w| !w.lost) {
            for m in w.heartbeat.models {
                *counts.entry(m).or_default() += 1;
            }
        }
        let mut out: Vec<(String, usize)> = counts.into_iter().collect();
        out.sort();
        out
    }

    /// Follows heartbeats until the subscription ends.
    pub async fn listen(self, client: async_nats::Client, subjects: Subjects) {
        let mut sub = match client.subscribe(subjects.heartbeats_wildcard()).await {
            Ok(s) => s,
            Err(e) => return tracing::error!(error = %e, "cannot subscribe to heartbeats"),
        };
        while let Some(msg) = sub.next().await {
            match protocol::decode_heartbeat(&msg.payload) {
                Ok(hb) => self.record(hb, protocol::now_millis()),
                Err(e) => tracing::debug!(error = %e, "unreadable heartbeat"),
            }
        }
    }
}
