//! Protocol errors ([`ErrorCode`], [`ProtocolError`]) and the helpers that keep error messages short.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a job failed; on the wire in SCREAMING_SNAKE_CASE. A code this build does not know decodes as
/// [`ErrorCode::Internal`], so new codes can be added without a version bump.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema, strum::IntoStaticStr)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[strum(serialize_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The job (or a message) is malformed or breaks a limit; retrying it unchanged will fail again.
    InvalidRequest,
    /// The worker cannot load or does not serve the model.
    ModelUnavailable,
    /// The device ran out of memory.
    OutOfMemory,
    /// The job's deadline passed.
    Timeout,
    /// The job was cancelled.
    Cancelled,
    /// Reading inputs from or writing results to the object store failed.
    Storage,
    /// Anything else.
    #[serde(other)]
    Internal,
}

impl ErrorCode {
    /// The wire name, e.g. `INVALID_REQUEST`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A protocol error: a message that cannot be decoded, a version this build does not speak, a job that
/// breaks a rule, or a bad subject token. `message` is complete on its own (it names the field);
/// `field` names the offending field for machines, when there is one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub field: Option<String>,
    pub message: String,
}

impl ProtocolError {
    /// An `INVALID_REQUEST` error about `field`; the message is prefixed with the field name. Both are cut
    /// to [`MAX_ERROR_MESSAGE_BYTES`]: the message travels in a `failed` event.
    pub fn invalid(field: &str, message: impl fmt::Display) -> Self {
        let field = truncate(field, MAX_FIELD_NAME_BYTES);
        let mut message = format!("`{field}` {message}");
        cut(&mut message, MAX_ERROR_MESSAGE_BYTES);
        Self { code: ErrorCode::InvalidRequest, field: Some(field.to_string()), message }
    }

    /// An `INVALID_REQUEST` error about a whole message (it cannot be decoded); cut like [`Self::invalid`].
    pub fn malformed(message: impl Into<String>) -> Self {
        let mut message = message.into();
        cut(&mut message, MAX_ERROR_MESSAGE_BYTES);
        Self { code: ErrorCode::InvalidRequest, field: None, message }
    }
}

/// The most bytes of an error message ([`ProtocolError`], the `failed` event): a decoder's message can
/// quote what it could not read, and a hostile value must not make the report itself too big to publish.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// The most bytes of a field name in an error (field names come from decoders too).
pub(super) const MAX_FIELD_NAME_BYTES: usize = 128;

/// The most characters of a value quoted back in an error ([`quoted`]).
pub const MAX_ECHO_CHARS: usize = 48;

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
pub fn cut(text: &mut String, max: usize) {
    let end = truncate(text, max).len();
    text.truncate(end);
}

/// A value quoted back in an error message: `"..."` (Rust escapes), its first [`MAX_ECHO_CHARS`]
/// characters only, and its length when it was cut. Whatever a client sent, the message stays short.
pub fn quoted(value: &str) -> String {
    let count = value.chars().count();
    if count <= MAX_ECHO_CHARS {
        return format!("{value:?}");
    }
    let head: String = value.chars().take(MAX_ECHO_CHARS).collect();
    format!("{head:?}… ({} bytes)", value.len())
}
