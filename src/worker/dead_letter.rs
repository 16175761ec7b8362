//! Dead-lettering: a job given up on is copied to `sd.dlq.<model>` with why, by whom and after how many
//! deliveries in its headers. A copy that would not fit the server's `max_payload` keeps its headers and a
//! truncated body, and the whole job goes to the object store (docs/PROTOCOL.md, "Message sizes").

use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

use super::policy::Delivery;
use super::Shared;
use crate::protocol;

/// Why a job could not be dead-lettered.
pub(super) enum DeadLetterError {
    /// NATS is away: try again later (the job stays queued).
    Unavailable,
    /// The server refuses even the reduced copy (or the model is no subject token): retrying cannot help, so
    /// the job is reported and removed all the same.
    Refused,
}

/// Publishes `payload` (a job message, maybe undecodable) to `sd.dlq.<model>`, bytes unchanged when it fits
/// the server's `max_payload` with its headers. When it does not, the full bytes go to the object store
/// ([`dead_letter_key`]) and the copy carries a truncated body, with `Sd-Dlq-Original-Bytes` and, when the
/// store took them, `Sd-Dlq-Body-Key` (docs/PROTOCOL.md).
pub(super) async fn dead_letter_payload(
    shared: &Shared,
    model: &str,
    payload: Bytes,
    job_id: Option<Uuid>,
    reason: &str,
    delivered: Delivery,
) -> Result<(), DeadLetterError> {
    // A model name that is not a subject token never reached a consumer: it cannot be dead-lettered.
    let Ok(subject) = shared.subjects.dead_letter(model) else { return Err(DeadLetterError::Refused) };
    let seq = delivered.seq;
    let msg_id = job_id.map_or_else(|| format!("seq-{seq}"), |id| id.to_string());
    let mut headers = crate::bus::msg_id_headers(&msg_id);
    // Header values are one line.
    let reason_line: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).take(1000).collect();
    headers.insert(protocol::DLQ_REASON_HEADER, reason_line.as_str());
    headers.insert("Sd-Dlq-Deliveries", delivered.n.to_string().as_str());
    headers.insert("Sd-Dlq-Worker", shared.worker_id.as_str());
    headers.insert("Sd-Dlq-Stream-Seq", seq.to_string().as_str());
    let max = shared.js.client().max_payload();
    let mut body = payload.clone();
    if max > 0 && crate::bus::wire_size(&headers, payload.len()) > max {
        let key = dead_letter_key(job_id, seq);
        let stored = tokio::time::timeout(
            Duration::from_secs(10),
            shared.store.put(&key, payload.clone(), "application/msgpack"),
        )
        .await;
        match stored {
            Ok(Ok(())) => headers.insert(protocol::DLQ_BODY_KEY_HEADER, key.as_str()),
            Ok(Err(e)) => tracing::warn!(?job_id, error = %e, "cannot keep the oversized job in the store"),
            Err(_) => tracing::warn!(?job_id, "the store is slow; the oversized job is kept truncated only"),
        }
        headers.insert(protocol::DLQ_ORIGINAL_BYTES_HEADER, payload.len().to_string().as_str());
        let room = max.saturating_sub(crate::bus::wire_size(&headers, 0));
        body = payload.slice(..room.min(payload.len()));
    }
    let patience = shared.config.publish_patience;
    match crate::bus::publish_persistent(&shared.js, subject, headers, body, patience).await {
        Ok(_) => Ok(()),
        Err(e @ crate::bus::PublishError::TooLarge { .. }) => {
            tracing::error!(?job_id, error = %e, "cannot dead-letter the job");
            Err(DeadLetterError::Refused)
        }
        Err(e) => {
            tracing::error!(?job_id, error = %e, "cannot dead-letter the job");
            Err(DeadLetterError::Unavailable)
        }
    }
}

/// Where the full bytes of a job too large for a dead-letter copy are kept.
pub fn dead_letter_key(job_id: Option<Uuid>, stream_seq: u64) -> String {
    match job_id {
        Some(id) => format!("{}{id}-{stream_seq}.msgpack", protocol::DEAD_LETTERS_PREFIX),
        None => format!("{}seq-{stream_seq}.msgpack", protocol::DEAD_LETTERS_PREFIX),
    }
}
