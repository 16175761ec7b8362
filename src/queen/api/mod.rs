//! The queen's HTTP API (axum), versioned under `/v1`: submit, status, Server-Sent Events, cancel, list,
//! images, uploads, models, workers; `/health`, `/ready` and `/metrics` beside it. [`app`] builds the
//! router from an [`AppState`] so tests serve it on a free port. Every error is one JSON shape,
//! `{"error": {"code", "message", "field"}}`, from [`AppError`] (`error.rs`); `metrics.rs` writes `/metrics`.

mod error;
mod metrics;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::aggregator::ModelStats;
use super::fleet::Fleet;
use super::status::{idempotency_entry, JobState, JobStatus, StatusStore};
use crate::client::BusClient;
use crate::image_input::ResizeMode;
use crate::protocol::{self, Event, ImageFormat, ImageSource, JobKind, JobRequest, Limits};
use crate::storage::Store;
pub use error::{ApiErrorBody, ApiErrorDetail, AppError};
use error::{ApiPath, ApiQuery, ApiResult};

/// What the API needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub bus: BusClient,
    pub status: StatusStore,
    pub store: Store,
    pub fleet: Fleet,
    pub stats: ModelStats,
    pub config: Arc<ApiConfig>,
    /// Cancelled when the queen shuts down: open event streams end so the server can stop.
    pub shutdown: tokio_util::sync::CancellationToken,
    pub started: std::time::Instant,
    /// Until the queen has been up this long it has not heard every worker yet: it does not refuse
    /// models as unserved.
    pub fleet_warmup: Duration,
}

/// The API's policy.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Bearer tokens; empty: no authentication (only with `--no-auth`).
    pub tokens: Vec<String>,
    pub limits: Limits,
    /// Largest request body (JSON with inline images, or an upload).
    pub max_body_bytes: usize,
    /// Longest a request body may take to arrive (a client that trickles one holds a connection).
    pub body_timeout: Duration,
    /// Refuse jobs for models no live worker serves.
    pub require_served_model: bool,
    /// Origins allowed by CORS; empty: no CORS headers.
    pub cors_origins: Vec<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            limits: Limits::default(),
            max_body_bytes: 16 * 1024 * 1024,
            body_timeout: Duration::from_secs(60),
            require_served_model: true,
            cors_origins: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------------------------------------

/// The OpenAPI document of this API, generated from the handlers' and types' definitions.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "sd-rbee queen", description = "Stable Diffusion jobs on a worker fleet"),
    paths(submit, upload, job_status, list_jobs, cancel_job, job_image, job_events, models, workers, health, ready, metrics::metrics),
    components(schemas(ApiErrorBody, ApiErrorDetail, JobSubmission, ImageInput, SubmitResponse, StatusView, JobList,
        CancelResponse, UploadResponse, ModelInfo)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    use utoipa::OpenApi;
    Json(ApiDoc::openapi())
}

/// The whole HTTP API.
pub fn app(state: AppState) -> Router {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    let v1 = Router::new()
        .route("/jobs", post(submit).get(list_jobs))
        .route("/jobs/{id}", get(job_status).delete(cancel_job))
        .route("/jobs/{id}/events", get(job_events))
        .route("/jobs/{id}/images/{n}", get(job_image))
        .route("/uploads", post(upload))
        .route("/models", get(models))
        .route("/workers", get(workers))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authenticate));
    let mut router = Router::new()
        .nest("/v1", v1)
        .route(
            "/metrics",
            get(metrics::metrics).route_layer(axum::middleware::from_fn_with_state(state.clone(), authenticate)),
        )
        .route("/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/ready", get(ready))
        .fallback(|| async { AppError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint") })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(state.config.body_timeout))
        .layer(axum::middleware::from_fn_with_state(state.clone(), error::json_errors))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(error::panic_answer));
    if !state.config.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = state.config.cors_origins.iter().filter_map(|o| o.parse().ok()).collect();
        router = router.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods(tower_http::cors::Any)
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, "idempotency-key".parse().unwrap()]),
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

/// The caller's identity for idempotency keys: a digest of its token.
#[derive(Clone)]
struct Caller(String);

fn digest(text: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(text).into()
}

