//! Request bodies read whole, within `--body-timeout` from the first byte to the last, before a handler
//! runs. The idle timeout of tower-http's `RequestBodyTimeoutLayer` restarts with every chunk, so a client
//! sending a byte a minute held a connection and its handler for as long as it liked; and axum's extractors
//! answer that timeout as an unreadable body (400), not the contract's 408.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppError, AppState};
use crate::api::ApiErrorCode;

/// Reads the body (at most `--max-body-bytes`) within `--body-timeout`, then hands the request on with it.
pub(super) async fn read_whole(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let (limit, patience) = (state.config.max_body_bytes, state.config.body_timeout);
    let bytes = match tokio::time::timeout(patience, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            let mut too_large = false;
            while let Some(c) = cause {
                too_large |= c.is::<http_body_util::LengthLimitError>();
                cause = c.source();
            }
            let error = if too_large {
                AppError::new(ApiErrorCode::PayloadTooLarge, format!("the request body is over the {limit} byte limit"))
            } else {
                AppError::new(ApiErrorCode::MalformedRequest, format!("the request body could not be read: {e}"))
            };
            return error.into_response();
        }
        Err(_) => {
            let waited = humantime::format_duration(patience);
            let message = format!("the request body did not arrive within {waited} (--body-timeout)");
            return AppError::new(ApiErrorCode::RequestTimeout, message).into_response();
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}
