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
//! against [`SCHEDULERS`] and [`TIMESTEP_SPACINGS`] (the names the CLI and the core accept).
//! `docs/PROTOCOL.md` describes the protocol for other implementations.

use std::fmt;
use std::io::Cursor;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod strict;
use strict::WireNames;

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

/// Scheduler names, as on the CLI (`--scheduler`).
pub const SCHEDULERS: [&str; 6] = ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc"];

/// Timestep-spacing names, as on the CLI (`--timestep-spacing`).
pub const TIMESTEP_SPACINGS: [&str; 3] = ["leading", "linspace", "trailing"];

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

/// The default strength of an img2img job without one (diffusers' default).
pub const DEFAULT_IMG2IMG_STRENGTH: f64 = 0.8;

/// The default strength of an inpaint job without one (diffusers' default).
pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;

/// The default mask blur radius in pixels.
pub const DEFAULT_MASK_BLUR: u32 = 4;

/// The object-store prefix under which results are written.
pub const RESULTS_PREFIX: &str = "jobs/";

/// The current time in unix milliseconds (0 if the clock is before 1970).
pub fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------

/// Why a job failed; on the wire in SCREAMING_SNAKE_CASE. A code this build does not know decodes as
/// [`ErrorCode::Internal`], so new codes can be added without a version bump.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
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
        match self {
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::ModelUnavailable => "MODEL_UNAVAILABLE",
            ErrorCode::OutOfMemory => "OUT_OF_MEMORY",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::Cancelled => "CANCELLED",
            ErrorCode::Storage => "STORAGE",
            ErrorCode::Internal => "INTERNAL",
        }
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
const MAX_FIELD_NAME_BYTES: usize = 128;

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

// ---------------------------------------------------------------------------------------------------------
// Serde helpers
// ---------------------------------------------------------------------------------------------------------

/// UUIDs as canonical hyphenated strings on the wire, whatever the format's human-readability (rmp-serde
/// would otherwise write 16 raw bytes). Decoding also accepts 16 raw bytes.
mod uuid_str {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use uuid::Uuid;

    pub fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        struct UuidVisitor;
        impl Visitor<'_> for UuidVisitor {
            type Value = Uuid;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a UUID string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Uuid, E> {
                Uuid::parse_str(v).map_err(|e| E::custom(format!("invalid UUID {}: {e}", super::quoted(v))))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Uuid, E> {
                match std::str::from_utf8(v) {
                    Ok(s) if v.len() != 16 => self.visit_str(s),
                    _ => Uuid::from_slice(v).map_err(|e| E::custom(format!("invalid UUID bytes: {e}"))),
                }
            }
        }
        d.deserialize_str(UuidVisitor)
    }
}

fn default_num_images() -> u32 {
    1
}

fn default_mask_blur() -> u32 {
    DEFAULT_MASK_BLUR
}

fn default_true() -> bool {
    true
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

// ---------------------------------------------------------------------------------------------------------
// The job
// ---------------------------------------------------------------------------------------------------------

/// What a job makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Txt2Img,
    Img2Img,
    Inpaint,
}

impl JobKind {
    /// Whether the job starts from an init image.
    pub fn needs_init_image(self) -> bool {
        matches!(self, JobKind::Img2Img | JobKind::Inpaint)
    }
}

/// An input image: inline bytes (an encoded PNG/JPEG/WebP, at most [`Limits::max_inline_image_bytes`]) or
/// the key of an object in the fleet's bucket. On the wire: `{"inline": <bin>}` or `{"object_key": "..."}`.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageSource {
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    ObjectKey(String),
}

impl fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Inline(b) => write!(f, "Inline({} bytes)", b.len()),
            ImageSource::ObjectKey(k) => f.debug_tuple("ObjectKey").field(k).finish(),
        }
    }
}

impl ImageSource {
    fn validate(&self, field: &str, limits: &Limits) -> Result<(), ProtocolError> {
        match self {
            ImageSource::Inline(b) if b.is_empty() => Err(ProtocolError::invalid(field, "is an empty inline image")),
            ImageSource::Inline(b) if b.len() > limits.max_inline_image_bytes => Err(ProtocolError::invalid(
                field,
                format!(
                    "is an inline image of {} bytes, over the limit of {} bytes (upload it and send its object key)",
                    b.len(),
                    limits.max_inline_image_bytes
                ),
            )),
            ImageSource::Inline(_) => Ok(()),
            ImageSource::ObjectKey(k) => validate_object_key(field, k),
        }
    }
}

/// Checks an object key given as an image source, before any store sees it: 1 to [`MAX_OBJECT_KEY_BYTES`]
/// bytes of `/`-separated segments, none of them empty, `.` or `..`, none over [`MAX_KEY_SEGMENT_BYTES`] (a
/// file store keeps each as a file name), no control characters.
pub fn validate_object_key(field: &str, key: &str) -> Result<(), ProtocolError> {
    if key.is_empty() {
        return Err(ProtocolError::invalid(field, "has an empty object key"));
    }
    if key.len() > MAX_OBJECT_KEY_BYTES {
        return Err(ProtocolError::invalid(
            field,
            format!("has an object key of {} bytes, over {MAX_OBJECT_KEY_BYTES}", key.len()),
        ));
    }
    let problem = if key.chars().any(char::is_control) {
        Some("control characters")
    } else if key.starts_with('/') {
        Some("a leading '/'")
    } else if key.ends_with('/') {
        Some("a trailing '/'")
    } else if key.split('/').any(str::is_empty) {
        Some("an empty segment ('//')")
    } else if key.split('/').any(|s| s == "." || s == "..") {
        Some("a '.' or '..' segment")
    } else if key.split('/').any(|s| s.len() > MAX_KEY_SEGMENT_BYTES) {
        Some("a segment over 255 bytes")
    } else {
        None
    };
    match problem {
        Some(what) => {
            Err(ProtocolError::invalid(field, format!("has an invalid object key {}: it has {what}", quoted(key))))
        }
        None => Ok(()),
    }
}

impl WireNames for JobKind {
    const NAMES: &'static [&'static str] = &["txt2img", "img2img", "inpaint"];
}

impl WireNames for ResizeMode {
    const NAMES: &'static [&'static str] = &["fit", "stretch", "pad"];
}

impl WireNames for ImageFormat {
    const NAMES: &'static [&'static str] = &["png", "jpeg", "webp"];
}

/// How an init image (and mask) of another size is brought to the job's width × height (`fit`, `stretch`,
/// `pad`; the CLI's `--resize` uses the same type).
pub use crate::image_input::ResizeMode;

/// An encoded image format.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    /// From a file name's extension; PNG when it names none of these.
    pub fn from_path(path: &std::path::Path) -> Self {
        match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("jpg" | "jpeg") => ImageFormat::Jpeg,
            Some("webp") => ImageFormat::Webp,
            _ => ImageFormat::Png,
        }
    }

    /// The file extension of results: `png`, `jpg`, `webp`.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Webp => "webp",
        }
    }

    /// The MIME type.
    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }
}

/// How results are encoded. `quality` (1–100) is for JPEG and WebP only; `None`: the encoder's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFormat {
    #[serde(default, deserialize_with = "strict::by_name")]
    pub format: ImageFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u8>,
}