async fn authenticate(
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
        return AppError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "missing bearer token (Authorization: Bearer <token>)",
        )
        .into_response();
    };
    // Compare digests, every token, in constant time: neither the match nor the lengths leak.
    let wanted = digest(presented.as_bytes());
    let mut matched = subtle::Choice::from(0);
    for token in &state.config.tokens {
        matched |= digest(token.as_bytes()).ct_eq(&wanted);
    }
    if !bool::from(matched) {
        return AppError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "invalid bearer token").into_response();
    }
    req.extensions_mut().insert(Caller(hex::encode(&wanted[..12])));
    next.run(req).await
}

// ---------------------------------------------------------------------------------------------------------
// Submissions
// ---------------------------------------------------------------------------------------------------------

/// An input image: base64 (optionally a `data:` URL), or a key returned by `POST /v1/uploads`.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ImageInput {
    Base64(String),
    Upload { object_key: String },
}

fn default_size() -> u32 {
    crate::vocab::DEFAULT_SIZE
}
fn default_one() -> u32 {
    crate::vocab::DEFAULT_NUM_IMAGES
}

/// The body of `POST /v1/jobs`: txt2img, img2img (with `init_image`) and inpaint (with `mask`) in one
/// schema. Unknown fields are an error.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSubmission {
    /// Inferred from the images when absent.
    #[serde(default)]
    pub kind: Option<JobKind>,
    pub model: String,
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default = "default_size")]
    pub width: u32,
    #[serde(default = "default_size")]
    pub height: u32,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub guidance: Option<f64>,
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default = "default_one")]
    pub num_images: u32,
    #[serde(default)]
    pub init_image: Option<ImageInput>,
    #[serde(default)]
    pub mask: Option<ImageInput>,
    #[serde(default)]
    pub strength: Option<f64>,
    #[serde(default)]
    pub mask_blur: Option<u32>,
    #[serde(default)]
    pub invert_mask: bool,
    #[serde(default)]
    pub paste_back: Option<bool>,
    #[serde(default)]
    pub resize_mode: Option<ResizeMode>,
    #[serde(default)]
    pub output_format: Option<ImageFormat>,
    #[serde(default)]
    pub quality: Option<u8>,
    /// Seconds after which the job is worthless (it fails with TIMEOUT).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// LoRAs to apply, by catalogue name (see `GET /v1/models`), in order.
    #[serde(default)]
    pub loras: Vec<protocol::LoraRef>,
    /// A1111's clip skip (1 = the last layer); SD 1.x/2.x models only.
    #[serde(default)]
    pub clip_skip: Option<u32>,
}

impl JobSubmission {
    pub fn new(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        serde_json::from_value(serde_json::json!({"model": model.into(), "prompt": prompt.into()}))
            .expect("a minimal submission deserializes")
    }

    /// The same job as an HTTP submission (inline images as base64), the converse of `job_of` below: a field
    /// added to one is added to both here. `timeout` becomes `timeout_s`.
    pub fn of_job(job: &JobRequest, timeout: Option<Duration>) -> Self {
        use base64::Engine;
        let image = |s: &Option<ImageSource>| match s {
            Some(ImageSource::Inline(bytes)) => {
                Some(ImageInput::Base64(base64::engine::general_purpose::STANDARD.encode(bytes)))
            }
            Some(ImageSource::ObjectKey(k)) => Some(ImageInput::Upload { object_key: k.clone() }),
            None => None,
        };
        let mut sub = Self::new(job.model.clone(), job.prompt.clone());
        sub.kind = Some(job.kind);
        sub.negative_prompt = job.negative_prompt.clone();
        sub.width = job.width;
        sub.height = job.height;
        sub.steps = job.steps;
        sub.guidance = job.guidance;
        sub.scheduler = job.scheduler.clone();
        sub.timestep_spacing = job.timestep_spacing.clone();
        sub.seed = job.seed;
        sub.num_images = job.num_images;
        sub.init_image = image(&job.init_image);
        sub.mask = image(&job.mask);
        sub.strength = job.strength;
        sub.mask_blur = Some(job.mask_blur);
        sub.invert_mask = job.invert_mask;
        sub.paste_back = Some(job.paste_back);
        sub.resize_mode = Some(job.resize_mode);
        sub.output_format = Some(job.output.format);
        sub.quality = job.output.quality;
        sub.timeout_s = timeout.map(|d| d.as_secs().max(1));
        sub.loras = job.loras.clone();
        sub.clip_skip = job.clip_skip;
        sub
    }
}

/// `202 Accepted` to a submission.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubmitResponse {
    pub job_id: Uuid,
    pub status_url: String,
    pub events_url: String,
    /// False when an idempotency key mapped the request to an earlier job.
    pub created: bool,
}

