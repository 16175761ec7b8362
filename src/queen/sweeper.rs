//! The expiry sweeper: takes each job of the schedule (`expiry.rs`) when it expires, stops it if it still
//! runs, deletes its images, manifest and checkpoint, and leaves its status record as a tombstone; and ends
//! a job the bus never took, at its queued check. The queens share its consumer, so each expiry is
//! swept once, by whichever queen is up. The same loop ends a job cancelled while queued whose end its queen
//! did not store.

use std::time::Duration;

use async_nats::jetstream::AckKind;
use uuid::Uuid;

use super::expiry::{DequeuedCheck, Due, QueuedCheck, Scheduled};
use super::jobs::Jobs;
use crate::api::JobStatus;
use crate::bus;
use crate::protocol;

/// The longest a job not yet due waits before it is looked at again.
const MAX_WAIT: Duration = Duration::from_secs(3600);
/// When a job stopped at its expiry is swept again.
const SECOND_LOOK: Duration = Duration::from_secs(30);
/// How long past its queued check a job the bus never took waits for its cancel to be stored before it is
/// ended without one.
const REQUIRE_CANCEL_FOR: Duration = Duration::from_secs(10 * 60);
/// The first and the longest pause before a sweep that failed is tried again.
const FIRST_RETRY: Duration = Duration::from_secs(5);
const LONGEST_RETRY: Duration = Duration::from_secs(30 * 60);

/// How long a sweep that failed `overdue` after the job's expiry waits before the next try: half the time
/// since the expiry (for a sweep that ran on time, the time it has been failing), from 5 s to 30 min. The
/// pause grows without a count kept anywhere (the delivery count of the schedule's message also counts the
/// hourly looks before the expiry), and the sweep is never given up: the job's objects must go.
fn retry_after(overdue: Duration) -> Duration {
    (overdue / 2).clamp(FIRST_RETRY, LONGEST_RETRY)
}

/// The most of a job's objects deleted by one sweep (each sweep lists them, and holds their names).
const SWEPT_AT_ONCE: usize = 10_000;

/// How long after its expiry a job that does not end is still looked at: its worker, told to stop at each
/// look, is gone (or it never had one: a made-up `accepted` event), and each look costs a store listing.
const LOOK_FOR: Duration = Duration::from_secs(3600);

/// When an expired job is swept again, given whether it had ended at this sweep and how long ago it
/// expired; `None` when it is not. A job that had not ended was stopped: a worker finishing its upload just
/// now may still write objects, so it is looked at again once it has ended, for [`LOOK_FOR`] at most.
fn look_again(ended: bool, overdue: Duration) -> Option<Duration> {
    (!ended && overdue < LOOK_FOR).then(|| retry_after(overdue).max(SECOND_LOOK))
}

/// Sweeps expired jobs until the process ends; binds the schedule again and goes on after errors.
pub async fn run(jobs: Jobs) {
    loop {
        if let Err(e) = sweep_due(&jobs).await {
            tracing::warn!(error = %format!("{e:#}"), "the expiry sweeper stopped; resuming");
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Err(e) = jobs.expiry.queue.bind().await {
                tracing::debug!(error = %e, "cannot bind the expiry stream yet");
            }
        }
    }
}

async fn sweep_due(jobs: &Jobs) -> anyhow::Result<()> {
    let (mut consumer, mut messages) = jobs.expiry.messages().await?;
    loop {
        let msg = bus::next_message(&mut consumer, &mut messages, Duration::from_secs(5)).await?;
        let due: Due = match serde_json::from_slice(&msg.payload) {
            Ok(Scheduled::Expiry(due)) => due,
            Ok(Scheduled::QueuedCheck(check)) => {
                let ack = check_queued(jobs, &check).await;
                msg.ack_with(ack).await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                continue;
            }
            Ok(Scheduled::DequeuedCheck(check)) => {
                let ack = check_dequeued(jobs, &check).await;
                msg.ack_with(ack).await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "an unreadable expiry skipped");
                msg.ack_with(AckKind::Term).await.map_err(|e| anyhow::anyhow!("term: {e}"))?;
                continue;
            }
        };
        let now = protocol::now_millis();
        let ack = if due.expires_at > now {
            // Capped: a delay the server cannot take would be a plain NAK, and the message would spin.
            AckKind::Nak(Some(Duration::from_millis(due.expires_at - now).min(MAX_WAIT)))
        } else {
            let overdue = Duration::from_millis(now - due.expires_at);
            match sweep(jobs, due.job_id, due.expires_at).await {
                Ok(ended) => match look_again(ended, overdue) {
                    Some(wait) => AckKind::Nak(Some(wait)),
                    None if ended => AckKind::Ack,
                    None => {
                        tracing::warn!(job_id = %due.job_id, ?overdue, "an expired job never ended (its worker is gone, or was never there): its record stays a tombstone");
                        AckKind::Ack
                    }
                },
                Err(e) => {
                    let retry = retry_after(overdue);
                    tracing::warn!(job_id = %due.job_id, error = %format!("{e:#}"), ?retry, "cannot sweep an expired job yet");
                    AckKind::Nak(Some(retry))
                }
            }
        };
        msg.ack_with(ack).await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
    }
}