/// A generation job, published by the queen on [`Subjects::jobs`] and pulled by one worker.
///
/// Required on the wire: `v`, `id`, `kind`, `model`, `prompt`, `width`, `height`, `created_at`; every other
/// field has a default and may be left out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    pub v: u32,
    /// The job id: the de-duplication id, the events subject and the results prefix.
    #[serde(with = "uuid_str")]
    pub id: Uuid,
    #[serde(deserialize_with = "strict::by_name")]
    pub kind: JobKind,
    /// The short name of a model the fleet serves (a subject token).
    pub model: String,
    pub prompt: String,
    /// `None` and `Some("")` differ for SDXL (zero embeddings without a negative prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    /// Denoising steps; `None`: the model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale; `None`: the model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    /// One of [`SCHEDULERS`]; `None`: the model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// One of [`TIMESTEP_SPACINGS`]; `None`: the scheduler config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<String>,
    /// Image *i* uses seed + *i*; `None`: a random seed, reported in the results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default = "default_num_images")]
    pub num_images: u32,
    /// img2img and inpaint: the starting image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<ImageSource>,
    /// inpaint: white = repaint, black = keep (unless `invert_mask`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<ImageSource>,
    /// img2img and inpaint: how much of the init image is noised away, in (0, 1]; `None`:
    /// [`DEFAULT_IMG2IMG_STRENGTH`] or [`DEFAULT_INPAINT_STRENGTH`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// inpaint: Gaussian blur radius of the mask, in pixels.
    #[serde(default = "default_mask_blur")]
    pub mask_blur: u32,
    /// inpaint: swap the mask's black and white.
    #[serde(default, skip_serializing_if = "is_default")]
    pub invert_mask: bool,
    /// inpaint: paste the original pixels back outside the (blurred) mask.
    #[serde(default = "default_true")]
    pub paste_back: bool,
    /// img2img and inpaint: how an input of another size is resized.
    #[serde(default, skip_serializing_if = "is_default", deserialize_with = "strict::by_name")]
    pub resize_mode: ResizeMode,
    #[serde(default, deserialize_with = "strict::map_only")]
    pub output: OutputFormat,
    /// Unix milliseconds after which the job is worthless; a worker fails it with `TIMEOUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// The client's idempotency key (the queen maps it to one job id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// LoRAs to apply, by the names in the workers' catalogues, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraRef>,
    /// A1111's clip skip (1 = the text encoder's last layer); SD 1.x/2.x models only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_skip: Option<u32>,
    /// Unix milliseconds when the queen accepted the job.
    pub created_at: u64,
}

/// A LoRA a job applies: a catalogue name (never a path or URL) and its scale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoraRef {
    /// The LoRA's name in the workers' catalogue (`--lora-dir`): letters, digits, `_`, `-`, `.`.
    pub name: String,
    /// 1.0 as trained; negative values subtract it. At most [`MAX_LORA_SCALE`] either way.
    #[serde(default = "default_lora_scale")]
    pub scale: f64,
}

fn default_lora_scale() -> f64 {
    1.0
}

/// The largest scale a LoRA may be applied at (either sign); past this, weights are noise.
pub const MAX_LORA_SCALE: f64 = 100.0;

/// LoRA names a heartbeat lists (so it stays small whatever the catalogue holds).
pub const MAX_HEARTBEAT_LORAS: usize = 256;

/// LoRAs one job may name, whatever a deployment configures.
pub const MAX_LORAS_PER_JOB: usize = 64;

/// A LoRA name: a catalogue name, 1 to 128 bytes of letters, digits, `_`, `-` and `.`, not starting with `.`
/// and without `..` (so never a path; a trailing `.safetensors` is allowed and ignored); or a Hugging Face
/// reference `owner/name[/FILE.safetensors][@revision]` (at most 200 bytes, segments of the same characters,
/// none empty or starting with `.`), for workers that fetch LoRAs from the Hub.
pub fn validate_lora_name(field: &str, name: &str) -> Result<(), ProtocolError> {
    let (path, revision) = name.split_once('@').unwrap_or((name, ""));
    let plain = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && !s.contains("..")
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    let segments: Vec<&str> = path.split('/').collect();
    let ok = match segments.len() {
        1 => name.len() <= 128 && plain(name),
        2 | 3 => {
            name.len() <= 200
                && segments.iter().all(|s| plain(s))
                && (segments.len() == 2 || segments[2].ends_with(".safetensors"))
                && (!name.contains('@') || plain(revision))
        }
        _ => false,
    } && (segments.len() > 1 || !name.contains('@'));
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::invalid(
            field,
            format!(
                "is {}: a LoRA name is 1 to 128 letters, digits, `_`, `-` or `.` (a catalogue name, not a path), or a \
                 Hugging Face owner/name[/FILE.safetensors][@revision]",
                quoted(name)
            ),
        ))
    }
}

impl JobRequest {
    /// A job with a fresh id, created now, 512 × 512, every optional parameter at its default.
    pub fn new(kind: JobKind, model: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id: Uuid::new_v4(),
            kind,
            model: model.into(),
            prompt: prompt.into(),
            negative_prompt: None,
            width: 512,
            height: 512,
            steps: None,
            guidance: None,
            scheduler: None,
            timestep_spacing: None,
            seed: None,
            num_images: 1,
            init_image: None,
            mask: None,
            strength: None,
            mask_blur: DEFAULT_MASK_BLUR,
            invert_mask: false,
            paste_back: true,
            resize_mode: ResizeMode::Fit,
            output: OutputFormat::default(),
            deadline: None,
            idempotency_key: None,
            loras: Vec::new(),
            clip_skip: None,
            created_at: now_millis(),
        }
    }

    /// The `Nats-Msg-Id` header value: the job id.
    pub fn msg_id(&self) -> String {
        self.id.to_string()
    }

    /// The strength to use: the job's, or the kind's default; `None` for txt2img.
    pub fn strength_or_default(&self) -> Option<f64> {
        match self.kind {
            JobKind::Txt2Img => None,
            JobKind::Img2Img => Some(self.strength.unwrap_or(DEFAULT_IMG2IMG_STRENGTH)),
            JobKind::Inpaint => Some(self.strength.unwrap_or(DEFAULT_INPAINT_STRENGTH)),
        }
    }

    /// Whether the deadline has passed at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.deadline.is_some_and(|d| now_ms >= d)
    }

    /// Checks every rule of the protocol against `limits`; the first broken rule is the error
    /// (`INVALID_REQUEST`, with the field). Model-specific checks (steps against the scheduler's training
    /// steps, the model's latent scale) are the worker's.
    pub fn validate(&self, limits: &Limits) -> Result<(), ProtocolError> {
        use ProtocolError as E;
        if self.v != PROTOCOL_VERSION {
            return Err(E::invalid("v", format!("is protocol version {}, expected {PROTOCOL_VERSION}", self.v)));
        }
        if self.id.is_nil() {
            return Err(E::invalid("id", "must not be the nil UUID"));
        }
        validate_model_name(&self.model)?;
        if self.prompt.trim().is_empty() {
            return Err(E::invalid("prompt", "must not be empty"));
        }
        if self.prompt.len() > limits.max_prompt_bytes {
            return Err(E::invalid(
                "prompt",
                format!("is {} bytes, over the limit of {}", self.prompt.len(), limits.max_prompt_bytes),
            ));
        }
        if let Some(n) = &self.negative_prompt {
            if n.len() > limits.max_prompt_bytes {
                return Err(E::invalid(
                    "negative_prompt",
                    format!("is {} bytes, over the limit of {}", n.len(), limits.max_prompt_bytes),
                ));
            }
        }
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v % 8 != 0 {
                return Err(E::invalid(field, format!("must be a positive multiple of 8, got {v}")));
            }
            if v > limits.max_side {
                return Err(E::invalid(field, format!("must be at most {}, got {v}", limits.max_side)));
            }
        }
        let pixels = u64::from(self.width) * u64::from(self.height);
        if pixels > limits.max_pixels {
            return Err(E::invalid(
                "width",
                format!(
                    "× height is {} × {} = {pixels} pixels, over the limit of {}",
                    self.width, self.height, limits.max_pixels
                ),
            ));
        }
        if let Some(s) = self.steps {
            if s == 0 || s > limits.max_steps {
                return Err(E::invalid("steps", format!("must be between 1 and {}, got {s}", limits.max_steps)));
            }
        }
        if let Some(g) = self.guidance {
            if !g.is_finite() || g < 0.0 || g > limits.max_guidance {
                return Err(E::invalid("guidance", format!("must be between 0 and {}, got {g}", limits.max_guidance)));
            }
        }
        if let Some(s) = &self.scheduler {
            if !SCHEDULERS.contains(&s.as_str()) {
                return Err(E::invalid(
                    "scheduler",
                    format!("is {}, expected one of: {}", quoted(s), SCHEDULERS.join(", ")),
                ));
            }
        }
        if let Some(s) = &self.timestep_spacing {
            if !TIMESTEP_SPACINGS.contains(&s.as_str()) {
                return Err(E::invalid(
                    "timestep_spacing",
                    format!("is {}, expected one of: {}", quoted(s), TIMESTEP_SPACINGS.join(", ")),
                ));
            }
        }
        if self.num_images == 0 || self.num_images > limits.max_images {
            return Err(E::invalid(
                "num_images",
                format!("must be between 1 and {}, got {}", limits.max_images, self.num_images),
            ));
        }
        if let Some(seed) = self.seed {
            if seed.checked_add(u64::from(self.num_images) - 1).is_none() {
                return Err(E::invalid("seed", format!("+ num_images - 1 overflows 64 bits (seed {seed})")));
            }
        }
        match (&self.init_image, self.kind.needs_init_image()) {
            (None, true) => return Err(E::invalid("init_image", "is required for img2img and inpaint")),
            (Some(_), false) => return Err(E::invalid("init_image", "is only allowed for img2img and inpaint")),
            (Some(img), true) => img.validate("init_image", limits)?,
            (None, false) => {}
        }
        match (&self.mask, self.kind == JobKind::Inpaint) {
            (None, true) => return Err(E::invalid("mask", "is required for inpaint")),
            (Some(_), false) => return Err(E::invalid("mask", "is only allowed for inpaint")),
            (Some(img), true) => img.validate("mask", limits)?,
            (None, false) => {}
        }
        if let Some(s) = self.strength {
            if !self.kind.needs_init_image() {
                return Err(E::invalid("strength", "is only allowed for img2img and inpaint"));
            }
            if !(s > 0.0 && s <= 1.0) {
                return Err(E::invalid("strength", format!("must be in (0, 1], got {s}")));
            }
        }
        if self.mask_blur > limits.max_mask_blur {
            return Err(E::invalid(
                "mask_blur",
                format!("must be at most {}, got {}", limits.max_mask_blur, self.mask_blur),
            ));
        }
        if let Some(q) = self.output.quality {
            if self.output.format == ImageFormat::Png {
                return Err(E::invalid("output.quality", "is only allowed for jpeg and webp (png is lossless)"));
            }
            if q == 0 || q > 100 {
                return Err(E::invalid("output.quality", format!("must be between 1 and 100, got {q}")));
            }
        }
        if let Some(d) = self.deadline {
            if d <= self.created_at {
                return Err(E::invalid("deadline", format!("({d}) must be after created_at ({})", self.created_at)));
            }
        }
        if let Some(k) = &self.idempotency_key {
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES || k.chars().any(char::is_control) {
                return Err(E::invalid(
                    "idempotency_key",
                    format!("must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes without control characters"),
                ));
            }
        }
        if let Some(skip) = self.clip_skip {
            if skip == 0 || skip > 24 {
                return Err(E::invalid(
                    "clip_skip",
                    format!("must be between 1 and 24 (1 = the last layer), got {skip}"),
                ));
            }
        }
        let max_loras = limits.max_loras.min(MAX_LORAS_PER_JOB);
        if self.loras.len() > max_loras {
            return Err(E::invalid("loras", format!("has {} LoRAs, over the limit of {max_loras}", self.loras.len())));
        }
        for (i, lora) in self.loras.iter().enumerate() {
            validate_lora_name(&format!("loras[{i}].name"), &lora.name)?;
            if !lora.scale.is_finite() || lora.scale.abs() > MAX_LORA_SCALE {
                return Err(E::invalid(
                    &format!("loras[{i}].scale"),
                    format!("must be between -{MAX_LORA_SCALE} and {MAX_LORA_SCALE}, got {}", lora.scale),
                ));
            }
        }
        Ok(())
    }
}