async fn image_source(state: &AppState, input: &ImageInput, field: &str) -> ApiResult<ImageSource> {
    match input {
        ImageInput::Base64(text) => {
            let bytes = crate::image_input::decode_base64(text, field)
                .map_err(|e| AppError::invalid(field, format!("{e:#}")))?;
            if bytes.len() > state.config.limits.max_inline_image_bytes {
                return Err(AppError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "PAYLOAD_TOO_LARGE",
                    format!(
                        "{field} is {} bytes, over the {} byte limit for inline images (upload it instead)",
                        bytes.len(),
                        state.config.limits.max_inline_image_bytes
                    ),
                )
                .field(field));
            }
            let bytes = Bytes::from(bytes);
            crate::image_input::decode_bounded(bytes.clone(), field).await.map_err(|e| decode_error(field, e))?;
            Ok(ImageSource::Inline(bytes.into()))
        }
        ImageInput::Upload { object_key } => {
            // The key is checked before any store sees it; what the store then refuses as a key is the
            // client's error too, and only an unreachable store is ours.
            protocol::validate_object_key(field, object_key)?;
            match state.store.size(object_key).await {
                Ok(Some(size)) if size > crate::image_input::MAX_ENCODED_BYTES as u64 => {
                    return Err(AppError::invalid(
                        field,
                        format!(
                            "upload {} is {size} bytes, over the {} MiB limit for input images",
                            protocol::quoted(object_key),
                            crate::image_input::MAX_ENCODED_BYTES >> 20
                        ),
                    ))
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(AppError::invalid(
                        field,
                        format!("upload {} does not exist", protocol::quoted(object_key)),
                    ))
                }
                Err(e @ crate::storage::StoreError::InvalidKey { .. }) => {
                    return Err(AppError::invalid(field, e.to_string()))
                }
                Err(e) => return Err(AppError::unavailable(e)),
            }
            Ok(ImageSource::ObjectKey(object_key.clone()))
        }
    }
}

/// An image that does not decode is the client's error (422); decoders all busy is the queen's (503).
fn decode_error(field: &str, e: anyhow::Error) -> AppError {
    if e.is::<crate::image_input::DecodeBusy>() {
        return AppError::unavailable(e);
    }
    AppError::invalid(field, format!("{e:#}"))
}

/// Builds and checks the job: the protocol's rules, the images, and a model the fleet serves.
async fn job_of(state: &AppState, sub: JobSubmission) -> ApiResult<JobRequest> {
    let kind = match (sub.kind, &sub.init_image, &sub.mask) {
        (Some(k), _, _) => k,
        (None, None, _) => JobKind::Txt2Img,
        (None, Some(_), None) => JobKind::Img2Img,
        (None, Some(_), Some(_)) => JobKind::Inpaint,
    };
    let mut job = JobRequest::new(kind, sub.model, sub.prompt);
    job.negative_prompt = sub.negative_prompt;
    job.width = sub.width;
    job.height = sub.height;
    job.steps = sub.steps;
    job.guidance = sub.guidance;
    job.scheduler = sub.scheduler;
    job.timestep_spacing = sub.timestep_spacing;
    job.seed = sub.seed;
    job.num_images = sub.num_images;
    job.strength = sub.strength;
    if let Some(blur) = sub.mask_blur {
        job.mask_blur = blur;
    }
    job.invert_mask = sub.invert_mask;
    if let Some(p) = sub.paste_back {
        job.paste_back = p;
    }
    job.resize_mode = sub.resize_mode.unwrap_or_default();
    job.output.format = sub.output_format.unwrap_or_default();
    job.output.quality = sub.quality;
    job.loras = sub.loras;
    job.clip_skip = sub.clip_skip;
    job.deadline = sub.timeout_s.map(|s| job.created_at.saturating_add(s.saturating_mul(1000)));
    // The cheap rules first, then the images (placeholders keep the kind rules checkable).
    let placeholder = |i: &Option<ImageInput>| i.as_ref().map(|_| ImageSource::Inline(vec![0]));
    job.init_image = placeholder(&sub.init_image);
    job.mask = placeholder(&sub.mask);
    job.validate(&state.config.limits)?;
    if let Some(input) = &sub.init_image {
        job.init_image = Some(image_source(state, input, "init_image").await?);
    }
    if let Some(input) = &sub.mask {
        job.mask = Some(image_source(state, input, "mask").await?);
    }
    job.validate(&state.config.limits)?;
    if state.config.require_served_model && !model_is_served(state, &job.model).await {
        let served: Vec<String> = state.fleet.models(protocol::now_millis()).into_iter().map(|m| m.name).collect();
        let listed = match served.len() {
            0 => "none".to_string(),
            n if n <= 10 => served.join(", "),
            n => format!("{}, and {} more", served[..10].join(", "), n - 10),
        };
        return Err(AppError::invalid(
            "model",
            format!("no live worker serves model {} (served now: {listed})", protocol::quoted(&job.model)),
        ));
    }
    Ok(job)
}

