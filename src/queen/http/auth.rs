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

/// The token of an `Authorization` header: `Bearer TOKEN`, or `Basic` with the token as the password (how
/// AUTOMATIC1111's clients send `--api-auth user:password`; the user name is not checked).
fn presented_token(header: &str) -> Option<String> {
    let (scheme, value) = header.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(value.trim().to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD.decode(value.trim()).ok()?;
        let (_, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        return Some(password.to_string());
    }
    None
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
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let Some(presented) = header.and_then(presented_token) else {
        return AppError::new(ApiErrorCode::Unauthorized, "missing bearer token (Authorization: Bearer <token>)")
            .into_response();
    };
    let presented = presented.as_str();
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

#[cfg(test)]
mod tests {
    use super::presented_token;

    #[test]
    fn bearer_and_basic_headers_present_a_token() {
        assert_eq!(presented_token("Bearer abc ").as_deref(), Some("abc"));
        assert_eq!(presented_token("bearer abc").as_deref(), Some("abc"));
        // "user:the-token"
        assert_eq!(presented_token("Basic dXNlcjp0aGUtdG9rZW4=").as_deref(), Some("the-token"));
        for bad in ["Token abc", "Basic !!!", "Basic dXNlcg==", "Bearer"] {
            assert_eq!(presented_token(bad), None, "{bad}");
        }
    }
}