/// The limits a job is validated against. Deserializable (every field defaults) so a deployment can
/// override some of them in its configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Bytes of the prompt, and of the negative prompt. Default 4096.
    pub max_prompt_bytes: usize,
    /// Width and height. Default 4096 (the core's own limit).
    pub max_side: u32,
    /// Width × height. Default 4,194,304 (2048 × 2048).
    pub max_pixels: u64,
    /// Denoising steps. Default 150.
    pub max_steps: u32,
    /// Guidance scale. Default 30.
    pub max_guidance: f64,
    /// Images per job. Default 8.
    pub max_images: u32,
    /// Bytes of one inline image. Default [`MAX_INLINE_IMAGE_BYTES`] (8 MiB).
    pub max_inline_image_bytes: usize,
    /// Mask blur radius in pixels. Default 64.
    pub max_mask_blur: u32,
    /// LoRAs in one job. Default 8 (never more than [`MAX_LORAS_PER_JOB`]).
    pub max_loras: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompt_bytes: 4096,
            max_side: 4096,
            max_pixels: 2048 * 2048,
            max_steps: 150,
            max_guidance: 30.0,
            max_images: 8,
            max_inline_image_bytes: MAX_INLINE_IMAGE_BYTES,
            max_mask_blur: 64,
            max_loras: 8,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Events, heartbeats, cancel requests
// ---------------------------------------------------------------------------------------------------------

/// Something that happened to a job, published by the worker on [`Subjects::events`]. On the wire a map
/// with `type` (`accepted`, `progress`, `completed`, `failed`, `cancelled`) next to the variant's fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Accepted(Accepted),
    Progress(Progress),
    Completed(Completed),
    Failed(Failed),
    Cancelled(Cancelled),
}

impl Event {
    /// The job the event is about.
    pub fn job_id(&self) -> Uuid {
        match self {
            Event::Accepted(e) => e.job_id,
            Event::Progress(e) => e.job_id,
            Event::Completed(e) => e.job_id,
            Event::Failed(e) => e.job_id,
            Event::Cancelled(e) => e.job_id,
        }
    }

    /// When it happened (unix milliseconds).
    pub fn at(&self) -> u64 {
        match self {
            Event::Accepted(e) => e.at,
            Event::Progress(e) => e.at,
            Event::Completed(e) => e.at,
            Event::Failed(e) => e.at,
            Event::Cancelled(e) => e.at,
        }
    }

    /// The `type` on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::Accepted(_) => "accepted",
            Event::Progress(_) => "progress",
            Event::Completed(_) => "completed",
            Event::Failed(_) => "failed",
            Event::Cancelled(_) => "cancelled",
        }
    }

    /// Whether this is the job's last event (completed, failed or cancelled).
    pub fn is_terminal(&self) -> bool {
        matches!(self, Event::Completed(_) | Event::Failed(_) | Event::Cancelled(_))
    }
}

/// A worker took the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub v: u32,
    #[serde(with = "uuid_str")]
    pub job_id: Uuid,
    pub at: u64,
    pub worker_id: String,
}

/// A denoising step finished.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub v: u32,
    #[serde(with = "uuid_str")]
    pub job_id: Uuid,
    pub at: u64,
    /// Denoising steps done (1-based), of `total`.
    pub step: u32,
    pub total: u32,
    /// 0–100.
    pub percent: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// A small JPEG of the current latents, when the worker makes previews.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub preview_jpeg: Option<Vec<u8>>,
    /// `loading` while the worker loads the model (step 0); absent while denoising.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
}

/// What a running job is doing, beside denoising.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    /// The model's weights are loading (the worker had it in its catalogue, not in memory).
    Loading,
}

impl Progress {
    /// A progress event at `at`, with `percent` computed from `step` and `total`.
    pub fn new(job_id: Uuid, step: u32, total: u32, at: u64) -> Self {
        let percent = if total == 0 { 0.0 } else { (100.0 * f64::from(step) / f64::from(total)).min(100.0) as f32 };
        Self { v: PROTOCOL_VERSION, job_id, at, step, total, percent, eta_ms: None, preview_jpeg: None, phase: None }
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progress")
            .field("v", &self.v)
            .field("job_id", &self.job_id)
            .field("at", &self.at)
            .field("step", &self.step)
            .field("total", &self.total)
            .field("percent", &self.percent)
            .field("eta_ms", &self.eta_ms)
            .field("preview_jpeg", &self.preview_jpeg.as_ref().map(|b| format!("{} bytes", b.len())))
            .finish()
    }
}