/// Whether a live worker serves `model`. Until the queen has been up long enough to have heard every
/// worker's heartbeat, a model whose job consumer exists (some worker served it) counts as served.
async fn model_is_served(state: &AppState, model: &str) -> bool {
    if state.fleet.serving(model, protocol::now_millis()) > 0 {
        return true;
    }
    if state.started.elapsed() >= state.fleet_warmup {
        return false;
    }
    let Ok(stream) = state.bus.jetstream().get_stream(state.bus.subjects().jobs_stream()).await else {
        return false;
    };
    stream.consumer_info(crate::bus::consumer_name(model)).await.is_ok()
}

fn parse_body<T: serde::de::DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> ApiResult<T> {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|t| t.starts_with("application/json"));
    if !json_type {
        return Err(AppError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "send application/json",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." { None } else { Some(path) };
        let status = if inner.is_syntax() || inner.is_eof() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        // serde_json quotes what it could not read: keep the message short whatever the body held.
        let mut message = format!("invalid JSON body: {inner}");
        protocol::cut(&mut message, protocol::MAX_ERROR_MESSAGE_BYTES);
        let field = field.map(|f| protocol::truncate(&f, 128).to_string());
        AppError { status, code: "INVALID_REQUEST", message, field }
    })
}

fn urls(job_id: Uuid) -> (String, String) {
    (format!("/v1/jobs/{job_id}"), format!("/v1/jobs/{job_id}/events"))
}

#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = JobSubmission,
    params(("Idempotency-Key" = Option<String>, Header, description = "maps a retried request to the same job")),
    responses((status = 202, description = "queued", body = SubmitResponse),
        (status = 200, description = "an earlier job with this idempotency key", body = SubmitResponse),
        (status = 400, body = ApiErrorBody), (status = 401, body = ApiErrorBody), (status = 413, body = ApiErrorBody),
        (status = 415, body = ApiErrorBody), (status = 422, body = ApiErrorBody)),
    security(("bearer" = [])))]
async fn submit(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let sub: JobSubmission = parse_body(&headers, &body)?;
    let mut job = job_of(&state, sub).await?;
    let idem = match headers.get("idempotency-key") {
        Some(v) => {
            let key =
                v.to_str().map_err(|_| AppError::invalid("Idempotency-Key", "must be visible ASCII"))?.to_string();
            job.idempotency_key = Some(key.clone());
            job.validate(&state.config.limits)?;
            Some(idempotency_entry(&caller.0, &key))
        }
        None => None,
    };
    if let Some(entry) = &idem {
        let owner = state.status.claim_idempotency(entry, job.id).await?;
        if owner != job.id {
            let (status_url, events_url) = urls(owner);
            let body = SubmitResponse { job_id: owner, status_url, events_url, created: false };
            return Ok((StatusCode::OK, Json(body)).into_response());
        }
    }
    // NATS refuses messages over its max_payload (1 MiB by default): say so at once, counting what will be
    // sent (the headers too, as long as a requeued copy's), instead of failing later.
    let max_payload = state.bus.nats().max_payload();
    let size = crate::bus::job_message_size(job.id, protocol::encode(&job).len());
    if size > max_payload {
        if let Some(entry) = &idem {
            state.status.release_idempotency(entry).await;
        }
        return Err(AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!(
                "the job is {size} bytes as a bus message (with its inline images and headers), over the bus's \
                 {max_payload} byte message limit: upload the images (POST /v1/uploads) and send their object keys"
            ),
        ));
    }
    // The record exists before any worker can report on the job.
    if let Err(e) = state.status.create(&JobStatus::queued(&job, None)).await {
        if let Some(entry) = &idem {
            state.status.release_idempotency(entry).await;
        }
        return Err(e.into());
    }
    let published = state.bus.submit_with_seq(&job).await;
    let seq = match published {
        Ok(seq) => seq,
        Err(e) => {
            state.status.remove(job.id).await;
            if let Some(entry) = &idem {
                state.status.release_idempotency(entry).await;
            }
            return Err(AppError::unavailable(format!("cannot queue the job: {e:#}")));
        }
    };
    let _ = state
        .status
        .update(
            job.id,
            || JobStatus::queued(&job, Some(seq)),
            |s| {
                s.stream_seq = Some(seq);
                true
            },
        )
        .await;
    tracing::info!(job_id = %job.id, model = %job.model, seq, "job queued");
    let (status_url, events_url) = urls(job.id);
    let body = SubmitResponse { job_id: job.id, status_url: status_url.clone(), events_url, created: true };
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    response.headers_mut().insert(header::LOCATION, HeaderValue::from_str(&status_url).expect("a path is a header"));
    Ok(response)
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UploadResponse {
    pub object_key: String,
    pub bytes: usize,
    pub width: u32,
    pub height: u32,
}

