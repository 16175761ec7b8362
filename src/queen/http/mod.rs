//! The queen's HTTP API (axum), versioned under `/v1`, and the web UI at `/`, over the job service ([`Jobs`]): [`app`] builds the
//! router from an [`AppState`] so tests serve it on a free port. The contract (bodies, error codes, events)
//! is [`crate::api`]; this module only serves it.
//!
//! # Layout
//!
//! - this file: [`AppState`], [`ApiConfig`], the router and its layers;
//! - `auth`: bearer tokens, compared in constant time, and what each may do; `tokens`: where they come
//!   from, read again when the token file changes;
//! - `error`: [`AppError`] and the extractors that answer with the API's error body;
//! - `jobs`: submit, upload, status, list, cancel, images;
//! - `events`: the Server-Sent Events of a job, resumable with `Last-Event-ID`;
//! - `fleet`: models, workers, limits, health and readiness;
//! - `metrics`: `/metrics` in the Prometheus text format;
//! - `openapi`: the OpenAPI document;
//! - `openai`, `a1111`: OpenAI's image API and AUTOMATIC1111's, over the same jobs and tokens;
//! - `ui`: the web UI's embedded bundle, served at `/`.

mod a1111;
mod auth;
mod body;
mod compat;
mod error;
mod events;
mod fleet;
mod jobs;
mod metrics;
mod openai;
mod openapi;
mod streams;
mod tokens;
mod ui;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tokio_util::sync::CancellationToken;

use super::jobs::Jobs;
use crate::api::ApiErrorCode;
use crate::protocol::{self, Limits};
pub use auth::{PriorityPolicy, TokenPolicy};
pub use error::AppError;
pub use openapi::ApiDoc;
pub use tokens::{hangups as token_hangups, load_tokens, watch as tokens_watch, TokenSource, TokenTable, Tokens};

/// What the handlers need; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub jobs: Jobs,
    pub config: Arc<ApiConfig>,
    /// Cancelled when the queen shuts down: open event streams end so the server can stop.
    pub shutdown: CancellationToken,
    /// The newest job each caller sent through the A1111 endpoints (what `/sdapi/v1/progress` reports).
    pub a1111_jobs: Arc<parking_lot::Mutex<std::collections::HashMap<String, uuid::Uuid>>>,
    /// The event streams each caller holds open.
    pub streams: streams::OpenStreams,
    /// The tokens in force: `config`'s at the start, then the token file's as it changes.
    pub tokens: TokenTable,
}

/// The API's policy.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Bearer tokens at the start (those in force are [`AppState::tokens`]); empty: no authentication (only
    /// with `--no-auth`).
    pub tokens: Vec<String>,
    /// The policies of some tokens (by token): their jobs' priorities, their tenant. The others: normal
    /// unless asked, any priority may be asked, and an operator's view of every job.
    pub token_policies: std::collections::HashMap<String, TokenPolicy>,
    /// Where `tokens` came from, to read them again when the token file changes (`None`: never).
    pub token_source: Option<TokenSource>,
    pub limits: Limits,
    /// Largest request body (JSON with inline images, or an upload).
    pub max_body_bytes: usize,
    /// Longest a request body may take to arrive (a client that trickles one holds a connection).
    pub body_timeout: Duration,
    /// Refuse jobs for models that are not in the fleet's catalogue (see [`crate::queen::jobs::ModelPolicy`]).
    pub require_served_model: bool,
    /// Models jobs may always name, whether a worker serves them now or not (`--model-catalogue`).
    pub model_catalogue: Vec<String>,
    /// How long a model stays in the catalogue after the last worker serving it was heard of.
    pub model_retention: Duration,
    /// Origins allowed by CORS; empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// The model of OpenAI and A1111 requests that name none (or name one of OpenAI's); `None`: the only
    /// model of the catalogue.
    pub compat_model: Option<String>,
    /// Longest an OpenAI or A1111 request waits for its job's end before answering `WAIT_TIMEOUT` (504) with
    /// the job's id; clients and proxies in front give up on their own clocks too.
    pub compat_wait: Duration,
    /// The most event streams (and OpenAI or A1111 requests waiting for their jobs) one token may hold open
    /// at once; without authentication, no cap.
    pub max_streams_per_caller: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            token_policies: Default::default(),
            token_source: None,
            limits: Limits::default(),
            max_body_bytes: 16 * 1024 * 1024,
            body_timeout: Duration::from_secs(60),
            require_served_model: true,
            model_catalogue: Vec::new(),
            model_retention: Duration::from_secs(7 * 24 * 3600),
            cors_origins: Vec::new(),
            compat_model: None,
            compat_wait: Duration::from_secs(600),
            max_streams_per_caller: 64,
        }
    }
}

