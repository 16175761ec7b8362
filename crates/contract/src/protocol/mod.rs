//! The bus protocol between the queen (control plane) and the generation workers: the job message, the
//! events a worker publishes about a job, worker heartbeats and cancel requests, the NATS subjects and
//! JetStream stream names they travel on, the object-store key layout of results, and the MessagePack codec.
//!
//! Every message is a MessagePack map with named fields (`rmp_serde::to_vec_named`), so fields can be added
//! and unknown fields are ignored. Every message carries the protocol version `v`; a decoder rejects a version
//! it does not know with an error naming it. Byte payloads (inline images, previews) are MessagePack `bin`.
//! UUIDs are canonical lower-case hyphenated strings. Timestamps are unix milliseconds.
//!
//! This module knows nothing about Candle: scheduler and timestep-spacing names stay strings here, checked
//! against [`SCHEDULERS`] and [`TIMESTEP_SPACINGS`] (the names the CLI and the core accept; they, the image
//! formats, resize modes and job defaults live in [`crate::vocab`] and are re-exported here).
//! `docs/PROTOCOL.md` describes the protocol for other implementations.
//!
//! # Layout
//!
//! - this file: the protocol-wide constants (version, headers, stream defaults, limits) and [`now_millis`];
//! - `error`: [`ErrorCode`], [`ProtocolError`] and the helpers that keep messages short ([`quoted`]);
//! - `job`: the job message, [`JobRequest`], and its parts ([`JobKind`], [`ImageSource`], [`OutputFormat`],
//!   [`LoraRef`]);
//! - `validate`: [`JobRequest::validate`], [`Limits`], and the object-key and LoRA-name checks;
//! - `events`: [`Event`] and its variants, [`Heartbeat`], [`CancelRequest`];
//! - `codec`: [`encode`], the `decode_*` functions, [`peek_job_id`];
//! - `subjects`: [`Subjects`] and the subject-token checks;
//! - `keys`: the result keys ([`result_key`], [`parse_result_key`]);
//! - `cache`: what decides a job's pixels, the result cache's key ([`cache_description`], [`cache_key`]);
//! - `strict` and `serde_util`: the serde helpers behind the exact wire shapes.

use std::time::{SystemTime, UNIX_EPOCH};

mod cache;
mod codec;
mod error;
mod events;
mod job;
mod keys;
mod serde_util;
mod strict;
mod subjects;
#[cfg(test)]
mod tests;
mod validate;

pub use crate::vocab::{
    ImageFormat, DEFAULT_IMG2IMG_STRENGTH, DEFAULT_INPAINT_STRENGTH, DEFAULT_MASK_BLUR, SCHEDULERS, TIMESTEP_SPACINGS,
};
pub use cache::{cache_description, cache_key, CacheContext};
pub use codec::{decode_cancel, decode_event, decode_event_of, decode_heartbeat, decode_job, encode, peek_job_id};
pub use error::{cut, quoted, truncate, ErrorCode, ProtocolError, MAX_ECHO_CHARS, MAX_ERROR_MESSAGE_BYTES};
pub use events::{
    Accepted, CancelRequest, Cancelled, Completed, Event, Failed, Heartbeat, ImageResult, JobPhase, Progress, Timings,
    WorkerState, MAX_WARNINGS, MAX_WARNING_BYTES,
};
pub use job::{
    ImageSource, JobKind, JobRequest, LoraRef, OutputFormat, MAX_HEARTBEAT_LORAS, MAX_LORAS_PER_JOB, MAX_LORA_SCALE,
};
pub use keys::{is_result_of, manifest_key, parse_result_key, result_key, result_prefix, resume_key, ResultKey};
pub use subjects::{validate_model_name, validate_subject_token, validate_worker_id, Subjects};
pub use validate::{
    uploads_prefix, validate_lora_name, validate_object_key, validate_tenant, Limits, MAX_TENANT_BYTES,
};

/// How an init image (and mask) of another size is brought to the job's width × height (`fit`, `stretch`,
/// `pad`; the CLI's `--resize` uses the same type).
pub use crate::vocab::ResizeMode;

/// The protocol version this build speaks and writes.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest inline image (an init image or a mask) a job may carry: 8 MiB. Larger images go to the
/// object store and travel as an [`ImageSource::ObjectKey`]. (NATS' default `max_payload` is 1 MiB: a fleet
/// that sends inline images must raise it, or keep inline images small.)
pub const MAX_INLINE_IMAGE_BYTES: usize = 8 * 1024 * 1024;

/// The most characters in a subject token (model name, worker id) and in each token of a subject prefix.
pub const MAX_TOKEN_CHARS: usize = 128;

/// The most bytes in an object key given as an image source (S3's own limit).
pub const MAX_OBJECT_KEY_BYTES: usize = 1024;

/// The most bytes in one `/`-separated segment of such a key (a file name on a file store).
pub const MAX_KEY_SEGMENT_BYTES: usize = 255;

/// The most bytes in a client-supplied idempotency key.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// The default subject prefix.
pub const DEFAULT_PREFIX: &str = "sd";

/// The JetStream de-duplication header; a job is published with its id as the value ([`JobRequest::msg_id`]).
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// The header a message copied to the dead-letter stream carries: why it was given up on.
pub const DLQ_REASON_HEADER: &str = "Sd-Dlq-Reason";

/// On a dead-letter copy whose job was too large to copy whole: the job's size in bytes (the body is then
/// its first bytes only).
pub const DLQ_ORIGINAL_BYTES_HEADER: &str = "Sd-Dlq-Original-Bytes";

/// ... and the object key where the whole job was kept, when the store took it.
pub const DLQ_BODY_KEY_HEADER: &str = "Sd-Dlq-Body-Key";

/// The object-store prefix of whole jobs too large for their dead-letter copy.
pub const DEAD_LETTERS_PREFIX: &str = "dead-letters/";

/// The default JetStream duplicate window of the jobs stream, in seconds.
pub const JOBS_DUPLICATE_WINDOW_SECS: u64 = 120;

/// The default number of deliveries of a job before a worker gives up on it and dead-letters it.
pub const JOBS_MAX_DELIVER: u32 = 3;

/// The default maximum age of messages in the events stream, in seconds (24 hours).
pub const EVENTS_MAX_AGE_SECS: u64 = 24 * 60 * 60;

/// The default maximum age of messages in the dead-letter stream, in seconds (7 days).
pub const DLQ_MAX_AGE_SECS: u64 = 7 * 24 * 60 * 60;

/// How often a worker publishes a heartbeat, in seconds; the queen treats a worker silent for three
/// intervals as gone.
pub const HEARTBEAT_INTERVAL_SECS: u64 = 10;

/// The object-store prefix under which results are written.
pub const RESULTS_PREFIX: &str = "jobs/";

/// The current time in unix milliseconds (0 if the clock is before 1970).
pub fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
