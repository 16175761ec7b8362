//! The API's one error shape, `{"error": {"code", "message", "field"}}` ([`crate::api::ApiErrorBody`]):
//! [`AppError`] for what the handlers refuse (its status from [`ApiErrorCode::status`]), the mapping from
//! the job service's [`JobsError`], the extractors [`ApiPath`] and [`ApiQuery`] for what axum's own would
//! answer in plain text, and [`json_errors`] for whatever else a layer answers (a body over the limit, a
//! method not allowed).

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::AppState;
use crate::api::{ApiErrorBody, ApiErrorCode, ApiErrorDetail};
use crate::protocol::{self, ProtocolError};
use crate::queen::jobs::JobsError;

/// An API error: code (which gives the status), message and the offending field.
#[derive(Debug)]
pub struct AppError {
    pub code: ApiErrorCode,
    pub message: String,
    pub field: Option<String>,
    /// Sent with `x-should-retry: false`: the request's job was submitted, and a client that retries on
    /// its own (OpenAI's retry 409, 429 and 5xx) would submit it again.
    pub no_retry: bool,
    /// `Retry-After`, in seconds, when the error says how long to wait (a token over its submission rate).
    pub retry_after: Option<u64>,
}

impl AppError {
    pub fn new(code: ApiErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), field: None, no_retry: false, retry_after: None }
    }
    /// The error of a request that has submitted job `id` (a compatible endpoint waiting for its images):
    /// never to be retried automatically, and naming the job, which goes on or has ended.
    pub(super) fn after_submission(mut self, id: uuid::Uuid) -> Self {
        if !self.message.contains(&id.to_string()) {
            self.message = format!("job {id}: {}", self.message);
        }
        self.no_retry = true;
        self
    }
    pub(super) fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(protocol::truncate(&field.into(), 128).to_string());
        self
    }
    pub(super) fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(ApiErrorCode::InvalidRequest, message).field(field)
    }
    pub(super) fn malformed(field: &str, message: impl Into<String>) -> Self {
        Self::new(ApiErrorCode::MalformedRequest, message).field(field)
    }
    pub(super) fn internal(err: impl std::fmt::Display) -> Self {
        Self::new(ApiErrorCode::Internal, err.to_string())
    }
    fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl From<ProtocolError> for AppError {
    fn from(e: ProtocolError) -> Self {
        Self { field: e.field, ..Self::new(ApiErrorCode::InvalidRequest, e.message) }
    }
}

