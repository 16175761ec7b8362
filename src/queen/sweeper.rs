//! The expiry sweeper: takes each job of the schedule (`expiry.rs`) when it expires, stops it if it still
//! runs, deletes its images, manifest and checkpoint, and leaves its status record as a tombstone. The
//! queens share its consumer, so each expiry is swept once, by whichever queen is up.

use std::time::Duration;

use async_nats::jetstream::AckKind;
use uuid::Uuid;

use super::expiry::Due;
use super::jobs::Jobs;
use crate::api::JobStatus;
use crate::bus;
use crate::protocol;

/// The longest a job not yet due waits before it is looked at again.
const MAX_WAIT: Duration = Duration::from_secs(3600);
/// When a job stopped at its expiry is swept again, and how many passes it gets.
const SECOND_LOOK: Duration = Duration::from_secs(30);
const SWEEP_PASSES: i64 = 3;

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
            Ok(due) => due,
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
            let pass = msg.info().map(|i| i.delivered).unwrap_or(1);
            match sweep(jobs, due.job_id, due.expires_at).await {
                // A job that had not ended was stopped: a worker finishing its upload just now may still write
                // objects, so look again a little later.
                Ok(false) if pass < SWEEP_PASSES => AckKind::Nak(Some(SECOND_LOOK)),
                Ok(_) => AckKind::Ack,
                Err(e) => {
                    tracing::warn!(job_id = %due.job_id, error = %format!("{e:#}"), "cannot sweep an expired job yet");
                    AckKind::Nak(Some(Duration::from_secs(5)))
                }
            }
        };
        msg.ack_with(ack).await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
    }
}

/// Stops job `job_id` if it still runs, deletes its objects and leaves its record as a tombstone. Returns
/// whether the job had ended before.
async fn sweep(jobs: &Jobs, job_id: Uuid, expires_at: u64) -> anyhow::Result<bool> {
    let record = jobs.status.get(job_id).await?;
    if let Some(status) = record.as_ref().filter(|s| !s.state.is_terminal()) {
        // Its worker stops it at its expiry too; a queued one leaves the queue.
        if let Err(e) = jobs.cancel_record(status.clone()).await {
            tracing::warn!(%job_id, error = %e, "cannot stop an expired job");
        }
    }
    let prefix = protocol::result_prefix(job_id);
    for name in jobs.store.list(&prefix, 10_000).await? {
        jobs.store.delete(&format!("{prefix}{name}")).await?;
    }
    jobs.store.delete(&protocol::resume_key(job_id)).await?;
    let tombstone = |s: &mut JobStatus| {
        s.expire();
        s.expires_at = Some(s.expires_at.map_or(expires_at, |e| e.min(expires_at)));
        true
    };
    if record.is_some() {
        jobs.status.update(job_id, || JobStatus::unknown(job_id, expires_at), tombstone).await?;
    }
    tracing::info!(%job_id, "expired job swept");
    Ok(record.as_ref().is_none_or(|s| s.state.is_terminal()))
}
