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

/// Decodes one whole MessagePack value; bytes after it are an error.
fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut de = rmp_serde::Deserializer::new(Cursor::new(bytes));
    let value = T::deserialize(&mut de).map_err(|e| e.to_string())?;
    let used = de.position() as usize;
    if used != bytes.len() {
        return Err(format!("{} unexpected bytes after the message", bytes.len() - used));
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
    decode_exact(bytes).map_err(|e| ProtocolError::malformed(format!("cannot decode {what}: {e}")))
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
        #[serde(default)]
        id: Option<String>,
    }
    if !bytes.first().is_some_and(|&b| is_map_marker(b)) {
        return None;
    }
    let peek: IdOnly = rmp_serde::from_slice(bytes).ok()?;
    Uuid::parse_str(&peek.id?).ok()
}