/// `POST /v1/uploads`: an image (PNG, JPEG or WebP bytes) to use as `init_image` or `mask` by key.
#[utoipa::path(post, path = "/v1/uploads", tag = "jobs", request_body(content = Vec<u8>, content_type = "image/png"),
    responses((status = 201, body = UploadResponse), (status = 422, body = ApiErrorBody)), security(("bearer" = [])))]
async fn upload(State(state): State<AppState>, body: Bytes) -> ApiResult<(StatusCode, Json<UploadResponse>)> {
    let img = crate::image_input::decode_bounded(body.clone(), "upload").await.map_err(|e| decode_error("body", e))?;
    let format = image::guess_format(&body).map_err(|e| AppError::invalid("body", e.to_string()))?;
    let ext = format.extensions_str().first().copied().unwrap_or("img");
    let key = format!("uploads/{}.{ext}", Uuid::new_v4());
    state.store.put(&key, body.clone(), format.to_mime_type()).await.map_err(AppError::unavailable)?;
    let body = UploadResponse { object_key: key, bytes: body.len(), width: img.width(), height: img.height() };
    Ok((StatusCode::CREATED, Json(body)))
}

// ---------------------------------------------------------------------------------------------------------
// Status, list, cancel, images
// ---------------------------------------------------------------------------------------------------------

/// A job's status with what the queen knows beside the record.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusView {
    #[serde(flatten)]
    pub status: JobStatus,
    /// Jobs ahead of it in its model's queue (queued jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// Estimated time to completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// The worker holding it stopped sending heartbeats: the job waits for redelivery.
    #[serde(default)]
    pub waiting_for_redelivery: bool,
    /// Where to fetch each image: a presigned URL, else this API's image endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_urls: Vec<String>,
}

async fn view(state: &AppState, status: JobStatus) -> StatusView {
    let now = protocol::now_millis();
    let mut v = StatusView {
        status,
        queue_position: None,
        eta_ms: None,
        waiting_for_redelivery: false,
        image_urls: Vec::new(),
    };
    let s = &v.status;
    match s.state {
        JobState::Queued => {
            if let Some(seq) = s.stream_seq {
                v.queue_position = queue_position(state, &s.model, seq).await;
            }
            let workers = state.fleet.serving(&s.model, now).max(1) as f64;
            if let (Some(pos), Some(job_ms)) = (v.queue_position, state.stats.job_ms(&s.model)) {
                v.eta_ms = Some(((pos as f64 + 1.0) * job_ms / workers) as u64);
            }
        }
        JobState::Running => {
            v.eta_ms = s.progress.as_ref().and_then(|p| p.eta_ms);
            v.waiting_for_redelivery = s.worker_id.as_deref().is_some_and(|w| state.fleet.is_lost(w, now));
        }
        _ => {}
    }
    v.image_urls = s
        .images
        .iter()
        .map(|i| i.url.clone().unwrap_or_else(|| format!("/v1/jobs/{}/images/{}", s.job_id, i.index)))
        .collect();
    v
}

