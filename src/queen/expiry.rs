//! Job expiry: a job with a ttl (`ttl_s`, or the queen's `--default-ttl`) answers `410 Gone` from its
//! `expires_at` on, and the sweeper (`sweeper.rs`) then deletes its images, its manifest and its checkpoint,
//! stops it if it still runs, and leaves its status record as a tombstone (identity, state and times) until
//! the status bucket's own age removes it. This file: the policy and the schedule.
//!
//! The schedule is a JetStream work queue (`SD_EXPIRY`, subject `sd.expiry`): one message per job with a
//! ttl, written when the job is queued (and, for every job, one [`QueuedCheck`]; for a job cancelled while
//! queued, one [`DequeuedCheck`]). The queens share one durable consumer on it; a message that is not due is
//! handed back with a delay of the time left (a NAK with a delay), so each job is looked at about when it
//! expires, by whichever queen is up, and a restarted queen loses nothing.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::work_queue::WorkQueue;
use crate::protocol::{JobRequest, Subjects};

/// The queens' shared consumer of the expiry schedule.
pub const SWEEPER_CONSUMER: &str = "queen-sweeper";

/// One scheduled expiry.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Due {
    pub job_id: Uuid,
    pub expires_at: u64,
}

/// One scheduled check that a job is on the queue by `queued_by` (`submit.rs`): its publish, and the
/// background publish of a keyed job the bus did not confirm, live only in its queen, and a queen that stops
/// leaves the check to whichever queen is up. (Its fields are not a [`Due`]'s, so a queen older than it
/// drops it unread rather than expire the job.)
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct QueuedCheck {
    pub job_id: Uuid,
    pub queued_by: u64,
}

/// One scheduled check that a job taken off the queue by its cancel (`jobs.rs`) has its end stored by
/// `check_at`: its queen publishes the end right after the deletion, and one that stops in between would
/// leave the job `queued` for ever, on no queue. (Queens older than it drop it unread: during an upgrade,
/// the ones they take are lost.)
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct DequeuedCheck {
    pub job_id: Uuid,
    /// The job's message on the jobs stream, deleted by the cancel.
    pub dequeued_seq: u64,
    /// When it was cancelled: the `at` of its `cancelled`, whichever queen publishes it (the same event).
    pub cancelled_at: u64,
    pub check_at: u64,
    /// Taken off the queue as its ttl passed: it ends `failed` (`TIMEOUT`), not `cancelled`.
    #[serde(default)]
    pub expired: bool,
}

/// A message of the schedule.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum Scheduled {
    Expiry(Due),
    QueuedCheck(QueuedCheck),
    DequeuedCheck(DequeuedCheck),
}

/// The expiry policy and schedule of one fleet.
#[derive(Clone)]
pub struct Expiry {
    pub(super) queue: WorkQueue,
    /// The ttl of jobs that give none.
    pub default_ttl: Option<Duration>,
}

impl Expiry {
    /// Binds (creating if needed) the schedule of the fleet under `subjects`.
    pub async fn open(
        js: &jetstream::Context,
        subjects: &Subjects,
        default_ttl: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let description = "sd-rbee queens: when each job with a ttl expires";
        let window = Duration::from_secs(120);
        let queue = WorkQueue::open(js, subjects.expiry_stream(), subjects.expiry(), description, window).await?;
        Ok(Self { queue, default_ttl })
    }

    /// Gives `job` the default ttl when it has none.
    pub fn apply_default(&self, job: &mut JobRequest) {
        if job.expires_at.is_none() {
            let ttl = self.default_ttl.map(|d| d.as_millis() as u64);
            job.expires_at = ttl.map(|t| job.created_at.saturating_add(t));
        }
    }

    /// Schedules the sweep of `job` (once: the job id is the message id); nothing for a job without a ttl.
    pub async fn schedule(&self, job: &JobRequest) -> anyhow::Result<()> {
        let Some(expires_at) = job.expires_at else { return Ok(()) };
        let payload = bytes::Bytes::from(serde_json::to_vec(&Due { job_id: job.id, expires_at })?);
        self.queue.publish(&format!("expiry-{}", job.id), payload).await.context("cannot schedule the job's expiry")
    }

    /// Schedules the check that `job` is on the queue (or has ended) by `queued_by` (once per job).
    pub(super) async fn schedule_queued_check(&self, job: &JobRequest, queued_by: u64) -> anyhow::Result<()> {
        let payload = bytes::Bytes::from(serde_json::to_vec(&QueuedCheck { job_id: job.id, queued_by })?);
        let id = format!("queued-check-{}", job.id);
        self.queue.publish(&id, payload).await.context("cannot schedule the check that the job is queued")
    }

    /// Schedules the check that a job whose message a cancel is deleting has its end stored (once per job).
    pub(super) async fn schedule_dequeued_check(&self, check: &DequeuedCheck) -> anyhow::Result<()> {
        let (job_id, payload) = (check.job_id, serde_json::to_vec(check)?);
        let id = format!("dequeued-check-{job_id}");
        self.queue.publish(&id, payload.into()).await.context("cannot schedule the check that the job's end is stored")
    }

    /// The queens' shared consumer of the schedule and its messages.
    pub(super) async fn messages(&self) -> anyhow::Result<(consumer::PullConsumer, consumer::pull::Stream)> {
        let description = "sd-rbee queens: expired jobs' sweeper";
        self.queue.consume(SWEEPER_CONSUMER, description, Duration::from_secs(60), None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind of message of the schedule reads back as itself, never as another kind: the untagged enum
    /// tells them apart by their fields alone.
    #[test]
    fn each_scheduled_message_reads_back_as_its_own_kind() {
        let job_id = Uuid::new_v4();
        let read = |value: serde_json::Value| serde_json::from_value::<Scheduled>(value).unwrap();
        let due = read(serde_json::to_value(Due { job_id, expires_at: 5 }).unwrap());
        assert!(matches!(due, Scheduled::Expiry(Due { expires_at: 5, .. })), "{due:?}");
        let queued = read(serde_json::to_value(QueuedCheck { job_id, queued_by: 6 }).unwrap());
        assert!(matches!(queued, Scheduled::QueuedCheck(QueuedCheck { queued_by: 6, .. })), "{queued:?}");
        let dequeued = read(
            serde_json::to_value(DequeuedCheck {
                job_id,
                dequeued_seq: 7,
                cancelled_at: 1,
                check_at: 8,
                expired: false,
            })
            .unwrap(),
        );
        assert!(
            matches!(dequeued, Scheduled::DequeuedCheck(DequeuedCheck { dequeued_seq: 7, check_at: 8, .. })),
            "{dequeued:?}"
        );
    }
}