/// Beyond the body's own timeout, how long a request may wait on NATS and the object store (each call has its
/// own limits; this one holds when a queue in front of them does not move).
const BACKEND_PATIENCE: Duration = Duration::from_secs(120);

/// The whole HTTP API.
pub fn app(state: AppState) -> Router {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    let authenticated = || axum::middleware::from_fn_with_state(state.clone(), auth::authenticate);
    // Bodies are read whole within --body-timeout once the caller is known (body.rs).
    let read_whole = || axum::middleware::from_fn_with_state(state.clone(), body::read_whole);
    // Every answer but a stream's or a wait for a job's end comes within a bound, even when NATS's
    // connection is down long enough for its command queue to fill (then its calls wait for the reconnect).
    // Past it, `UNAVAILABLE` (an empty 503 that `json_errors` writes as the API's error).
    // The body is read before this (body.rs): its own --body-timeout, then this.
    let limit = BACKEND_PATIENCE;
    let bounded = || tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, limit);
    let v1 = Router::new()
        .route("/jobs", post(jobs::submit).get(jobs::list))
        .route("/jobs/{id}", get(jobs::status).delete(jobs::cancel))
        .route("/jobs/{id}/images/{n}", get(jobs::image))
        .route("/uploads", post(jobs::upload))
        .route("/models", get(fleet::models))
        .route("/workers", get(fleet::workers))
        .route("/limits", get(fleet::limits))
        .route("/me", get(auth::me))
        .route_layer(bounded())
        .route("/jobs/{id}/events", get(events::events))
        .route("/images/generations", post(openai::generations))
        .route("/images/edits", post(openai::edits))
        .route_layer(read_whole())
        .route_layer(authenticated());
    let sdapi = Router::new()
        .route("/sd-models", get(a1111::models))
        .route("/samplers", get(a1111::samplers))
        .route("/progress", get(a1111::progress))
        .route_layer(bounded())
        .route("/txt2img", post(a1111::txt2img))
        .route("/img2img", post(a1111::img2img))
        .route_layer(read_whole())
        .route_layer(authenticated());
    let mut router = Router::new()
        .nest("/v1", v1)
        .nest("/sdapi/v1", sdapi)
        .route("/metrics", get(metrics::metrics).route_layer(bounded()).route_layer(authenticated()))
        .route("/health", get(fleet::health))
        .route("/openapi.json", get(openapi::openapi))
        .route("/ready", get(fleet::ready))
        .fallback(|method: Method, uri: Uri| async move {
            ui::serve(&method, &uri)
                .unwrap_or_else(|| AppError::new(ApiErrorCode::NotFound, "no such endpoint").into_response())
        })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), error::json_errors))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(error::panic_answer));
    if !state.config.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = state.config.cors_origins.iter().filter_map(|o| o.parse().ok()).collect();
        router = router.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods(tower_http::cors::Any)
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    "idempotency-key".parse().unwrap(),
                    "last-event-id".parse().unwrap(),
                ])
                // Not safelisted, so a page on another origin cannot read them unless they are exposed: how
                // long to wait before a retry, and that a retry would submit the job again.
                .expose_headers([header::RETRY_AFTER, "x-should-retry".parse().unwrap()]),
        );
    }
    router
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
            // Both come from the client: logged short.
            let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
            let (id, path) = (protocol::truncate(id, 128), protocol::truncate(req.uri().path(), 256));
            tracing::info_span!("http", method = %req.method(), path = %path, request_id = %id)
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}