/// Ends a job that is still not on the queue at its check ([`Jobs::abandon_unqueued`]), then keeps the
/// record of one that waits there ([`StatusStore::keep_queued`](super::status::StatusStore::keep_queued));
/// how the check's message is acknowledged.
async fn check_queued(jobs: &Jobs, check: &QueuedCheck) -> AckKind {
    let checked = when_due(check.queued_by, check.job_id, "cannot end a job the bus did not take yet", |overdue| {
        // A cancel the bus will not store for this long (no SD_CANCELS) no longer keeps the job `queued`.
        jobs.abandon_unqueued(check.job_id, overdue < REQUIRE_CANCEL_FOR)
    })
    .await;
    if !matches!(checked, AckKind::Ack) {
        return checked;
    }
    let Some(every) = jobs.status.keep_every() else { return AckKind::Ack };
    match jobs.status.keep_queued(check.job_id, every).await {
        Ok(None) => AckKind::Ack,
        // Looked at again after as long as it has waited: a few looks for a short wait, a handful a week for
        // a long one, never further apart than the record's renewal needs.
        Ok(Some(created_at)) => {
            let waited = Duration::from_millis(protocol::now_millis().saturating_sub(created_at));
            AckKind::Nak(Some(waited.max(SECOND_LOOK).min(every)))
        }
        Err(e) => {
            tracing::warn!(job_id = %check.job_id, error = %format!("{e:#}"), "cannot renew a queued job's record yet");
            AckKind::Nak(Some(SECOND_LOOK))
        }
    }
}

/// Ends a job cancelled while queued if its end is still not stored ([`Jobs::end_dequeued`]); how the
/// check's message is acknowledged.
async fn check_dequeued(jobs: &Jobs, check: &DequeuedCheck) -> AckKind {
    when_due(check.check_at, check.job_id, "cannot end a job cancelled while queued yet", |_| jobs.end_dequeued(check))
        .await
}

/// Runs a check of job `job_id` due at `due` (unix ms), given how long it is overdue; how its message is
/// acknowledged: handed back until it is due, and after a failure, again ever less often.
async fn when_due<F>(due: u64, job_id: Uuid, failing: &str, check: impl FnOnce(Duration) -> F) -> AckKind
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let now = protocol::now_millis();
    if due > now {
        return AckKind::Nak(Some(Duration::from_millis(due - now).min(MAX_WAIT)));
    }
    let overdue = Duration::from_millis(now - due);
    match check(overdue).await {
        Ok(()) => AckKind::Ack,
        Err(e) => {
            let retry = retry_after(overdue);
            tracing::warn!(%job_id, error = %format!("{e:#}"), ?retry, "{failing}");
            AckKind::Nak(Some(retry))
        }
    }
}

/// Stops job `job_id` if it still runs, deletes its objects and leaves its record as a tombstone. Returns
/// whether the job had ended before.
async fn sweep(jobs: &Jobs, job_id: Uuid, expires_at: u64) -> anyhow::Result<bool> {
    let record = jobs.status.get(job_id).await?;
    if let Some(status) = record.as_ref().filter(|s| !s.state.is_terminal()) {
        // Its worker stops it at its expiry too; a queued one leaves the queue.
        if let Err(e) = jobs.cancel_record(status.clone(), super::jobs::StopCause::Expiry).await {
            tracing::warn!(%job_id, error = %e, "cannot stop an expired job");
        }
    }
    let prefix = protocol::result_prefix(job_id);
    let names = jobs.store.list(&prefix, SWEPT_AT_ONCE).await?;
    for name in &names {
        jobs.store.delete(&format!("{prefix}{name}")).await?;
    }
    // (Anything with the store's keys can write there.) The rest is swept at the next try.
    anyhow::ensure!(names.len() < SWEPT_AT_ONCE, "{SWEPT_AT_ONCE} objects of {prefix} deleted; more may remain");
    jobs.store.delete(&protocol::resume_key(job_id)).await?;
    // Written once: a record rewritten at each look would never age out of the bucket.
    let tombstone = |s: &mut JobStatus| {
        let before = s.clone();
        s.expire();
        s.expires_at = Some(s.expires_at.map_or(expires_at, |e| e.min(expires_at)));
        *s != before
    };
    if record.is_some() {
        jobs.status.update(job_id, || JobStatus::unknown(job_id, expires_at), tombstone).await?;
    }
    tracing::info!(%job_id, "expired job swept");
    Ok(record.as_ref().is_none_or(|s| s.state.is_terminal()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_that_never_ends_is_looked_at_for_an_hour_after_its_expiry() {
        let s = Duration::from_secs;
        assert_eq!(look_again(true, s(5)), None, "an ended job is swept once");
        assert_eq!(look_again(false, s(5)), Some(SECOND_LOOK));
        assert_eq!(look_again(false, s(1200)), Some(s(600)));
        assert_eq!(look_again(false, s(3598)), Some(s(1799)));
        assert_eq!(look_again(false, s(3600)), None, "its worker is gone: no more looks");
    }

    #[test]
    fn a_failing_sweep_is_retried_ever_less_often_but_never_given_up() {
        let s = Duration::from_secs;
        assert_eq!(retry_after(s(0)), s(5), "the first retry comes quickly");
        assert_eq!(retry_after(s(7)), s(5));
        assert_eq!(retry_after(s(60)), s(30));
        assert_eq!(retry_after(s(600)), s(300), "half the time it has been failing");
        assert_eq!(retry_after(s(86_400)), s(1800), "at most every 30 min");
        assert_eq!(retry_after(s(86_400 * 365)), s(1800), "and still tried after a year");
        // A day of failures costs about 60 tries, not the 17 280 of a fixed 5 s.
        let (mut at, mut tries) = (Duration::ZERO, 0);
        while at < s(86_400) {
            at += retry_after(at);
            tries += 1;
        }
        assert!((50..=80).contains(&tries), "{tries} tries in a day");
    }
}
