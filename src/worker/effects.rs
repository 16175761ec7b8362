//! The side effects of handling a job: publishing its events, settling its message, queueing it again,
//! and [`carry_out`], which does what a [`Plan`] says in the order it says.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use uuid::Uuid;

use super::dead_letter::{dead_letter_payload, DeadLetterError};
use super::policy::{Counter, Delivery, Plan, Settle};
use super::Shared;
use crate::protocol::{self, manifest_key, Completed, Event};

/// The message a plan settles: one delivered to this worker, or one JetStream no longer delivers (read
/// from the stream by its sequence, after a max-deliveries advisory), which ack and term delete.
pub(super) enum Target<'a> {
    Delivered(&'a jetstream::Message),
    Stored { stream: &'a jetstream::stream::Stream, seq: u64, payload: Bytes },
}

impl Target<'_> {
    fn payload(&self) -> Bytes {
        match self {
            Target::Delivered(msg) => msg.payload.clone(),
            Target::Stored { payload, .. } => payload.clone(),
        }
    }

    /// Settles the message. Returns whether it is dealt with: false after a nak (for a stored message: not
    /// handled, the caller tries again later).
    async fn settle(&self, settle: Settle) -> bool {
        match self {
            Target::Delivered(msg) => {
                let kind = match settle {
                    Settle::Ack => AckKind::Ack,
                    Settle::Term => AckKind::Term,
                    Settle::Nak(delay) => AckKind::Nak(delay),
                };
                settle_message(msg, kind).await;
            }
            Target::Stored { stream, seq, .. } => {
                if !matches!(settle, Settle::Nak(_)) {
                    // Not tried again: the job is reported, and another try would report it (and dead-letter
                    // it) again. Left on the work queue, its deliveries spent, it is only counted there.
                    if let Err(e) = stream.delete_message(*seq).await {
                        tracing::warn!(stream_seq = seq, error = %e, "cannot delete an undeliverable job's message");
                    }
                }
            }
        }
        !matches!(settle, Settle::Nak(_))
    }
}

/// Does what `plan` says: dead-letter, requeue, publish the event, count, settle. Returns whether the
/// message was dealt with (false: it is left for a later delivery or try).
pub(super) async fn carry_out(
    shared: &Shared,
    model: &str,
    target: Target<'_>,
    plan: Plan,
    delivered: Delivery,
) -> bool {
    if let Some(reason) = &plan.dead_letter {
        let copied = dead_letter_payload(shared, model, target.payload(), plan.job_id, reason, delivered).await;
        if let Err(DeadLetterError::Unavailable) = copied {
            restore_streams(shared).await;
            return target.settle(plan.fallback).await;
        }
    }
    if plan.requeue {
        if let (Target::Delivered(msg), Some(job_id)) = (&target, plan.job_id) {
            match requeue(shared, msg, job_id, delivered).await {
                Ok(seq) => tracing::warn!(%job_id, seq, "shutting down on the job's last delivery: queued again"),
                Err(e) => {
                    tracing::error!(%job_id, error = %e, "cannot queue the job again; handing it back");
                    return target.settle(plan.fallback).await;
                }
            }
        }
    }
    if let Some(event) = &plan.event {
        let stored = publish_event(shared, event, delivered).await;
        if !stored {
            // Nobody was told: the message comes back and the redelivery reports again.
            restore_streams(shared).await;
            return false;
        }
    }
    match plan.counter {
        Some(Counter::Done) => shared.control.jobs_done.fetch_add(1, Ordering::Relaxed),
        Some(Counter::Failed) => shared.control.jobs_failed.fetch_add(1, Ordering::Relaxed),
        None => 0,
    };
    target.settle(plan.settle).await
}

/// After a publish that JetStream did not store for the whole publish patience: makes the streams again
/// where one is gone (deleted under the fleet, or a NATS that lost its store), so that the next try of the
/// message can be stored; nothing else makes them again while the job consumers still work. With NATS away
/// this fails, quietly: it is away for everything else too.
async fn restore_streams(shared: &Shared) {
    let ensure = crate::bus::ensure_streams(&shared.js, &shared.subjects, &shared.config.streams);
    match tokio::time::timeout(std::time::Duration::from_secs(10), ensure).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %format!("{e:#}"), "cannot make the streams again"),
        Err(_) => tracing::debug!("NATS is slow to make the streams again"),
    }
}

/// The `completed` event an earlier delivery of the job stored beside its images, if there is one (and it names
/// only the job's own images: anything else is generated again rather than reported).
pub(super) async fn previous_result(shared: &Shared, job_id: Uuid) -> anyhow::Result<Option<Completed>> {
    let own = |c: &Completed| c.job_id == job_id && c.foreign_image().is_none();
    Ok(read_completed(shared, &manifest_key(job_id)).await?.filter(own))
}

/// Stores `completed` at `key` (MessagePack, as on the bus): a job's manifest, or a result cache entry.
pub(super) async fn store_completed(
    shared: &Shared,
    key: &str,
    completed: &Completed,
) -> Result<(), crate::storage::StoreError> {
    let bytes = protocol::encode(&Event::Completed(completed.clone()));
    shared.store.put(key, bytes::Bytes::from(bytes), "application/msgpack").await
}

