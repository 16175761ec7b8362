//! Bearer-token authentication: every token compared, by digest, in constant time. The caller's identity
//! (a digest of its token) scopes its idempotency keys.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{AppError, AppState};
use crate::api::ApiErrorCode;

/// Who sent the request: a digest of its token ("anonymous" without authentication).
#[derive(Clone)]
pub(super) struct Caller(pub String);

fn digest(text: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(text).into()
}

pub(super) async fn authenticate(
    State(state): State<AppState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use subtle::ConstantTimeEq;
    if state.config.tokens.is_empty() {
        req.extensions_mut().insert(Caller("anonymous".into()));
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(presented) = presented else {
        return AppError::new(ApiErrorCode::Unauthorized, "missing bearer token (Authorization: Bearer <token>)")
            .into_response();
    };
    // Compare digests, every token, in constant time: neither the match nor the lengths leak.
    let wanted = digest(presented.as_bytes());
    let mut matched = subtle::Choice::from(0);
    for token in &state.config.tokens {
        matched |= digest(token.as_bytes()).ct_eq(&wanted);
    }
    if !bool::from(matched) {
        return AppError::new(ApiErrorCode::Unauthorized, "invalid bearer token").into_response();
    }
    req.extensions_mut().insert(Caller(hex::encode(&wanted[..12])));
    next.run(req).await
}
