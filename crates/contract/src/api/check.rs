//! The checks of a submission that need nothing but its body and the queen's [`Limits`], in the order the
//! queen runs them: its JSON, its conversion to a bus job (base64 images decoded), each inline image's
//! size, then the job's rules. The queen runs them before the checks that need its backends (the images'
//! contents, the model catalogue, the bus's message size); the WebAssembly SDK runs the same code in the
//! browser, so a form is refused there exactly as the queen would refuse it.

use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::error::{ApiErrorCode, ApiErrorDetail};
use super::submission::JobSubmission;
use crate::protocol::{self, ImageSource, JobRequest, Limits, ProtocolError};

/// A JSON body read into `T` as the queen reads it: what does not parse is `MALFORMED_REQUEST`, what parses
/// into the wrong shape `INVALID_REQUEST`, each naming the field (`loras[0].scale`).
pub fn parse_json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiErrorDetail> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let code = if inner.is_syntax() || inner.is_eof() {
            ApiErrorCode::MalformedRequest
        } else {
            ApiErrorCode::InvalidRequest
        };
        // serde_json quotes what it could not read: keep the message short whatever the body held.
        let mut message = format!("invalid JSON body: {inner}");
        protocol::cut(&mut message, protocol::MAX_ERROR_MESSAGE_BYTES);
        // `.` is the whole body; `?` a place the parser could not name (a syntax error). A field left out is
        // named by the message only, at the path of the object that lacks it.
        let missing = message.strip_prefix("invalid JSON body: missing field `").and_then(|m| m.split('`').next());
        let field = match (path.as_str(), missing) {
            ("." | "?", None) => None,
            (".", Some(missing)) => Some(missing.to_string()),
            (path, Some(missing)) => Some(format!("{path}.{missing}")),
            (path, None) => Some(path.to_string()),
        };
        let field = field.map(|f| protocol::truncate(&f, 128).to_string());
        ApiErrorDetail { code, message, field }
    })?;
    // Anything but whitespace after the value is not one JSON body (a second object, a stray byte).
    de.end().map_err(|e| ApiErrorDetail {
        code: ApiErrorCode::MalformedRequest,
        message: format!("invalid JSON body: {e}"),
        field: None,
    })?;
    Ok(value)
}

/// Why a job fails the checks of [`check_job`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobCheckError {
    /// An inline image is over `max_inline_image_bytes` (413).
    TooLarge { field: String, message: String },
    /// A rule is broken (422).
    Invalid(ProtocolError),
}

impl JobCheckError {
    /// As the API's error body says it.
    pub fn detail(&self) -> ApiErrorDetail {
        match self {
            JobCheckError::TooLarge { field, message } => ApiErrorDetail {
                code: ApiErrorCode::PayloadTooLarge,
                message: message.clone(),
                field: Some(field.clone()),
            },
            JobCheckError::Invalid(e) => ApiErrorDetail {
                code: ApiErrorCode::InvalidRequest,
                message: e.message.clone(),
                field: e.field.clone(),
            },
        }
    }
}

/// The checks of a bus job that need only `limits`: each inline image's size, then the job's rules
/// ([`JobRequest::validate`]).
pub fn check_job(job: &JobRequest, limits: &Limits) -> Result<(), JobCheckError> {
    for (field, image) in [("init_image", &job.init_image), ("mask", &job.mask)] {
        if let Some(ImageSource::Inline(bytes)) = image {
            if bytes.len() > limits.max_inline_image_bytes {
                return Err(JobCheckError::TooLarge {
                    field: field.into(),
                    message: format!(
                        "{field} is {} bytes, over the {} byte limit for inline images (upload it instead)",
                        bytes.len(),
                        limits.max_inline_image_bytes
                    ),
                });
            }
        }
    }
    job.validate(limits).map_err(JobCheckError::Invalid)
}