/// How many jobs of `model` wait before stream sequence `seq` (walked with direct gets, bounded).
async fn queue_position(state: &AppState, model: &str, seq: u64) -> Option<u64> {
    let subject = state.bus.subjects().jobs(model).ok()?;
    let stream = state.bus.jetstream().get_stream(state.bus.subjects().jobs_stream()).await.ok()?;
    // Jobs already delivered (running) are not waiting: start after the consumer's last delivery.
    let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
        stream.get_consumer(&crate::bus::consumer_name(model)).await;
    let mut next = consumer.map(|c| c.cached_info().delivered.stream_sequence + 1).unwrap_or(1);
    let mut position = 0;
    for _ in 0..1000 {
        match stream.direct_get_next_for_subject(subject.as_str(), Some(next)).await {
            Ok(msg) if msg.sequence < seq => {
                position += 1;
                next = msg.sequence + 1;
            }
            Ok(msg) if msg.sequence == seq => return Some(position),
            _ => return None,
        }
    }
    None
}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = StatusView), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn job_status(State(state): State<AppState>, ApiPath(id): ApiPath<Uuid>) -> ApiResult<Json<StatusView>> {
    let status = state.status.get(id).await?.ok_or_else(|| AppError::not_found(id))?;
    Ok(Json(view(&state, status).await))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    state: Option<String>,
    model: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobStatus>,
    pub total: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<usize>,
}

#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(("state" = Option<String>, Query), ("model" = Option<String>, Query), ("limit" = Option<usize>, Query),
        ("offset" = Option<usize>, Query)),
    responses((status = 200, body = JobList), (status = 422, body = ApiErrorBody)), security(("bearer" = [])))]
async fn list_jobs(State(state): State<AppState>, ApiQuery(q): ApiQuery<ListQuery>) -> ApiResult<Json<JobList>> {
    let wanted: Option<JobState> =
        q.state.as_deref().map(str::parse).transpose().map_err(|e: String| AppError::invalid("state", e))?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(AppError::invalid("limit", "must be 1 to 500"));
    }
    let mut jobs: Vec<JobStatus> = state
        .status
        .all()
        .await?
        .into_iter()
        .filter(|s| wanted.is_none_or(|w| s.state == w))
        .filter(|s| q.model.as_deref().is_none_or(|m| s.model == m))
        .collect();
    jobs.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.job_id.cmp(&b.job_id)));
    let total = jobs.len();
    let offset = q.offset.unwrap_or(0).min(total);
    let page: Vec<JobStatus> = jobs.into_iter().skip(offset).take(limit).collect();
    let next_offset = (offset + page.len() < total).then_some(offset + page.len());
    Ok(Json(JobList { jobs: page, total, next_offset }))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CancelResponse {
    pub job_id: Uuid,
    /// `cancelled` (it never started: removed from the queue) or `cancelling` (a worker stops it within
    /// a step).
    pub state: String,
}

#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, description = "removed from the queue", body = CancelResponse),
        (status = 202, description = "the worker stops it within a step", body = CancelResponse),
        (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)), security(("bearer" = [])))]
async fn cancel_job(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<(StatusCode, Json<CancelResponse>)> {
    let status = state.status.get(id).await?.ok_or_else(|| AppError::not_found(id))?;
    if status.state.is_terminal() {
        return Err(AppError::new(
            StatusCode::CONFLICT,
            "ALREADY_FINISHED",
            format!("job {id} is already {}", status.state.name()),
        ));
    }
    // Tell the workers in any case: one may be taking it right now.
    state.bus.cancel(id, Some("cancelled through the API".into())).await.map_err(AppError::unavailable)?;
    if status.state == JobState::Queued {
        if let Some(seq) = status.stream_seq {
            let stream = state
                .bus
                .jetstream()
                .get_stream(state.bus.subjects().jobs_stream())
                .await
                .map_err(AppError::unavailable)?;
            if matches!(stream.delete_message(seq).await, Ok(true)) {
                let event = Event::Cancelled(protocol::Cancelled {
                    v: protocol::PROTOCOL_VERSION,
                    job_id: id,
                    at: protocol::now_millis(),
                    at_step: None,
                });
                crate::bus::publish_persistent(
                    state.bus.jetstream(),
                    state.bus.subjects().events(id),
                    crate::bus::msg_id_headers(&format!("{id}:0:cancelled")),
                    protocol::encode(&event).into(),
                    Duration::from_secs(10),
                )
                .await
                .map_err(AppError::unavailable)?;
                let _ = state.status.update(id, || status.clone(), |s| s.apply(&event)).await;
                return Ok((StatusCode::OK, Json(CancelResponse { job_id: id, state: "cancelled".into() })));
            }
        }
    }
    Ok((StatusCode::ACCEPTED, Json(CancelResponse { job_id: id, state: "cancelling".into() })))
}

#[utoipa::path(get, path = "/v1/jobs/{id}/images/{n}", tag = "jobs", params(("id" = Uuid, Path), ("n" = u32, Path)),
    responses((status = 200, description = "the image", content_type = "image/png"), (status = 404, body = ApiErrorBody),
        (status = 409, body = ApiErrorBody)), security(("bearer" = [])))]