/// The `completed` event stored at `key`; `None` when there is none, or it does not decode (it is then
/// written again).
pub(super) async fn read_completed(shared: &Shared, key: &str) -> anyhow::Result<Option<Completed>> {
    match shared.store.get(key).await {
        Ok(bytes) => match protocol::decode_event(&bytes) {
            Ok(Event::Completed(c)) => Ok(Some(c)),
            _ => {
                tracing::warn!(key, "an unreadable completed event in the store; regenerating");
                Ok(None)
            }
        },
        Err(e) if e.is_missing() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Publishes an event on the job's subject (persisted in the events stream), retrying while the server is
/// away. Returns whether it was stored. The message id makes a retried publish a single event. An event too
/// big for the server is sent smaller (a progress event without its preview, a failure with a shorter
/// message), never retried as it is.
pub(super) async fn publish_event(shared: &Shared, event: &Event, delivered: Delivery) -> bool {
    let job_id = event.job_id();
    let msg_id = match event {
        Event::Progress(p) if p.phase.is_some() => format!("{job_id}:{}.{}:loading", delivered.seq, delivered.n),
        Event::Progress(p) => format!("{job_id}:{}.{}:progress:{}", delivered.seq, delivered.n, p.step),
        other => format!("{job_id}:{}.{}:{}", delivered.seq, delivered.n, other.type_name()),
    };
    // Progress is worth little once late; the terminal events are worth waiting for.
    let patience =
        if matches!(event, Event::Progress(_)) { Duration::from_secs(2) } else { shared.config.publish_patience };
    let subject = shared.subjects.events(job_id);
    let mut event = Cow::Borrowed(event);
    loop {
        let headers = crate::bus::msg_id_headers(&msg_id);
        let payload = protocol::encode(event.as_ref()).into();
        match crate::bus::publish_persistent(&shared.js, subject.clone(), headers, payload, patience).await {
            Ok(_) => return true,
            Err(e @ crate::bus::PublishError::TooLarge { .. }) => match smaller_event(&event) {
                Some(smaller) => {
                    tracing::warn!(%job_id, event = event.type_name(), error = %e, "event too large; sending it smaller");
                    event = Cow::Owned(smaller);
                }
                None => {
                    tracing::error!(%job_id, event = event.type_name(), error = %e, "cannot publish event");
                    return false;
                }
            },
            Err(e) => {
                tracing::error!(%job_id, event = event.type_name(), error = %e, "cannot publish event");
                return false;
            }
        }
    }
}

/// The same event with less in it, when there is less to send: a progress event without its preview, a
/// failure with a short message. `None` when nothing more can go.
fn smaller_event(event: &Event) -> Option<Event> {
    const SHORT: usize = 200;
    match event {
        Event::Progress(p) if p.preview_jpeg.is_some() => {
            Some(Event::Progress(protocol::Progress { preview_jpeg: None, ..p.clone() }))
        }
        Event::Failed(f) if f.message.len() > SHORT || f.field.as_ref().is_some_and(|x| x.len() > SHORT) => {
            let mut f = f.clone();
            f.message = protocol::truncate(&f.message, SHORT).to_string();
            f.field = f.field.map(|x| protocol::truncate(&x, SHORT).to_string());
            Some(Event::Failed(f))
        }
        _ => None,
    }
}

/// Publishes the job's message again, bytes unchanged, as a new message of the work queue (at its end, with
/// fresh deliveries), for a job handed back on its last delivery. Returns the new message's sequence.
async fn requeue(shared: &Shared, msg: &jetstream::Message, job_id: Uuid, delivered: Delivery) -> anyhow::Result<u64> {
    let headers = crate::bus::msg_id_headers(&crate::bus::requeue_msg_id(job_id, delivered.seq));
    let subject = msg.subject.to_string();
    let ack = crate::bus::publish_persistent(
        &shared.js,
        subject,
        headers,
        msg.payload.clone(),
        shared.config.publish_patience,
    )
    .await?;
    Ok(ack.sequence)
}

/// Acks, terms or naks a delivered message.
async fn settle_message(msg: &jetstream::Message, kind: AckKind) {
    let what = format!("{kind:?}");
    // A nak may as well be lost: the message comes back after ack_wait either way.
    if !matches!(kind, AckKind::Ack | AckKind::Term) {
        if let Err(e) = msg.ack_with(kind).await {
            tracing::warn!(ack = what, error = %e, "cannot settle the message; it will be redelivered");
        }
        return;
    }
    // Acks and terms that end a job are confirmed by the server, and retried: a lost one sends the job round
    // again (a lost term after a requeue would even see the old message given up while its copy runs).
    for attempt in 1..=3u32 {
        match msg.double_ack_with(kind).await {
            Ok(()) => return,
            Err(e) if attempt < 3 => {
                tracing::warn!(ack = what, attempt, error = %e, "cannot settle the message; retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            Err(e) => tracing::warn!(ack = what, error = %e, "cannot settle the message; it will be redelivered"),
        }
    }
}