/// A `POST /v1/jobs` body through every check that needs only `limits`: the job it would be (with id `id`,
/// created at `created_at`), or the error the queen would answer with.
pub fn check_submission(body: &[u8], limits: &Limits, id: Uuid, created_at: u64) -> Result<JobRequest, ApiErrorDetail> {
    let submission: JobSubmission = parse_json_body(body)?;
    // Named as the queen names them: the submission's fields, not the bus job's.
    let named = |e: JobCheckError| e.detail().in_their_words(super::SUBMISSION_FIELD_NAMES);
    let job = submission.into_job(id, created_at).map_err(|e| named(JobCheckError::Invalid(e)))?;
    check_job(&job, limits).map_err(named)?;
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str) -> Result<JobRequest, ApiErrorDetail> {
        check_submission(body.as_bytes(), &Limits::default(), Uuid::from_u128(1), 1)
    }

    #[test]
    fn a_submission_is_refused_as_the_queen_refuses_it() {
        let job = check(r#"{"model": "tiny", "prompt": "a kite", "width": 64, "height": 64}"#).unwrap();
        assert!(check("{\"model\": \"tiny\", \"prompt\": \"x\"}\n\t ").is_ok(), "trailing whitespace is fine");
        assert_eq!((job.width, job.id), (Some(64), Uuid::from_u128(1)));
        let cases = [
            (r#"{"model": "tiny", "prompt": "x", "width": 63}"#, ApiErrorCode::InvalidRequest, Some("width")),
            (r#"{"model": "tiny", "prompt": "x", "steps": 500}"#, ApiErrorCode::InvalidRequest, Some("steps")),
            (r#"{"model": "tiny", "prompt": "x", "colour": 1}"#, ApiErrorCode::InvalidRequest, Some("colour")),
            (
                r#"{"model": "tiny", "prompt": "x", "loras": [{"name": "a", "scale": "big"}]}"#,
                ApiErrorCode::InvalidRequest,
                Some("loras[0].scale"),
            ),
            (
                r#"{"model": "tiny", "prompt": "x", "init_image": "%%%"}"#,
                ApiErrorCode::InvalidRequest,
                Some("init_image"),
            ),
            // The submission's names, as the queen gives them, not the bus job's (output.quality, deadline).
            (r#"{"model": "tiny", "prompt": "x", "quality": 80}"#, ApiErrorCode::InvalidRequest, Some("quality")),
            (
                r#"{"model": "tiny", "prompt": "x", "output_format": "jpeg", "quality": 101}"#,
                ApiErrorCode::InvalidRequest,
                Some("quality"),
            ),
            (r#"{"model": "tiny", "prompt": "x", "timeout_s": 0}"#, ApiErrorCode::InvalidRequest, Some("timeout_s")),
            (r#"{"model": "tiny", "prompt": "x""#, ApiErrorCode::MalformedRequest, None),
            // One JSON value, nothing after it (whitespace aside).
            (r#"{"model": "tiny", "prompt": "x"}garbage"#, ApiErrorCode::MalformedRequest, None),
            (r#"{"model": "tiny", "prompt": "x"} {"model": "tiny"}"#, ApiErrorCode::MalformedRequest, None),
            // A field left out is named.
            (r#"{"prompt": "x"}"#, ApiErrorCode::InvalidRequest, Some("model")),
            (
                r#"{"model": "tiny", "prompt": "x", "webhook": {"events": ["completed"]}}"#,
                ApiErrorCode::InvalidRequest,
                Some("webhook.url"),
            ),
        ];
        for (body, code, field) in cases {
            let e = check(body).unwrap_err();
            assert_eq!((e.code, e.field.as_deref()), (code, field), "{body}: {}", e.message);
        }
        let tight = Limits { max_inline_image_bytes: 2, ..Limits::default() };
        let body = r#"{"model": "tiny", "prompt": "x", "init_image": "AAAAAAAA"}"#;
        let e = check_submission(body.as_bytes(), &tight, Uuid::from_u128(1), 1).unwrap_err();
        assert_eq!((e.code, e.field.as_deref()), (ApiErrorCode::PayloadTooLarge, Some("init_image")));
    }
}