async fn job_image(State(state): State<AppState>, ApiPath((id, n)): ApiPath<(Uuid, u32)>) -> ApiResult<Response> {
    let status = state.status.get(id).await?.ok_or_else(|| AppError::not_found(id))?;
    if status.state != JobState::Completed {
        return Err(AppError::new(
            StatusCode::CONFLICT,
            "NOT_COMPLETED",
            format!("job {id} is {}", status.state.name()),
        ));
    }
    let image = status
        .images
        .iter()
        .find(|i| i.index == n)
        .ok_or_else(|| AppError::new(StatusCode::NOT_FOUND, "NOT_FOUND", format!("job {id} has no image {n}")))?;
    let bytes = match state.store.get(&image.key).await {
        Ok(b) => b,
        Err(e @ crate::storage::StoreError::NotFound { .. }) => {
            return Err(AppError::new(StatusCode::NOT_FOUND, "NOT_FOUND", e.to_string()))
        }
        Err(e) => return Err(AppError::unavailable(e)),
    };
    let content_type =
        HeaderValue::from_str(&image.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    Ok(([(header::CONTENT_TYPE, content_type)], bytes).into_response())
}

// ---------------------------------------------------------------------------------------------------------
// Server-Sent Events
// ---------------------------------------------------------------------------------------------------------

fn sse_of(event: &Event) -> Vec<SseEvent> {
    let data = |v: serde_json::Value| SseEvent::default().data(v.to_string());
    match event {
        Event::Accepted(a) => {
            vec![data(serde_json::json!({"job_id": a.job_id, "at": a.at, "worker_id": a.worker_id})).event("started")]
        }
        Event::Progress(p) => {
            let mut out = vec![data(serde_json::json!({
                "job_id": p.job_id, "at": p.at, "step": p.step, "total": p.total, "percent": p.percent, "eta_ms": p.eta_ms
            }))
            .event("progress")];
            if let Some(jpeg) = &p.preview_jpeg {
                use base64::Engine;
                let b64 = base64::engine::general_purpose::STANDARD.encode(jpeg);
                out.push(data(serde_json::json!({"job_id": p.job_id, "step": p.step, "image": format!("data:image/jpeg;base64,{b64}")})).event("preview"));
            }
            out
        }
        Event::Completed(c) => vec![data(serde_json::to_value(c).unwrap_or_default()).event("completed")],
        Event::Failed(f) => vec![data(serde_json::to_value(f).unwrap_or_default()).event("failed")],
        Event::Cancelled(c) => vec![data(serde_json::to_value(c).unwrap_or_default()).event("cancelled")],
    }
}

/// The terminal SSE event of a finished job, from its status record.
fn final_event(s: &JobStatus) -> SseEvent {
    let at = s.finished_at.unwrap_or(s.updated_at);
    let (name, data) = match s.state {
        JobState::Completed => {
            ("completed", serde_json::json!({"job_id": s.job_id, "at": at, "images": s.images, "timings": s.timings}))
        }
        JobState::Failed => {
            let e = s.error.clone();
            (
                "failed",
                serde_json::json!({"job_id": s.job_id, "at": at, "code": e.as_ref().map(|e| e.code),
                "message": e.as_ref().map(|e| e.message.clone()), "field": e.and_then(|e| e.field)}),
            )
        }
        _ => ("cancelled", serde_json::json!({"job_id": s.job_id, "at": at, "at_step": s.cancelled_at_step})),
    };
    SseEvent::default().event(name).data(data.to_string())
}

/// `GET /v1/jobs/{id}/events`: everything that happened (replayed from the events stream), then live,
/// ending after the terminal event.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, description = "Server-Sent Events: queued, started, progress, preview, completed, failed, cancelled",
        content_type = "text/event-stream"), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn job_events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let status = state.status.get(id).await?.ok_or_else(|| AppError::not_found(id))?;
    let queued = SseEvent::default()
        .event("queued")
        .data(serde_json::json!({"job_id": id, "at": status.created_at, "model": status.model}).to_string());
    let stream: futures::stream::BoxStream<'static, Result<SseEvent, Infallible>> = if status.state.is_terminal() {
        // A finished job: replay what the events stream still holds (it keeps a day), and end with the
        // final state from the status record when its event is gone.
        let stored = state.bus.stored_events(id).await.map_err(AppError::unavailable)?;
        let mut out = vec![queued];
        out.extend(stored.iter().flat_map(sse_of));
        if !stored.iter().any(Event::is_terminal) {
            out.push(final_event(&status));
        }
        futures::stream::iter(out.into_iter().map(Ok)).boxed()
    } else {
        let events = state.bus.events(id).await.map_err(AppError::unavailable)?;
        // The response ends with the terminal event (a follower such as curl then returns): the loop stops
        // right after yielding it, without waiting for an event that will never come.
        let live = async_stream::stream! {
            let mut events = events;
            while let Some(e) = events.next().await {
                match e {
                    Ok(event) => {
                        let last = event.is_terminal();
                        yield sse_of(&event);
                        if last {
                            break;
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "event stream error"),
                }
            }
        };
        futures::stream::once(async move { vec![queued] })
            .chain(live)
            .flat_map(|batch| futures::stream::iter(batch.into_iter().map(Ok)))
            .boxed()
    };
    let stream = stream.take_until(state.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

// ---------------------------------------------------------------------------------------------------------
// Fleet, health, metrics
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelInfo {
    pub name: String,
    /// Live workers serving it.
    pub workers: usize,
    /// Of those, the workers holding it in memory (the others load it for their first job of it).
    #[serde(default)]
    pub resident_workers: usize,
    /// LoRAs the model's workers can apply (`loras[].name` of a job), sorted.
    #[serde(default)]
    pub loras: Vec<String>,
    /// The defaults of a built-in short name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub defaults: Option<serde_json::Value>,
}

#[utoipa::path(get, path = "/v1/models", tag = "fleet", responses((status = 200, body = Vec<ModelInfo>)),
    security(("bearer" = [])))]
