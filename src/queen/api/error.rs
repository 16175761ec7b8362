//! The API's one error shape, `{"error": {"code", "message", "field"}}`: [`AppError`] for what the handlers
//! refuse, the extractors [`ApiPath`] and [`ApiQuery`] for what axum's own would answer in plain text, and
//! [`json_errors`] for whatever else a layer answers (a body over the limit, a method not allowed).

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use uuid::Uuid;

use super::AppState;
use crate::protocol::{self, ProtocolError};

/// An API error: status, code, message and the offending field.
#[derive(Debug)]
pub struct AppError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl AppError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None }
    }
    pub(super) fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
    pub(super) fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "INVALID_REQUEST", message).field(field)
    }
    pub(super) fn not_found(job_id: Uuid) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", format!("no job {job_id}"))
    }
    pub(super) fn internal(err: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", err.to_string())
    }
    pub(super) fn unavailable(err: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", err.to_string())
    }
}

impl From<ProtocolError> for AppError {
    fn from(e: ProtocolError) -> Self {
        let status = if e.code == protocol::ErrorCode::InvalidRequest {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        Self { status, code: e.code.as_str(), message: e.message, field: e.field }
    }
}

/// Every error that reaches a handler as `anyhow::Error` comes from a backend (NATS, its streams and bucket, the
/// object store): the request may succeed when retried, so it is a 503, not a 500.
impl From<anyhow::Error> for AppError {
    fn from(e: anyhow::Error) -> Self {
        Self::unavailable(format!("{e:#}"))
    }
}

/// The shape of every error response (for the OpenAPI document).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ApiErrorBody {
    pub error: ApiErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ApiErrorDetail {
    /// E.g. INVALID_REQUEST, UNAUTHORIZED, NOT_FOUND, PAYLOAD_TOO_LARGE.
    pub code: String,
    pub message: String,
    /// The offending field, when there is one (`width`, `init_image`, `output.quality`).
    pub field: Option<String>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, "{}", self.message);
        }
        let body =
            ErrorBody { error: ErrorDetail { code: self.code, message: &self.message, field: self.field.as_deref() } };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
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
                Err(AppError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message).field(field))
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
            let error = AppError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message);
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
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ("PAYLOAD_TOO_LARGE", format!("the request body is over the {} byte limit", state.config.max_body_bytes))
        }
        StatusCode::METHOD_NOT_ALLOWED => ("METHOD_NOT_ALLOWED", format!("{method} is not allowed here")),
        StatusCode::NOT_FOUND => ("NOT_FOUND", "no such endpoint".to_string()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("UNSUPPORTED_MEDIA_TYPE", text),
        StatusCode::REQUEST_TIMEOUT => ("REQUEST_TIMEOUT", "the request body did not arrive in time".to_string()),
        StatusCode::UNAUTHORIZED => ("UNAUTHORIZED", text),
        s if s.is_server_error() => ("INTERNAL", text),
        _ => ("INVALID_REQUEST", text),
    };
    let message = if message.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { message };
    let mut answer = AppError::new(status, code, message).into_response();
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
