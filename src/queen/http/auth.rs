//! Bearer-token authentication: every token compared, by digest, in constant time. The caller's identity
//! (a digest of its token) scopes its idempotency keys; its token's [`TokenPolicy`] decides the priority
//! of the jobs it submits and the tenant it acts for ([`crate::queen::tenancy`]).

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::error::ApiResult;
use super::streams::StreamSlot;
use super::{AppError, AppState};
use crate::api::{ApiErrorCode, JobSubmission, SubmitResponse, TokenInfo};
use crate::queen::rate::SubmitRate;
use crate::queen::tenancy::Scope;
use crate::queen::Submitter;
use crate::vocab::Priority;

/// The priorities a token's jobs get: `default` for a job that names none, and none above `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriorityPolicy {
    pub default: Priority,
    pub max: Priority,
}

impl Default for PriorityPolicy {
    /// Normal unless asked, any priority may be asked.
    fn default() -> Self {
        Self { default: Priority::Normal, max: Priority::High }
    }
}

impl PriorityPolicy {
    /// The priority a job that asked for `asked` gets, or why it may not have it.
    pub fn apply(&self, asked: Option<Priority>) -> Result<Priority, String> {
        let priority = asked.unwrap_or(self.default);
        // `Priority` orders highest first: a priority "below" max in that order is above what is allowed.
        if priority < self.max {
            return Err(format!(
                "{} is above what this token may ask for (at most {})",
                priority.as_str(),
                self.max.as_str()
            ));
        }
        Ok(priority)
    }

    /// Made from the `default_priority` and `max_priority` options, if given; the default may not be above
    /// the maximum.
    fn from_options(default: Option<Priority>, max: Option<Priority>) -> Result<Self, String> {
        let max = max.unwrap_or(Self::default().max);
        // Without a default, a token limited to low gets low, not an error on every job.
        let default = default.unwrap_or(Self::default().default.max(max));
        if default < max {
            return Err(format!("default_priority={} is above max_priority={}", default.as_str(), max.as_str()));
        }
        Ok(Self { default, max })
    }
}

/// What a token may do: the priorities of its jobs, the tenant it acts for (`None`: an operator's token,
/// which sees every job), and how fast it may submit jobs (`None`: as fast as it likes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenPolicy {
    pub priority: PriorityPolicy,
    pub tenant: Option<String>,
    pub submit_rate: Option<SubmitRate>,
}

impl TokenPolicy {
    /// `default_priority=P`, `max_priority=P`, `tenant=NAME` and `submit_rate=N/s|N/min|N/h` options, as a
    /// `--token-file` line carries them after its token.
    pub fn parse<'a>(options: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let (mut default, mut max, mut tenant, mut submit_rate) = (None, None, None, None);
        for option in options {
            let priority = |v: &str| {
                Priority::ALL
                    .into_iter()
                    .find(|p| p.as_str() == v)
                    .ok_or_else(|| format!("{v:?} is not a priority (high, normal, low)"))
            };
            let slot = match option.split_once('=') {
                Some(("default_priority", v)) => default.replace(priority(v)?).map(drop),
                Some(("max_priority", v)) => max.replace(priority(v)?).map(drop),
                Some(("tenant", v)) => {
                    crate::protocol::validate_tenant("tenant", v).map_err(|e| e.message)?;
                    tenant.replace(v.to_string()).map(drop)
                }
                Some(("submit_rate", v)) => submit_rate.replace(SubmitRate::parse(v)?).map(drop),
                _ => {
                    return Err(format!(
                        "{option:?} is not an option (default_priority=P, max_priority=P, tenant=NAME, \
                         submit_rate=N/s|N/min|N/h)"
                    ))
                }
            };
            if slot.is_some() {
                return Err(format!("{option:?}: the option is given twice"));
            }
        }
        Ok(Self { priority: PriorityPolicy::from_options(default, max)?, tenant, submit_rate })
    }
}

/// Who sent the request: a digest of its token ("anonymous" without authentication), what its token may
/// ask for, and whose jobs it sees.
#[derive(Clone)]
pub(super) struct Caller {
    pub id: String,
    pub priority: PriorityPolicy,
    pub scope: Scope,
    pub submit_rate: Option<SubmitRate>,
    /// Whether the queen checked a token (it checks none while it has none: `--no-auth`).
    pub authenticated: bool,
}

impl Caller {
    /// Submits `sub` as this caller: its priority as the token's policy says, its idempotency key scoped to
    /// the caller. Every way in (the native API, OpenAI's, AUTOMATIC1111's) submits through this.
    pub async fn submit(
        &self,
        state: &AppState,
        mut sub: JobSubmission,
        idempotency_key: Option<String>,
    ) -> ApiResult<SubmitResponse> {
        sub.priority = Some(self.priority.apply(sub.priority).map_err(|e| AppError::invalid("priority", e))?);
        let who = Submitter { id: self.id.clone(), scope: self.scope.clone(), rate: self.submit_rate };
        Ok(state.jobs.submit(&who, sub, idempotency_key).await?)
    }