/// One stored result image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageResult {
    /// 0-based, in seed order.
    pub index: u32,
    /// The object key ([`result_key`]).
    pub key: String,
    /// A URL for it (e.g. presigned), when the worker makes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    /// Size of the stored object.
    pub bytes: u64,
    pub content_type: String,
}

/// Where the time went, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Timings {
    /// From `created_at` to the worker taking the job.
    pub queue_ms: u64,
    /// Part of `generation_ms`: merging the job's LoRAs into the weights (0 when they were in effect already).
    #[serde(default)]
    pub lora_ms: u64,
    /// Loading the model's weights first, when it was not resident (0 when it was).
    #[serde(default)]
    pub load_ms: u64,
    pub generation_ms: u64,
    pub upload_ms: u64,
    /// From `created_at` to completion.
    pub total_ms: u64,
}

/// The job's images are stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completed {
    pub v: u32,
    #[serde(with = "uuid_str")]
    pub job_id: Uuid,
    pub at: u64,
    pub images: Vec<ImageResult>,
    pub timings: Timings,
}

/// The job failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub v: u32,
    #[serde(with = "uuid_str")]
    pub job_id: Uuid,
    pub at: u64,
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl Failed {
    /// The failure of `job_id` for a protocol error (an undecodable or invalid job).
    pub fn from_error(job_id: Uuid, err: &ProtocolError, at: u64) -> Self {
        Self { v: PROTOCOL_VERSION, job_id, at, code: err.code, message: err.message.clone(), field: err.field.clone() }
    }
}

/// The job was cancelled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancelled {
    pub v: u32,
    #[serde(with = "uuid_str")]
    pub job_id: Uuid,
    pub at: u64,
    /// Steps done when it stopped; `None`: before generation started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_step: Option<u32>,
}

/// What a worker is doing. On the wire `{"status": "idle"}` or `{"status": "busy", "job_id": "..."}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum WorkerState {
    Idle,
    Busy {
        #[serde(with = "uuid_str")]
        job_id: Uuid,
    },
}

/// A worker's periodic sign of life, on [`Subjects::heartbeat`] every [`HEARTBEAT_INTERVAL_SECS`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Heartbeat {
    pub v: u32,
    pub at: u64,
    pub worker_id: String,
    pub hostname: String,
    /// E.g. `cuda:0 (NVIDIA H100 80GB HBM3)`.
    pub device: String,
    /// The models it serves (it consumes their job subjects).
    pub models: Vec<String>,
    /// The LoRAs jobs can name on this worker (its catalogue), at most [`MAX_HEARTBEAT_LORAS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<String>,
    /// Of `models`, those whose weights are in memory now (the others load when a job needs them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resident: Vec<String>,
    pub state: WorkerState,
    pub jobs_done: u64,
    pub jobs_failed: u64,
    pub uptime_s: u64,
    /// The worker's software version (the crate version).
    pub version: String,
}

/// Asks whoever runs `job_id` to stop, on [`Subjects::cancel`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub v: u32,
    #[serde(with = "uuid_str")]
    pub job_id: Uuid,
    pub at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

// ---------------------------------------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------------------------------------

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

/// Decodes an event.
pub fn decode_event(bytes: &[u8]) -> Result<Event, ProtocolError> {
    decode_versioned(bytes, "event")
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

// ---------------------------------------------------------------------------------------------------------
// Subjects and streams
// ---------------------------------------------------------------------------------------------------------

/// Checks that `value` can be one NATS subject token: non-empty, at most [`MAX_TOKEN_CHARS`] characters,
/// no `.`, `*`, `>`, whitespace or control characters. `field` names it in the error.
pub fn validate_subject_token(field: &str, value: &str) -> Result<(), ProtocolError> {
    if value.is_empty() {
        return Err(ProtocolError::invalid(field, "must not be empty"));
    }
    if value.chars().count() > MAX_TOKEN_CHARS {
        return Err(ProtocolError::invalid(field, format!("must be at most {MAX_TOKEN_CHARS} characters")));
    }
    if let Some(c) = value.chars().find(|&c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control()) {
        return Err(ProtocolError::invalid(
            field,
            format!(
                "{} contains {c:?}; a subject token has no '.', '*', '>', whitespace or control characters",
                quoted(value)
            ),
        ));
    }
    Ok(())
}

/// Checks a model name: a subject token that can also name a JetStream consumer (no `/` or `\\`).
pub fn validate_model_name(model: &str) -> Result<(), ProtocolError> {
    validate_subject_token("model", model)?;
    if let Some(c) = model.chars().find(|&c| matches!(c, '/' | '\\')) {
        return Err(ProtocolError::invalid(
            "model",
            format!("{} contains {c:?}; a model name has no '/' or '\\'", quoted(model)),
        ));
    }
    Ok(())
}

/// Checks a worker id (a subject token).
pub fn validate_worker_id(worker_id: &str) -> Result<(), ProtocolError> {
    validate_subject_token("worker_id", worker_id)
}

/// The subjects and stream names of one fleet, all under a prefix (default `sd`):
///
/// | what | subject | stream |
/// | --- | --- | --- |
/// | jobs | `sd.jobs.<model>` | `SD_JOBS` (work queue) |
/// | events | `sd.events.<job_id>` | `SD_EVENTS` (limits, max age) |
/// | dead letters | `sd.dlq.<model>` | `SD_DLQ` (limits, max age) |
/// | cancel requests | `sd.cancel.<job_id>` | none (core NATS) |
/// | heartbeats | `sd.workers.<worker_id>` | none (core NATS) |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self { prefix: DEFAULT_PREFIX.to_string() }
    }
}

impl Subjects {
    /// Subjects under `prefix`: one or more dot-separated subject tokens, not starting with `$`
    /// (NATS' own subjects).
    pub fn new(prefix: impl Into<String>) -> Result<Self, ProtocolError> {
        let prefix = prefix.into();
        if prefix.starts_with('$') {
            return Err(ProtocolError::invalid("prefix", "must not start with '$' (reserved by NATS)"));
        }
        for token in prefix.split('.') {
            validate_subject_token("prefix", token)?;
        }
        Ok(Self { prefix })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `sd.jobs.<model>`: where jobs for `model` are published.
    pub fn jobs(&self, model: &str) -> Result<String, ProtocolError> {
        validate_model_name(model)?;
        Ok(format!("{}.jobs.{model}", self.prefix))
    }

    /// `sd.jobs.>`: the jobs stream's subjects.
    pub fn jobs_wildcard(&self) -> String {
        format!("{}.jobs.>", self.prefix)
    }

    /// The model of a jobs subject, `None` if it is not one.
    pub fn model_of_jobs_subject<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let model = subject.strip_prefix(self.prefix.as_str())?.strip_prefix(".jobs.")?;
        validate_model_name(model).ok().map(|_| model)
    }

    /// `sd.events.<job_id>`: the job's events.
    pub fn events(&self, job_id: Uuid) -> String {
        format!("{}.events.{job_id}", self.prefix)
    }

