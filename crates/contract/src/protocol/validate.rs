//! The protocol's rules for a job ([`JobRequest::validate`]) and the deployment's [`Limits`] they are checked
//! against; the checks of object keys and LoRA names that the HTTP API uses too.

use serde::{Deserialize, Serialize};

use super::error::{quoted, ProtocolError};
use super::job::{ImageSource, JobKind, JobRequest, MAX_LORAS_PER_JOB, MAX_LORA_SCALE};
use super::subjects::validate_model_name;
use super::{
    MAX_IDEMPOTENCY_KEY_BYTES, MAX_INLINE_IMAGE_BYTES, MAX_KEY_SEGMENT_BYTES, MAX_OBJECT_KEY_BYTES, PROTOCOL_VERSION,
};
use crate::vocab::{ImageFormat, SCHEDULERS, TIMESTEP_SPACINGS};

impl JobRequest {
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
        limits.check_size(self.width, self.height)?;
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
        // Refused now rather than by the worker once the job's model is loaded (when the job gives its steps;
        // the model's default steps are the worker's to know).
        if let (Some(s), Some(steps)) = (self.strength_or_default(), self.steps) {
            if f64::from(steps) * s < 1.0 {
                return Err(E::invalid(
                    "strength",
                    format!("{s} × {steps} steps leaves no step to run; raise the strength or the steps"),
                ));
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
        if let Some(t) = &self.tenant {
            validate_tenant("tenant", t)?;
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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

impl Limits {
    /// Checks a size: each side given a positive multiple of 8 and at most `max_side`, and when both are
    /// known their product at most `max_pixels`. A side left out is the model's, checked by the worker once
    /// it knows it.
    pub fn check_size(&self, width: Option<u32>, height: Option<u32>) -> Result<(), ProtocolError> {
        for (field, v) in [("width", width), ("height", height)] {
            let Some(v) = v else { continue };
            if v == 0 || v % 8 != 0 {
                return Err(ProtocolError::invalid(field, format!("must be a positive multiple of 8, got {v}")));
            }
            if v > self.max_side {
                return Err(ProtocolError::invalid(field, format!("must be at most {}, got {v}", self.max_side)));
            }
        }
        if let (Some(w), Some(h)) = (width, height) {
            let pixels = u64::from(w) * u64::from(h);
            if pixels > self.max_pixels {
                return Err(ProtocolError::invalid(
                    "width",
                    format!("× height is {w} × {h} = {pixels} pixels, over the limit of {}", self.max_pixels),
                ));
            }
        }
        Ok(())
    }
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

/// The longest tenant name, in bytes.
pub const MAX_TENANT_BYTES: usize = 64;

/// A tenant name (a `--token-file` line's `tenant=NAME`): 1 to [`MAX_TENANT_BYTES`] bytes of lowercase ASCII
/// letters, digits, `_`, `-` and `.`, not starting with `.`; it is a segment of its uploads' object keys
/// (`uploads/<tenant>/`), so lowercase: on a case-insensitive file store `Acme` and `acme` would share one.
pub fn validate_tenant(field: &str, name: &str) -> Result<(), ProtocolError> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.');
    if name.is_empty() || name.len() > MAX_TENANT_BYTES || name.starts_with('.') || !name.chars().all(allowed) {
        return Err(ProtocolError::invalid(
            field,
            format!(
                "{} is not a tenant name: 1 to {MAX_TENANT_BYTES} lowercase letters, digits, '_', '-' or '.', not starting with '.'",
                quoted(name)
            ),
        ));
    }
    Ok(())
}

/// `uploads/<tenant>/` for a tenant's uploads, `uploads/` for an operator's: where `POST /v1/uploads` stores
/// an image, and (for a tenant) the only keys its jobs may name as input images.
pub fn uploads_prefix(tenant: Option<&str>) -> String {
    match tenant {
        Some(t) => format!("uploads/{t}/"),
        None => "uploads/".to_string(),
    }
}

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