    /// Refuses a tenant's token what only operators may see (`what`: the fleet's workers, the metrics).
    pub fn operator_only(&self, what: &str) -> ApiResult<()> {
        match &self.scope {
            Scope::All => Ok(()),
            Scope::Tenant(t) => Err(AppError::new(
                ApiErrorCode::Forbidden,
                format!("{what} are for operators' tokens; this token is tenant {t}'s"),
            )),
        }
    }

    /// A place for one more open stream of this caller ([`super::streams`]), held until the slot is dropped.
    pub fn open_stream(&self, state: &AppState) -> ApiResult<Option<StreamSlot>> {
        if !self.authenticated {
            return Ok(None);
        }
        let max = state.config.max_streams_per_caller;
        state.streams.open(&self.id, max).map(Some).map_err(|held| {
            AppError::new(
                ApiErrorCode::TooManyStreams,
                format!(
                    "this token already holds {held} open event streams or waiting requests, the most the queen \
                     allows one token (--max-streams-per-caller {max}); close one, or follow fewer jobs at once"
                ),
            )
        })
    }
}

/// `GET /v1/me`: what the presented token may do.
#[utoipa::path(get, path = "/v1/me", tag = "fleet", responses((status = 200, body = TokenInfo)), security(("bearer" = [])))]
pub(super) async fn me(Extension(caller): Extension<Caller>) -> Json<TokenInfo> {
    Json(TokenInfo {
        tenant: caller.scope.tenant().map(str::to_string),
        default_priority: caller.priority.default,
        max_priority: caller.priority.max,
        submit_rate: caller.submit_rate.map(|r| r.to_string()),
        authenticated: caller.authenticated,
    })
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
    // The table in force for this request (a reload in between does not split it).
    let table = state.tokens.current();
    if table.tokens.is_empty() {
        let (priority, scope, submit_rate) = (PriorityPolicy::default(), Scope::All, None);
        let anonymous = Caller { id: "anonymous".into(), priority, scope, submit_rate, authenticated: false };
        req.extensions_mut().insert(anonymous);
        return next.run(req).await;
    }
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let Some(presented) = header.and_then(presented_token) else {
        return AppError::new(ApiErrorCode::Unauthorized, "missing bearer token (Authorization: Bearer <token>)")
            .into_response();
    };
    let presented = presented.as_str();
    // Compare digests, every token's, in constant time: neither the match nor the lengths leak.
    let wanted = super::tokens::digest(presented.as_bytes());
    if !table.holds(&wanted) {
        return AppError::new(ApiErrorCode::Unauthorized, "invalid bearer token").into_response();
    }
    // A valid token now: its policy, if it has one.
    let policy = table.policies.get(presented).cloned().unwrap_or_default();
    let (priority, scope, submit_rate) =
        (policy.priority, policy.tenant.map_or(Scope::All, Scope::Tenant), policy.submit_rate);
    let id = hex::encode(&wanted[..12]);
    req.extensions_mut().insert(Caller { id, priority, scope, submit_rate, authenticated: true });
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::{presented_token, PriorityPolicy, TokenPolicy};
    use crate::vocab::Priority::{High, Low, Normal};

    #[test]
    fn a_token_policy_sets_the_default_and_caps_the_priority_and_names_the_tenant() {
        let priority = |options: &[&str]| TokenPolicy::parse(options.iter().copied()).map(|p| p.priority);
        let any = PriorityPolicy::default();
        assert_eq!((any.apply(None), any.apply(Some(High))), (Ok(Normal), Ok(High)));
        let limited = priority(&["max_priority=normal"]).unwrap();
        assert_eq!(limited, PriorityPolicy { default: Normal, max: Normal });
        assert_eq!(limited.apply(Some(Low)), Ok(Low));
        let err = limited.apply(Some(High)).unwrap_err();
        assert!(err.contains("high") && err.contains("at most normal"), "{err}");
        // A token held to low gets low by default rather than an error on every job.
        assert_eq!(priority(&["max_priority=low"]).unwrap().apply(None), Ok(Low));
        let batch = priority(&["default_priority=low"]).unwrap();
        assert_eq!((batch.apply(None), batch.apply(Some(High))), (Ok(Low), Ok(High)));
        assert_eq!(TokenPolicy::parse([]).unwrap(), TokenPolicy::default());
        let tenant = TokenPolicy::parse(["tenant=acme", "max_priority=normal"]).unwrap();
        assert_eq!((tenant.tenant.as_deref(), tenant.priority.max), (Some("acme"), Normal));
        let limited = TokenPolicy::parse(["submit_rate=30/min"]).unwrap();
        assert_eq!(limited.submit_rate.map(|r| r.jobs.get()), Some(30));
        for (bad, says) in [
            (vec!["default_priority=high", "max_priority=normal"], "above max_priority"),
            (vec!["max_priority=urgent"], "not a priority"),
            (vec!["priority=low"], "not an option"),
            (vec!["tenant=a/b"], "not a tenant name"),
            (vec!["tenant="], "not a tenant name"),
            (vec!["tenant=a", "tenant=b"], "given twice"),
            (vec!["submit_rate=3/day"], "not a rate"),
        ] {
            let err = TokenPolicy::parse(bad.clone()).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

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