    /// `sd.events.>`: the events stream's subjects.
    pub fn events_wildcard(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// `sd.cancel.<job_id>`: cancel requests for the job.
    pub fn cancel(&self, job_id: Uuid) -> String {
        format!("{}.cancel.{job_id}", self.prefix)
    }

    /// `sd.cancel.>`: every cancel request.
    pub fn cancel_wildcard(&self) -> String {
        format!("{}.cancel.>", self.prefix)
    }

    /// `sd.workers.<worker_id>`: the worker's heartbeats.
    pub fn heartbeat(&self, worker_id: &str) -> Result<String, ProtocolError> {
        validate_worker_id(worker_id)?;
        Ok(format!("{}.workers.{worker_id}", self.prefix))
    }

    /// `sd.workers.>`: every worker's heartbeats.
    pub fn heartbeats_wildcard(&self) -> String {
        format!("{}.workers.>", self.prefix)
    }

    /// `sd.dlq.<model>`: jobs for `model` that were given up on.
    pub fn dead_letter(&self, model: &str) -> Result<String, ProtocolError> {
        validate_model_name(model)?;
        Ok(format!("{}.dlq.{model}", self.prefix))
    }

    /// `sd.dlq.>`: the dead-letter stream's subjects.
    pub fn dead_letter_wildcard(&self) -> String {
        format!("{}.dlq.>", self.prefix)
    }

    fn stream_name(&self, suffix: &str) -> String {
        let base: String =
            self.prefix.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
        format!("{base}_{suffix}")
    }

    /// `SD_JOBS`: the work-queue stream of jobs.
    pub fn jobs_stream(&self) -> String {
        self.stream_name("JOBS")
    }

    /// `SD_EVENTS`: the events stream.
    pub fn events_stream(&self) -> String {
        self.stream_name("EVENTS")
    }

    /// `SD_ADVISORIES`: JetStream's max-deliveries advisories for the jobs stream.
    pub fn advisories_stream(&self) -> String {
        self.stream_name("ADVISORIES")
    }

    /// `SD_STATUS`: the queens' KV bucket of job status.
    pub fn status_bucket(&self) -> String {
        self.stream_name("STATUS")
    }

    /// `SD_DLQ`: the dead-letter stream.
    pub fn dlq_stream(&self) -> String {
        self.stream_name("DLQ")
    }
}

// ---------------------------------------------------------------------------------------------------------
// Object keys
// ---------------------------------------------------------------------------------------------------------

/// `jobs/<job_id>/`: where a job's results are stored.
pub fn result_prefix(job_id: Uuid) -> String {
    format!("{RESULTS_PREFIX}{job_id}/")
}

/// `jobs/<job_id>/<index>.<ext>`: the key of a job's result image.
pub fn result_key(job_id: Uuid, index: u32, ext: &str) -> String {
    format!("{RESULTS_PREFIX}{job_id}/{index}.{ext}")
}

/// The parts of a result key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultKey {
    pub job_id: Uuid,
    pub index: u32,
    pub ext: String,
}

/// Parses a key made by [`result_key`]; anything else (another layout, a non-canonical UUID or index, an
/// extension that is not 1–8 ASCII letters or digits) is an error naming the key.
pub fn parse_result_key(key: &str) -> Result<ResultKey, ProtocolError> {
    let bad = || {
        ProtocolError::invalid(
            "key",
            format!("{} is not a result key (expected jobs/<job_id>/<index>.<ext>)", quoted(key)),
        )
    };
    let rest = key.strip_prefix(RESULTS_PREFIX).ok_or_else(bad)?;
    let (id, file) = rest.split_once('/').ok_or_else(bad)?;
    let (index, ext) = file.split_once('.').ok_or_else(bad)?;
    let job_id = Uuid::try_parse(id).map_err(|_| bad())?;
    if job_id.to_string() != id {
        return Err(bad());
    }
    let canonical_index =
        !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) && (index == "0" || !index.starts_with('0'));
    let index: u32 = if canonical_index { index.parse().map_err(|_| bad())? } else { return Err(bad()) };
    if ext.is_empty() || ext.len() > 8 || !ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(bad());
    }
    Ok(ResultKey { job_id, index, ext: ext.to_string() })
}