/// The service's errors by kind: the client's (4xx), the backends' (503, retry), the queen's own (500).
impl From<JobsError> for AppError {
    fn from(e: JobsError) -> Self {
        let message = e.to_string();
        match e {
            JobsError::Invalid(e) => e.into(),
            JobsError::TooLarge { field, .. } => Self { field, ..Self::new(ApiErrorCode::PayloadTooLarge, message) },
            JobsError::RateLimited { wait, .. } => Self {
                retry_after: Some(crate::queen::jobs::whole_seconds(wait)),
                ..Self::new(ApiErrorCode::RateLimited, message)
            },
            JobsError::Forbidden { field, .. } => Self { field, ..Self::new(ApiErrorCode::Forbidden, message) },
            JobsError::NotFound(_) | JobsError::NoImage(_) => Self::new(ApiErrorCode::NotFound, message),
            JobsError::Expired(_) => Self::new(ApiErrorCode::Expired, message),
            JobsError::AlreadyFinished { .. } => Self::new(ApiErrorCode::AlreadyFinished, message),
            JobsError::NotCompleted { .. } => Self::new(ApiErrorCode::NotCompleted, message),
            JobsError::Unavailable(_) => Self::new(ApiErrorCode::Unavailable, message),
            JobsError::WaitTimeout { .. } => Self::new(ApiErrorCode::WaitTimeout, message),
            JobsError::JobFailed { .. } => Self::new(ApiErrorCode::JobFailed, message),
            JobsError::Internal(_) => Self::new(ApiErrorCode::Internal, message),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Neither is the queen's failure: a job that goes on, or one that failed on its worker (logged there).
        if matches!(self.code, ApiErrorCode::WaitTimeout | ApiErrorCode::JobFailed) {
            tracing::info!(code = %self.code, "{}", self.message);
        } else if status.is_server_error() {
            tracing::error!(code = %self.code, "{}", self.message);
        }
        let body = ApiErrorBody { error: ApiErrorDetail { code: self.code, message: self.message, field: self.field } };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.code == ApiErrorCode::TooManyStreams {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.code == ApiErrorCode::WaitTimeout || self.no_retry {
            // OpenAI's clients retry a 5xx unless told not to; a retry would submit the job a second time.
            response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

pub(super) type ApiResult<T> = Result<T, AppError>;

/// `Path<T>` whose rejection is an [`AppError`] naming the parameter (`/v1/jobs/abc`: `id` is not a UUID).
pub(super) struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                // The route's parameter names (`/v1/jobs/{id}/images/{n}`), for errors given by position.
                let names: Vec<String> = parts
                    .extensions
                    .get::<axum::extract::MatchedPath>()
                    .map(|p| {
                        p.as_str()
                            .split('/')
                            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default();
                let field = match e.kind() {
                    ErrorKind::ParseErrorAtKey { key, .. }
                    | ErrorKind::InvalidUtf8InPathParam { key }
                    | ErrorKind::DeserializeError { key, .. } => key.clone(),
                    ErrorKind::ParseErrorAtIndex { index, .. } => names.get(*index).cloned().unwrap_or_default(),
                    _ if names.len() == 1 => names[0].clone(),
                    _ => "path".to_string(),
                };
                let message = protocol::truncate(&e.body_text(), protocol::MAX_ERROR_MESSAGE_BYTES).to_string();
                Err(AppError::malformed(&field, message))
            }
            Err(e) => Err(AppError::internal(e.body_text())),
        }
    }
}

/// A query string read into `T`, its rejection an [`AppError`] naming the parameter (`?limit=x`: `limit`).
pub(super) struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AppError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(ApiQuery).map_err(|e| {
            let field = e.path().to_string();
            let mut message = format!("invalid query string: {}", e.into_inner());
            protocol::cut(&mut message, protocol::MAX_ERROR_MESSAGE_BYTES);
            let error = AppError::new(ApiErrorCode::MalformedRequest, message);
            if field == "." || field.is_empty() {
                error
            } else {
                error.field(field)
            }
        })
    }
}

/// Gives every error answer the JSON error body, also those written by axum and tower layers in plain text
/// or with no body: a body over the limit (413), a method not allowed (405), a rejected request body.
pub(super) async fn json_errors(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().clone();
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    use ApiErrorCode as C;
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            (C::PayloadTooLarge, format!("the request body is over the {} byte limit", state.config.max_body_bytes))
        }
        StatusCode::METHOD_NOT_ALLOWED => (C::MethodNotAllowed, format!("{method} is not allowed here")),
        StatusCode::NOT_FOUND => (C::NotFound, "no such endpoint".to_string()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (C::UnsupportedMediaType, text),
        StatusCode::REQUEST_TIMEOUT => (C::RequestTimeout, "the request body did not arrive in time".to_string()),
        StatusCode::UNAUTHORIZED => (C::Unauthorized, text),
        // Empty: the timeout on requests that should have been answered by now.
        StatusCode::SERVICE_UNAVAILABLE if text.is_empty() => {
            (C::Unavailable, "no answer from NATS or the object store in time".to_string())
        }
        StatusCode::SERVICE_UNAVAILABLE => (C::Unavailable, text),
        s if s.is_server_error() => (C::Internal, text),
        StatusCode::UNPROCESSABLE_ENTITY => (C::InvalidRequest, text),
        _ => (C::MalformedRequest, text),
    };
    let message = if message.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { message };
    let mut answer = AppError::new(code, message).into_response();
    // Keep what the layer said beside the body (Allow on a 405, Retry-After, the request id).
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().insert(name, value.clone());
        }
    }
    answer
}

/// A handler that panicked (a bug) still answers with the JSON body, and the queen goes on serving.
pub(super) fn panic_answer(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic");
    // The details are for the log, not for whoever sent the request.
    tracing::error!(panic = protocol::truncate(what, 2000), "a request handler panicked");
    AppError::internal("the request failed inside the queen (a bug: see its log)").into_response()
}