async fn models(State(state): State<AppState>) -> Json<Vec<ModelInfo>> {
    let models = state
        .fleet
        .models(protocol::now_millis())
        .into_iter()
        .map(|m| {
            let defaults = crate::hub::registry_entry(&m.name).map(|e| {
                serde_json::json!({"repo": e.repo, "width": e.width, "height": e.height, "steps": e.steps,
                                   "guidance": e.guidance, "scheduler": e.scheduler})
            });
            ModelInfo {
                name: m.name,
                workers: m.workers,
                resident_workers: m.resident_workers,
                loras: m.loras,
                defaults,
            }
        })
        .collect();
    Json(models)
}

#[utoipa::path(get, path = "/v1/workers", tag = "fleet", responses((status = 200, body = Vec<super::fleet::WorkerInfo>)),
    security(("bearer" = [])))]
async fn workers(State(state): State<AppState>) -> Json<Vec<super::fleet::WorkerInfo>> {
    Json(state.fleet.workers(protocol::now_millis()))
}

#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, description = "the process is up")))]
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, description = "NATS reachable, streams present"), (status = 503, description = "not ready")))]
async fn ready(State(state): State<AppState>) -> Response {
    let connected = state.bus.nats().connection_state() == async_nats::connection::State::Connected;
    let mut problems = Vec::new();
    if !connected {
        problems.push("not connected to NATS".to_string());
    } else {
        let subjects = state.bus.subjects();
        for stream in [subjects.jobs_stream(), subjects.events_stream(), subjects.dlq_stream()] {
            let check = tokio::time::timeout(Duration::from_secs(2), state.bus.jetstream().get_stream(&stream)).await;
            if !matches!(check, Ok(Ok(_))) {
                problems.push(format!("stream {stream} unavailable"));
            }
        }
    }
    if problems.is_empty() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "not ready", "problems": problems})))
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_describes_the_endpoints_and_types() {
        use utoipa::OpenApi;
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for path in [
            "/v1/jobs",
            "/v1/jobs/{id}",
            "/v1/jobs/{id}/events",
            "/v1/jobs/{id}/images/{n}",
            "/v1/uploads",
            "/v1/models",
            "/v1/workers",
            "/health",
            "/ready",
            "/metrics",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        assert!(doc["paths"]["/v1/jobs"]["post"]["requestBody"].is_object());
        let schemas = &doc["components"]["schemas"];
        let submission = &schemas["JobSubmission"]["properties"];
        for field in ["model", "prompt", "width", "height", "steps", "init_image", "mask", "strength", "timeout_s"] {
            assert!(submission[field].is_object(), "JobSubmission.{field}");
        }
        let required: Vec<&str> =
            schemas["JobSubmission"]["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(required.contains(&"model") && required.contains(&"prompt"));
        assert!(
            schemas["JobState"].is_object() && schemas["ErrorCode"].is_object() && schemas["StatusView"].is_object()
        );
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    }
}