// ---------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_by_name_and_maps_as_maps_only() {
        let base = serde_json::to_value(job()).unwrap();
        let encode_with = |field: &str, value: serde_json::Value| {
            let mut v = base.clone();
            v[field] = value;
            rmp_serde::to_vec_named(&v).unwrap()
        };
        for (field, value) in [
            ("kind", serde_json::json!(0)),
            ("resize_mode", serde_json::json!(2)),
            ("output", serde_json::json!(["png"])),
            ("output", serde_json::json!({"format": 1})),
            ("output", serde_json::json!([0, 80])),
        ] {
            let err = decode_job(&encode_with(field, value.clone())).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidRequest, "{field} = {value}");
        }
        let ok = decode_job(&encode_with("resize_mode", "pad".into())).unwrap();
        assert_eq!(ok.resize_mode, ResizeMode::Pad);
        let ok = decode_job(&encode_with("output", serde_json::json!({"format": "webp", "quality": 80}))).unwrap();
        assert_eq!(ok.output, OutputFormat { format: ImageFormat::Webp, quality: Some(80) });
        // An unknown name is quoted short, whatever its length.
        let err = decode_job(&encode_with("kind", "k".repeat(100_000).into())).unwrap_err();
        assert!(err.message.len() < 300 && err.message.contains("100000 bytes"), "{}", err.message);
        // Image sources: one key, inline as bin only.
        let mut img = serde_json::to_value(img2img()).unwrap();
        for bad in [
            serde_json::json!({"inline": [1, 2, 3]}),
            serde_json::json!({"object_key": "a.png", "inline": "x"}),
            serde_json::json!({"url": "http://example.com/a.png"}),
            serde_json::json!({}),
            serde_json::json!(["a.png"]),
            serde_json::json!({"0": "a.png"}),
        ] {
            img["init_image"] = bad.clone();
            assert!(decode_job(&rmp_serde::to_vec_named(&img).unwrap()).is_err(), "{bad}");
        }
        img["init_image"] = serde_json::json!({"object_key": "uploads/a.png"});
        let ok = decode_job(&rmp_serde::to_vec_named(&img).unwrap()).unwrap();
        assert_eq!(ok.init_image, Some(ImageSource::ObjectKey("uploads/a.png".into())));
        for names in [JobKind::NAMES, ResizeMode::NAMES, ImageFormat::NAMES] {
            for name in names {
                assert!(rmp_serde::to_vec_named(name).is_ok());
            }
        }
        assert_eq!(encode(&ResizeMode::Stretch), encode("stretch"));
        assert_eq!(encode(&ImageFormat::Jpeg), encode("jpeg"));
        assert_eq!(encode(&JobKind::Inpaint), encode("inpaint"));
    }

    #[test]
    fn echoed_values_and_messages_are_short() {
        assert_eq!(quoted("ddim"), "\"ddim\"");
        let long = quoted(&"\"".repeat(1_000_000));
        assert!(long.len() < 150 && long.ends_with("(1000000 bytes)"), "{long}");
        assert_eq!(truncate("ééé", 3), "é");
        let err = ProtocolError::invalid("x", "y".repeat(10_000));
        assert!(err.message.len() <= MAX_ERROR_MESSAGE_BYTES);
        let err = ProtocolError::malformed("€".repeat(10_000));
        assert!(err.message.len() <= MAX_ERROR_MESSAGE_BYTES && err.message.ends_with('€'));
        let mut j = job();
        j.scheduler = Some("\"".repeat(1_000_000));
        let err = j.validate(&Limits::default()).unwrap_err();
        assert!(err.message.len() < 300, "{}", err.message);
        for bad in ["", "a//b", "a/", "./a", "a/./b", "a/../b", "/a", "a\u{0}b"] {
            assert!(validate_object_key("k", bad).is_err(), "{bad:?}");
        }
        assert!(validate_object_key("k", &format!("a/{}", "x".repeat(256))).is_err());
        assert!(validate_object_key("k", &"k".repeat(5000)).unwrap_err().message.len() < 200);
        validate_object_key("k", "uploads/1f0e.png").unwrap();
        validate_object_key("k", "a b/ü€.png").unwrap();
    }

    #[test]
    fn scheduler_and_spacing_names_are_the_cores() {
        let core: Vec<&str> = crate::diffusion::SchedulerKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(core, SCHEDULERS);
        for name in TIMESTEP_SPACINGS {
            assert!(name.parse::<crate::diffusion::TimestepSpacing>().is_ok(), "{name}");
        }
    }

    fn job() -> JobRequest {
        let mut j = JobRequest::new(JobKind::Txt2Img, "sd-turbo", "a red fox");
        j.created_at = 1_700_000_000_000;
        j
    }

    fn img2img() -> JobRequest {
        let mut j = job();
        j.kind = JobKind::Img2Img;
        j.init_image = Some(ImageSource::ObjectKey("uploads/abc/init.png".into()));
        j
    }

    fn inpaint() -> JobRequest {
        let mut j = img2img();
        j.kind = JobKind::Inpaint;
        j.mask = Some(ImageSource::Inline(vec![7; 100]));
        j
    }

    fn full_job() -> JobRequest {
        let mut j = inpaint();
        j.negative_prompt = Some(String::new());
        j.width = 768;
        j.height = 512;
        j.steps = Some(25);
        j.guidance = Some(6.5);
        j.scheduler = Some("dpmpp_2m_karras".into());
        j.timestep_spacing = Some("trailing".into());
        j.seed = Some(42);
        j.num_images = 3;
        j.strength = Some(0.6);
        j.mask_blur = 8;
        j.invert_mask = true;
        j.paste_back = false;
        j.resize_mode = ResizeMode::Pad;
        j.output = OutputFormat { format: ImageFormat::Webp, quality: Some(90) };
        j.deadline = Some(j.created_at + 60_000);
        j.idempotency_key = Some("client-123".into());
        j
    }

    type Change = Box<dyn Fn(&mut JobRequest)>;

    fn field_of(j: &JobRequest) -> String {
        let err = j.validate(&Limits::default()).expect_err("should be invalid");
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        let field = err.field.clone().expect("names a field");
        assert!(err.message.contains(&format!("`{field}`")), "{err}");
        field
    }

    fn id() -> Uuid {
        Uuid::parse_str("67e55044-10b1-426f-9247-bb680e5fe0c8").unwrap()
    }

    fn events() -> Vec<Event> {
        let mut progress = Progress::new(id(), 5, 20, 11);
        progress.eta_ms = Some(1500);
        progress.preview_jpeg = Some(vec![0xff, 0xd8, 0xff, 0xd9]);
        vec![
            Event::Accepted(Accepted { v: 1, job_id: id(), at: 10, worker_id: "gpu-7".into() }),
            Event::Progress(progress),
            Event::Progress(Progress::new(id(), 1, 20, 12)),
            Event::Completed(Completed {
                v: 1,
                job_id: id(),
                at: 13,
                images: vec![ImageResult {
                    index: 0,
                    key: result_key(id(), 0, "png"),
                    url: Some("https://s3.example/jobs/x/0.png?sig".into()),
                    width: 512,
                    height: 512,
                    seed: 42,
                    bytes: 123_456,
                    content_type: "image/png".into(),
                }],
                timings: Timings { queue_ms: 1, lora_ms: 0, load_ms: 0, generation_ms: 2, upload_ms: 3, total_ms: 6 },
            }),
            Event::Failed(Failed {
                v: 1,
                job_id: id(),
                at: 14,
                code: ErrorCode::OutOfMemory,
                message: "CUDA out of memory".into(),
                field: None,
            }),
            Event::Failed(Failed::from_error(id(), &ProtocolError::invalid("width", "must be ..."), 15)),
            Event::Cancelled(Cancelled { v: 1, job_id: id(), at: 16, at_step: Some(7) }),
            Event::Cancelled(Cancelled { v: 1, job_id: id(), at: 17, at_step: None }),
        ]
    }

    /// A MessagePack map with the given key/value pairs, built by hand.
    fn map(pairs: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut out = vec![0x80 | pairs.len() as u8];
        for (k, v) in pairs {
            out.extend(encode(k));
            out.extend(v);
        }
        out
    }

    #[test]
    fn job_round_trips() {
        for j in [job(), img2img(), inpaint(), full_job()] {
            j.validate(&Limits::default()).unwrap();
            assert_eq!(decode_job(&encode(&j)).unwrap(), j);
        }
    }

    #[test]
    fn job_defaults_fill_missing_fields() {
        let bytes = map(&[
            ("v", encode(&1u32)),
            ("id", encode(&id().to_string())),
            ("kind", encode("txt2img")),
            ("model", encode("xl")),
            ("prompt", encode("a cat")),
            ("width", encode(&1024u32)),
            ("height", encode(&1024u32)),
            ("created_at", encode(&5u64)),
        ]);
        let j = decode_job(&bytes).unwrap();
        assert_eq!(j.num_images, 1);
        assert_eq!(j.mask_blur, DEFAULT_MASK_BLUR);
        assert!(j.paste_back && !j.invert_mask);
        assert_eq!(j.resize_mode, ResizeMode::Fit);
        assert_eq!(j.output, OutputFormat { format: ImageFormat::Png, quality: None });
        assert_eq!((j.steps, j.guidance, j.seed, j.deadline), (None, None, None, None));
        j.validate(&Limits::default()).unwrap();
    }

    #[test]
    fn missing_required_field_is_an_error() {
        let bytes = map(&[("v", encode(&1u32)), ("id", encode(&id().to_string()))]);
        let err = decode_job(&bytes).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        assert!(err.message.contains("missing field"), "{err}");
    }

    #[test]
    fn uuids_are_strings_on_the_wire() {
        let j = job();
        let bytes = encode(&j);
        let s = j.id.to_string();
        assert!(bytes.windows(s.len()).any(|w| w == s.as_bytes()));
    }

    #[test]
    fn every_event_round_trips() {
        for e in events() {
            let bytes = encode(&e);
            assert_eq!(decode_event(&bytes).unwrap(), e, "{}", e.type_name());
            let json = serde_json::to_value(&e).unwrap();
            assert_eq!(json["type"], e.type_name());
            assert_eq!(json["job_id"], id().to_string());
        }
        assert!(events().iter().filter(|e| e.is_terminal()).all(|e| e.type_name() != "progress"));
    }

    #[test]
    fn progress_percent() {
        assert_eq!(Progress::new(id(), 5, 20, 0).percent, 25.0);
        assert_eq!(Progress::new(id(), 0, 0, 0).percent, 0.0);
        let dbg = format!("{:?}", events()[1]);
        assert!(dbg.contains("4 bytes"), "{dbg}");
    }

    #[test]
    fn heartbeat_and_cancel_round_trip() {
        for state in [WorkerState::Idle, WorkerState::Busy { job_id: id() }] {
            let hb = Heartbeat {
                v: 1,
                at: 99,
                worker_id: "gpu-7".into(),
                hostname: "node-3".into(),
                device: "cuda:0".into(),
                models: vec!["xl".into(), "sd-turbo".into()],
                loras: vec!["style".into()],
                resident: vec!["xl".into()],
                state,
                jobs_done: 10,
                jobs_failed: 1,
                uptime_s: 3600,
                version: "0.1.0".into(),
            };
            assert_eq!(decode_heartbeat(&encode(&hb)).unwrap(), hb);
        }
        let busy = serde_json::to_value(WorkerState::Busy { job_id: id() }).unwrap();
        assert_eq!(busy["status"], "busy");
        for reason in [None, Some("user asked".to_string())] {
            let c = CancelRequest { v: 1, job_id: id(), at: 5, reason };
            assert_eq!(decode_cancel(&encode(&c)).unwrap(), c);
        }
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        #[derive(Serialize)]
        struct Newer<'a> {
            #[serde(flatten)]
            job: &'a JobRequest,
            future_field: Vec<u32>,
            another: &'a str,
        }
        let j = full_job();
        let bytes = encode(&Newer { job: &j, future_field: vec![1, 2, 3], another: "x" });
        assert_eq!(decode_job(&bytes).unwrap(), j);

        let mut e = map(&[
            ("type", encode("cancelled")),
            ("v", encode(&1u32)),
            ("job_id", encode(&id().to_string())),
            ("at", encode(&3u64)),
            ("worker_hint", encode("later")),
        ]);
        assert_eq!(decode_event(&e).unwrap(), Event::Cancelled(Cancelled { v: 1, job_id: id(), at: 3, at_step: None }));
        e = map(&[("type", encode("teleported")), ("v", encode(&1u32)), ("job_id", encode(&id().to_string()))]);
        assert!(decode_event(&e).unwrap_err().message.contains("teleported"));
    }

    #[test]
    fn unknown_error_code_reads_as_internal() {
        let bytes = map(&[
            ("type", encode("failed")),
            ("v", encode(&1u32)),
            ("job_id", encode(&id().to_string())),
            ("at", encode(&3u64)),
            ("code", encode("GPU_ON_FIRE")),
            ("message", encode("hot")),
        ]);
        match decode_event(&bytes).unwrap() {
            Event::Failed(f) => assert_eq!(f.code, ErrorCode::Internal),
            e => panic!("{e:?}"),
        }
        assert_eq!(encode(&ErrorCode::OutOfMemory), encode("OUT_OF_MEMORY"));
        assert_eq!(ErrorCode::InvalidRequest.to_string(), "INVALID_REQUEST");
    }

    #[test]
    fn newer_version_is_rejected_naming_it() {
        let mut j = job();
        j.v = 2;
        let bytes = encode(&j);
        let err = decode_job(&bytes).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        assert_eq!(err.field.as_deref(), Some("v"));
        assert!(err.message.contains("version 2"), "{err}");
        assert!(err.to_string().starts_with("INVALID_REQUEST: "), "{err}");
        // The worker can still fail the job by id.
        assert_eq!(peek_job_id(&bytes), Some(j.id));

        // A v2 job with fields v1 does not know is rejected for its version, not its fields.
        let bytes = map(&[("v", encode(&2u32)), ("id", encode(&id().to_string())), ("new", encode(&[1u8]))]);
        assert!(decode_job(&bytes).unwrap_err().message.contains("version 2"));
        let bytes = map(&[("v", encode(&0u32))]);
        assert!(decode_job(&bytes).unwrap_err().message.contains("version 0"));
        let bytes = map(&[("type", encode("accepted")), ("v", encode(&7u32))]);
        assert!(decode_event(&bytes).unwrap_err().message.contains("version 7"));
        let mut hb = map(&[("v", encode(&3u32))]);
        assert!(decode_heartbeat(&hb).unwrap_err().message.contains("version 3"));
        hb = map(&[("job_id", encode(&id().to_string()))]);
        let err = decode_cancel(&hb).unwrap_err();
        assert!(err.message.contains("missing") && err.field.as_deref() == Some("v"), "{err}");
    }

    #[test]
    fn garbage_and_truncated_messages_are_errors() {
        let bytes = encode(&full_job());
        let inputs: Vec<Vec<u8>> = vec![
            vec![],
            b"hello world".to_vec(),
            vec![0xc1],
            vec![0xff; 64],
            vec![0x93, 1, 2, 3],
            vec![0xdf, 0xff, 0xff, 0xff, 0xff],
            vec![0x81, 0xa1, b'v', 0xc6, 0xff, 0xff, 0xff, 0xff],
            serde_json::to_vec(&full_job()).unwrap(),
        ];
        for (i, b) in inputs.iter().enumerate() {
            let err = decode_job(b).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidRequest, "{i}");
            assert!(err.message.starts_with("cannot decode job") || err.field.as_deref() == Some("v"), "{i}: {err}");
            assert!(decode_event(b).is_err() && decode_heartbeat(b).is_err() && decode_cancel(b).is_err());
        }
        for cut in 1..bytes.len() {
            assert!(decode_job(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0xc0);
        assert!(decode_job(&longer).unwrap_err().message.contains("1 unexpected bytes"));
        // Every single-byte corruption either decodes or errors: no panic.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            let _ = decode_job(&b);
            let _ = peek_job_id(&b);
        }
        assert_eq!(peek_job_id(b"nonsense"), None);
    }

    #[test]
    fn inline_bytes_are_msgpack_bin() {
        let mut j = img2img();
        j.init_image = Some(ImageSource::Inline(vec![200u8; 1000]));
        let bytes = encode(&j);
        // bin 16 (0xc5) with a 2-byte length 1000 = 0x03e8, right before the payload.
        assert!(bytes.windows(3).any(|w| w == [0xc5, 0x03, 0xe8]), "no bin marker");
        // The image adds its bytes plus a few of framing, not ~2 bytes per pixel value as an array of ints would.
        let mut tiny = j.clone();
        tiny.init_image = Some(ImageSource::Inline(vec![200u8; 1]));
        let overhead = bytes.len() - encode(&tiny).len();
        assert!((999..=1001).contains(&overhead), "the image added {overhead} bytes");
        assert_eq!(decode_job(&bytes).unwrap(), j);

        let small = encode(&ImageSource::Inline(vec![1, 2, 3]));
        assert!(small.contains(&0xc4));
        let preview = encode(&events()[1]);
        assert!(preview.windows(2).any(|w| w == [0xc4, 4]));
        assert_eq!(format!("{:?}", j.init_image.unwrap()), "Inline(1000 bytes)");
    }

    #[test]
    fn each_validation_rule_names_its_field() {
        let l = Limits::default();
        let cases: Vec<(&str, Change)> = vec![
            ("v", Box::new(|j| j.v = 2)),
            ("id", Box::new(|j| j.id = Uuid::nil())),
            ("model", Box::new(|j| j.model = "sd.turbo".into())),
            ("model", Box::new(|j| j.model = String::new())),
            ("prompt", Box::new(|j| j.prompt = "   ".into())),
            ("prompt", Box::new(|j| j.prompt = "x".repeat(4097))),
            ("negative_prompt", Box::new(|j| j.negative_prompt = Some("x".repeat(4097)))),
            ("width", Box::new(|j| j.width = 0)),
            ("width", Box::new(|j| j.width = 100)),
            ("height", Box::new(|j| j.height = 4104)),
            ("width", Box::new(|j| (j.width, j.height) = (4096, 4096))),
            ("steps", Box::new(|j| j.steps = Some(0))),
            ("steps", Box::new(|j| j.steps = Some(151))),
            ("guidance", Box::new(|j| j.guidance = Some(f64::NAN))),
            ("guidance", Box::new(|j| j.guidance = Some(-1.0))),
            ("guidance", Box::new(|j| j.guidance = Some(31.0))),
            ("scheduler", Box::new(|j| j.scheduler = Some("Euler".into()))),
            ("timestep_spacing", Box::new(|j| j.timestep_spacing = Some("random".into()))),
            ("num_images", Box::new(|j| j.num_images = 0)),
            ("num_images", Box::new(|j| j.num_images = 9)),
            ("seed", Box::new(|j| (j.seed, j.num_images) = (Some(u64::MAX), 2))),
            ("init_image", Box::new(|j| j.init_image = Some(ImageSource::Inline(vec![1])))),
            ("mask", Box::new(|j| j.mask = Some(ImageSource::Inline(vec![1])))),
            ("strength", Box::new(|j| j.strength = Some(0.5))),
            ("mask_blur", Box::new(|j| j.mask_blur = 65)),
            ("output.quality", Box::new(|j| j.output.quality = Some(80))),
            ("output.quality", Box::new(|j| j.output = OutputFormat { format: ImageFormat::Jpeg, quality: Some(0) })),
            ("output.quality", Box::new(|j| j.output = OutputFormat { format: ImageFormat::Jpeg, quality: Some(101) })),
            ("deadline", Box::new(|j| j.deadline = Some(j.created_at))),
            ("idempotency_key", Box::new(|j| j.idempotency_key = Some(String::new()))),
            ("idempotency_key", Box::new(|j| j.idempotency_key = Some("x".repeat(257)))),
        ];
        for (want, change) in &cases {
            let mut j = job();
            change(&mut j);
            assert_eq!(field_of(&j), *want);
        }

        let img_cases: Vec<(&str, Change)> = vec![
            ("init_image", Box::new(|j| j.init_image = None)),
            ("init_image", Box::new(|j| j.init_image = Some(ImageSource::Inline(vec![])))),
            ("init_image", Box::new(|j| j.init_image = Some(ImageSource::Inline(vec![0; MAX_INLINE_IMAGE_BYTES + 1])))),
            ("init_image", Box::new(|j| j.init_image = Some(ImageSource::ObjectKey(String::new())))),
            ("init_image", Box::new(|j| j.init_image = Some(ImageSource::ObjectKey("/abs/key.png".into())))),
            ("init_image", Box::new(|j| j.init_image = Some(ImageSource::ObjectKey("a/../b.png".into())))),
            ("mask", Box::new(|j| j.mask = Some(ImageSource::Inline(vec![1])))),
            ("strength", Box::new(|j| j.strength = Some(0.0))),
            ("strength", Box::new(|j| j.strength = Some(1.01))),
            ("strength", Box::new(|j| j.strength = Some(f64::NAN))),
        ];
        for (want, change) in &img_cases {
            let mut j = img2img();
            change(&mut j);
            assert_eq!(field_of(&j), *want);
        }
        let mut j = inpaint();
        j.mask = None;
        assert_eq!(field_of(&j), "mask");
        let mut j = inpaint();
        j.mask = Some(ImageSource::Inline(vec![0; MAX_INLINE_IMAGE_BYTES + 1]));
        assert_eq!(field_of(&j), "mask");

        // Edges that are fine.
        let mut j = img2img();
        j.strength = Some(1.0);
        j.init_image = Some(ImageSource::Inline(vec![0; MAX_INLINE_IMAGE_BYTES]));
        (j.width, j.height, j.steps, j.guidance, j.num_images) = (2048, 2048, Some(150), Some(0.0), 8);
        j.seed = Some(u64::MAX - 7);
        j.validate(&l).unwrap();
        for s in SCHEDULERS {
            let mut j = job();
            j.scheduler = Some(s.into());
            j.validate(&l).unwrap();
        }
        for s in TIMESTEP_SPACINGS {
            let mut j = job();
            j.timestep_spacing = Some(s.into());
            j.validate(&l).unwrap();
        }
        // Tighter limits apply.
        let tight = Limits { max_inline_image_bytes: 10, ..Limits::default() };
        let mut j = img2img();
        j.init_image = Some(ImageSource::Inline(vec![0; 11]));
        assert_eq!(j.validate(&tight).unwrap_err().field.as_deref(), Some("init_image"));
    }

    #[test]
    fn limits_defaults_and_overrides() {
        let l = Limits::default();
        assert_eq!(l.max_inline_image_bytes, 8 * 1024 * 1024);
        assert_eq!((l.max_side, l.max_pixels, l.max_steps, l.max_images), (4096, 2048 * 2048, 150, 8));
        let partial: Limits = serde_json::from_str(r#"{"max_images": 2}"#).unwrap();
        assert_eq!(partial, Limits { max_images: 2, ..Limits::default() });
    }

    #[test]
    fn strength_defaults_and_deadline() {
        assert_eq!(job().strength_or_default(), None);
        assert_eq!(img2img().strength_or_default(), Some(DEFAULT_IMG2IMG_STRENGTH));
        assert_eq!(inpaint().strength_or_default(), Some(DEFAULT_INPAINT_STRENGTH));
        let mut j = job();
        assert!(!j.is_expired(u64::MAX));
        j.deadline = Some(100);
        assert!(!j.is_expired(99) && j.is_expired(100));
        assert_eq!(j.msg_id(), j.id.to_string());
        assert!(now_millis() > 1_600_000_000_000);
    }

    #[test]
    fn subjects_and_streams() {
        let s = Subjects::default();
        assert_eq!(s.prefix(), "sd");
        assert_eq!(s.jobs("xl").unwrap(), "sd.jobs.xl");
        assert_eq!(s.jobs_wildcard(), "sd.jobs.>");
        assert_eq!(s.events(id()), format!("sd.events.{}", id()));
        assert_eq!(s.events_wildcard(), "sd.events.>");
        assert_eq!(s.cancel(id()), format!("sd.cancel.{}", id()));
        assert_eq!(s.cancel_wildcard(), "sd.cancel.>");
        assert_eq!(s.heartbeat("gpu-7").unwrap(), "sd.workers.gpu-7");
        assert_eq!(s.heartbeats_wildcard(), "sd.workers.>");
        assert_eq!(s.dead_letter("xl").unwrap(), "sd.dlq.xl");
        assert_eq!(s.dead_letter_wildcard(), "sd.dlq.>");
        assert_eq!(
            (s.jobs_stream(), s.events_stream(), s.dlq_stream()),
            ("SD_JOBS".into(), "SD_EVENTS".into(), "SD_DLQ".into())
        );
        assert_eq!(s.model_of_jobs_subject("sd.jobs.xl"), Some("xl"));
        assert_eq!(s.model_of_jobs_subject("sd.jobs.a.b"), None);
        assert_eq!(s.model_of_jobs_subject("sd.events.xl"), None);

        let p = Subjects::new("acme.img-gen").unwrap();
        assert_eq!(p.jobs("v1-5").unwrap(), "acme.img-gen.jobs.v1-5");
        assert_eq!(p.jobs_stream(), "ACME_IMG_GEN_JOBS");
        assert_eq!(p.dlq_stream(), "ACME_IMG_GEN_DLQ");
        for bad in ["", "a..b", "a.*", ">", "a b", "$JS", "sd."] {
            assert!(Subjects::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn subject_tokens_are_validated() {
        let s = Subjects::default();
        for ok in ["xl", "v1-5", "sd_turbo", "ü", &"m".repeat(128)] {
            validate_model_name(ok).unwrap();
        }
        // A model name also names a JetStream consumer, which cannot hold a path separator.
        for bad in ["owner/name", "a\\b"] {
            assert_eq!(validate_model_name(bad).unwrap_err().field.as_deref(), Some("model"), "{bad:?}");
        }
        for bad in ["", "a.b", "a*", "a>", "a b", "a\tb", "a\nb", "\u{7}", &"m".repeat(129)] {
            let err = s.jobs(bad).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("model"), "{bad:?}");
            assert!(s.dead_letter(bad).is_err());
            let err = s.heartbeat(bad).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("worker_id"));
            assert!(err.message.starts_with("`worker_id` "), "{err}");
        }
        assert!(s.jobs("a.b").unwrap_err().message.contains("'.'"));
    }

    #[test]
    fn result_keys_round_trip() {
        let k = result_key(id(), 3, "png");
        assert_eq!(k, format!("jobs/{}/3.png", id()));
        assert!(k.starts_with(&result_prefix(id())));
        assert_eq!(parse_result_key(&k).unwrap(), ResultKey { job_id: id(), index: 3, ext: "png".into() });
        for index in [0, 10, u32::MAX] {
            for f in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp] {
                let k = result_key(id(), index, f.extension());
                let p = parse_result_key(&k).unwrap();
                assert_eq!(result_key(p.job_id, p.index, &p.ext), k);
            }
        }
        let upper = id().to_string().to_uppercase();
        for bad in [
            String::new(),
            "jobs/".into(),
            format!("jobs/{}/", id()),
            format!("jobs/{}/3", id()),
            format!("jobs/{}/03.png", id()),
            format!("jobs/{}/+3.png", id()),
            format!("jobs/{}/4294967296.png", id()),
            format!("jobs/{}/3.", id()),
            format!("jobs/{}/3.p/ng", id()),
            format!("jobs/{}/3.tar.gz", id()),
            format!("jobs/{upper}/3.png"),
            format!("jobs/{}/3.png", id().simple()),
            format!("other/{}/3.png", id()),
            format!("jobs/{}/x/3.png", id()),
        ] {
            let err = parse_result_key(&bad).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("key"), "{bad}");
        }
        assert_eq!(ImageFormat::Jpeg.content_type(), "image/jpeg");
    }
}
