//! The MessagePack codec: [`encode`], the `decode_*` functions (shape and version first, then the whole
//! message), and [`peek_job_id`] for jobs that do not decode.

use std::io::Cursor;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::ProtocolError;
use super::events::{CancelRequest, Event, Heartbeat};
use super::job::JobRequest;
use super::PROTOCOL_VERSION;

/// Encodes a message as MessagePack with named fields.
///
/// # Panics
/// Only if `T`'s `Serialize` implementation fails, which none of this module's types do.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("protocol messages always serialize")
}

fn is_map_marker(b: u8) -> bool {
    (0x80..=0x8f).contains(&b) || b == 0xde || b == 0xdf
}

/// Why a message did not decode: the decoder's words, and the field they are about (`output.quality`,
/// `loras[0].scale`) when it is one.
struct Undecodable {
    field: Option<String>,
    message: String,
}

/// Decodes one whole MessagePack value; bytes after it are an error.
fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Undecodable> {
    let mut de = rmp_serde::Deserializer::new(Cursor::new(bytes));
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // `.` is the whole message, `?` a place the decoder could not name.
        let path = Some(e.path().to_string()).filter(|p| p != "." && p != "?");
        let message = e.into_inner().to_string();
        // A missing field is reported at the map that lacks it: name the field itself.
        let missing = message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next());
        let field = match (path, missing) {
            (Some(path), Some(name)) => Some(format!("{path}.{name}")),
            (None, Some(name)) => Some(name.to_string()),
            (path, None) => path,
        };
        Undecodable { field, message }
    })?;
    let used = de.position() as usize;
    if used != bytes.len() {
        let message = format!("{} unexpected bytes after the message", bytes.len() - used);
        return Err(Undecodable { field: None, message });
    }
    Ok(value)
}

/// Checks a message's shape and version, then decodes it.
fn decode_versioned<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ProtocolError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        #[serde(default)]
        v: Option<u32>,
    }
    match bytes.first() {
        None => return Err(ProtocolError::malformed(format!("cannot decode {what}: empty message"))),
        Some(&b) if !is_map_marker(b) => {
            return Err(ProtocolError::malformed(format!(
                "cannot decode {what}: not a MessagePack map (first byte 0x{b:02x})"
            )))
        }
        Some(_) => {}
    }
    let peek: VersionOnly =
        rmp_serde::from_slice(bytes).map_err(|e| ProtocolError::malformed(format!("cannot decode {what}: {e}")))?;
    match peek.v {
        None => return Err(ProtocolError::invalid("v", format!("(protocol version) is missing from the {what}"))),
        Some(v) if v != PROTOCOL_VERSION => {
            return Err(ProtocolError::invalid(
                "v",
                format!(
                    "is protocol version {v}, which this build does not support (it speaks version {PROTOCOL_VERSION})"
                ),
            ))
        }
        Some(_) => {}
    }
    decode_exact(bytes).map_err(|e| match e.field {
        Some(field) => {
            // A field may be a key the sender made up, of any length.
            let field = super::error::truncate(&field, super::error::MAX_FIELD_NAME_BYTES);
            let mut error = ProtocolError::malformed(format!("cannot decode {what}: `{field}`: {}", e.message));
            error.field = Some(field.to_string());
            error
        }
        None => ProtocolError::malformed(format!("cannot decode {what}: {}", e.message)),
    })
}

/// Decodes a job: checks the version first (a newer or unknown one is `INVALID_REQUEST` naming it), then
/// the whole message. Does not [`validate`](JobRequest::validate) it.
pub fn decode_job(bytes: &[u8]) -> Result<JobRequest, ProtocolError> {
    decode_versioned(bytes, "job")
}

/// Decodes an event, with a progress event's percent made one every reader can keep
/// ([`Progress::checked_percent`](super::Progress::checked_percent)).
pub fn decode_event(bytes: &[u8]) -> Result<Event, ProtocolError> {
    let mut event = decode_versioned(bytes, "event")?;
    if let Event::Progress(p) = &mut event {
        p.percent = p.checked_percent();
    }
    Ok(event)
}

/// Decodes an event stored or published on job `job_id`'s subject: one about another job is refused, as
/// anyone on the bus can publish on any job's subject, and readers of one job's events (its feed, a compat
/// reply's images, the queen's check of a dequeued job) would take it for this job's.
pub fn decode_event_of(job_id: Uuid, bytes: &[u8]) -> Result<Event, ProtocolError> {
    let event = decode_event(bytes)?;
    if event.job_id() != job_id {
        return Err(ProtocolError::malformed(format!(
            "an event of job {} on the subject of job {job_id}",
            event.job_id()
        )));
    }
    Ok(event)
}

/// Decodes a heartbeat.
pub fn decode_heartbeat(bytes: &[u8]) -> Result<Heartbeat, ProtocolError> {
    decode_versioned(bytes, "heartbeat")
}

/// Decodes a cancel request.
pub fn decode_cancel(bytes: &[u8]) -> Result<CancelRequest, ProtocolError> {
    decode_versioned(bytes, "cancel request")
}

/// The `id` of a job message that may not decode (unknown version, bad field), so that a worker can
/// still publish `failed` for it. `None` when there is no readable id.
pub fn peek_job_id(bytes: &[u8]) -> Option<Uuid> {
    #[derive(Deserialize)]
    struct IdOnly {
        // As the job reads it: a string, or 16 raw bytes.
        #[serde(default, deserialize_with = "some_uuid")]
        id: Option<Uuid>,
    }
    fn some_uuid<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Uuid>, D::Error> {
        super::serde_util::uuid_str::deserialize(d).map(Some)
    }
    if !bytes.first().is_some_and(|&b| is_map_marker(b)) {
        return None;
    }
    rmp_serde::from_slice::<IdOnly>(bytes).ok()?.id
}
