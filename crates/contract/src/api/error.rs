//! The one error shape of the HTTP API, `{"error": {"code", "message", "field"}}`, and the table of error
//! codes with the HTTP status each is answered with.

use serde::{Deserialize, Serialize};

/// Why a request was refused; on the wire in SCREAMING_SNAKE_CASE. Each code has one HTTP status
/// ([`ApiErrorCode::status`]). A code this build does not know (a newer queen) reads as `Other`.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[strum(serialize_all = "SCREAMING_SNAKE_CASE")]
pub enum ApiErrorCode {
    /// 400: the body is not JSON, or a path or query parameter (or header) does not parse.
    MalformedRequest,
    /// 401: no bearer token, or not one of the queen's.
    Unauthorized,
    /// 403: the token's tenant may not do this (the fleet's workers and metrics are for operators' tokens,
    /// a tenant's jobs name only its own uploads, and it lists only its own jobs).
    Forbidden,
    /// 404: no such job, image or endpoint (another tenant's job is not found either).
    NotFound,
    /// 405: the endpoint does not take this method.
    MethodNotAllowed,
    /// 408: the request body did not arrive within the queen's body timeout.
    RequestTimeout,
    /// 409: the job already finished (it cannot be cancelled).
    AlreadyFinished,
    /// 409: the job has not completed (it has no images yet).
    NotCompleted,
    /// 410: the job's `ttl_s` passed: its status and images are gone.
    Expired,
    /// 413: the body, an inline image, or the job as a bus message is over its limit.
    PayloadTooLarge,
    /// 415: not `application/json`.
    UnsupportedMediaType,
    /// 422: the request parses but breaks a rule; `field` names it.
    InvalidRequest,
    /// 500: a bug in the queen.
    Internal,
    /// 502: an OpenAI or AUTOMATIC1111 request's job failed on its worker for another reason than the request
    /// (the job's error code, `TIMEOUT`, `OUT_OF_MEMORY`, `MODEL_UNAVAILABLE`, `STORAGE` or `INTERNAL`, and its
    /// message are quoted; one the worker found invalid is `INVALID_REQUEST`). Sent with `x-should-retry: false`.
    JobFailed,
    /// 503: NATS or the object store cannot be reached now; retry after `Retry-After`.
    Unavailable,
    /// 504: an OpenAI or AUTOMATIC1111 request stopped waiting for its job (the queen's wait passed, or it is
    /// shutting down); the job goes on, and the message names it. Not to be retried: that would submit it again.
    WaitTimeout,
    /// 429: the token already holds the most event streams (and OpenAI or AUTOMATIC1111 requests waiting for
    /// their jobs) the queen allows one token at once; retry once one of them has closed.
    TooManyStreams,
    /// 429: the token submitted more jobs than its `submit_rate` allows; retry after `Retry-After`.
    RateLimited,
    /// A code this build does not know.
    #[serde(other)]
    Other,
}

impl ApiErrorCode {
    /// The HTTP status the code is answered with.
    pub fn status(self) -> u16 {
        match self {
            Self::MalformedRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RequestTimeout => 408,
            Self::AlreadyFinished | Self::NotCompleted => 409,
            Self::Expired => 410,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::InvalidRequest => 422,
            Self::Internal | Self::Other => 500,
            Self::JobFailed => 502,
            Self::Unavailable => 503,
            Self::WaitTimeout => 504,
            Self::TooManyStreams | Self::RateLimited => 429,
        }
    }

    /// Every code, `Other` last.
    pub const ALL: &'static [ApiErrorCode] = <ApiErrorCode as strum::VariantArray>::VARIANTS;

    /// The wire name, e.g. `INVALID_REQUEST`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl std::fmt::Display for ApiErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiErrorBody {
    pub error: ApiErrorDetail,
}

/// What went wrong: a code, a message complete on its own, and the offending field when there is one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiErrorDetail {
    pub code: ApiErrorCode,
    pub message: String,
    /// The offending field (`width`, `init_image`, `quality`, `Last-Event-ID`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiErrorDetail {
    /// This error, about a field of the bus job, named as a client calls that field (see [`in_their_words`]).
    pub fn in_their_words(mut self, names: &[(&str, &str)]) -> Self {
        in_their_words(&mut self.field, &mut self.message, names);
        self
    }
}

/// Renames `field`, a field of the bus job, to what a client calls it (`names`: `(the job's, theirs)`, as
/// [`super::SUBMISSION_FIELD_NAMES`]), the message saying which of theirs it is about; a field `names` does not
/// list is left as it is. The queen and the clients' own checks (the WebAssembly SDK) name fields alike.
pub fn in_their_words(field: &mut Option<String>, message: &mut String, names: &[(&str, &str)]) {
    let theirs = field.as_deref().and_then(|f| names.iter().find(|(ours, _)| *ours == f)).map(|(_, t)| *t);
    if let Some(theirs) = theirs {
        *message = format!("`{theirs}`: {message}");
        *field = Some(theirs.to_string());
    }
}

/// An error answer as a client sees it: the HTTP status and the error body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("HTTP {status}: {code}: {message}{}", field.as_deref().map(|f| format!(" (field {f})")).unwrap_or_default())]
pub struct ApiError {
    pub status: u16,
    pub code: ApiErrorCode,
    pub message: String,
    pub field: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_status_and_wire_name() {
        use strum::VariantArray;
        let known = ApiErrorCode::VARIANTS.iter().copied().filter(|&c| c != ApiErrorCode::Other);
        for code in known.clone() {
            let wire = serde_json::to_value(code).unwrap();
            assert_eq!(wire, code.as_str(), "{code:?}");
            assert_eq!(serde_json::from_value::<ApiErrorCode>(wire).unwrap(), code);
            assert!((400..600).contains(&code.status()), "{code:?}");
        }
        let statuses: std::collections::HashSet<u16> = known.map(|c| c.status()).collect();
        assert_eq!(statuses.len(), 16, "only the two 409s and the two 429s share a status");
        let newer: ApiErrorCode = serde_json::from_str("\"QUOTA_EXCEEDED\"").unwrap();
        assert_eq!(newer, ApiErrorCode::Other);
    }
}
