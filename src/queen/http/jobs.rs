//! The job endpoints: each reads its request, asks the job service, and answers.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiPath, ApiQuery, ApiResult};
use super::{AppError, AppState};
use crate::api::{
    ApiErrorBody, ApiErrorCode, CancelResponse, CancelState, JobList, JobState, JobSubmission, StatusView,
    SubmitResponse, UploadResponse,
};
use crate::queen::jobs::ListQuery;

/// A JSON body read into `T`; what does not parse is 400, what parses into the wrong shape 422, each naming
/// the field.
pub(super) fn parse_body<T: serde::de::DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> ApiResult<T> {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        // A media type's name is case-insensitive; its parameters (`; charset=utf-8`) are not looked at.
        .is_none_or(|t| t.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err(AppError::new(ApiErrorCode::UnsupportedMediaType, "send application/json"));
    }
    crate::api::parse_json_body(body).map_err(|e| AppError { field: e.field, ..AppError::new(e.code, e.message) })
}

#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = JobSubmission,
    params(("Idempotency-Key" = Option<String>, Header, description = "maps a retried request to the same job")),
    responses((status = 202, description = "queued", body = SubmitResponse),
        (status = 200, description = "an earlier job with this idempotency key", body = SubmitResponse),
        (status = 400, body = ApiErrorBody), (status = 401, body = ApiErrorBody),
        (status = 403, description = "a tenant's token naming an object outside its uploads", body = ApiErrorBody),
        (status = 413, body = ApiErrorBody), (status = 415, body = ApiErrorBody), (status = 422, body = ApiErrorBody),
        (status = 429, description = "the token is over its submit_rate (Retry-After)", body = ApiErrorBody),
        (status = 503, body = ApiErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn submit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let submission: JobSubmission = parse_body(&headers, &body)?;
    let key = match headers.get("idempotency-key") {
        Some(v) => {
            Some(v.to_str().map_err(|_| AppError::invalid("Idempotency-Key", "must be visible ASCII"))?.to_string())
        }
        None => None,
    };
    let answer = caller
        .submit(&state, submission, key)
        .await
        .map_err(|e| super::compat::in_their_words(e, crate::api::SUBMISSION_FIELD_NAMES))?;
    if !answer.created {
        return Ok((StatusCode::OK, Json(answer)).into_response());
    }
    let location = HeaderValue::from_str(&answer.status_url).expect("a path is a header value");
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(answer)).into_response())
}

/// `POST /v1/uploads`: an image (PNG, JPEG or WebP bytes) to use as `init_image` or `mask` by key.
#[utoipa::path(post, path = "/v1/uploads", tag = "jobs", request_body(content = Vec<u8>, content_type = "image/png"),
    responses((status = 201, body = UploadResponse), (status = 422, body = ApiErrorBody)), security(("bearer" = [])))]
pub(super) async fn upload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<UploadResponse>)> {
    Ok((StatusCode::CREATED, Json(state.jobs.upload(body, &caller.scope).await?)))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = StatusView), (status = 404, body = ApiErrorBody),
        (status = 410, description = "the job's ttl passed", body = ApiErrorBody)), security(("bearer" = [])))]
pub(super) async fn status(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<StatusView>> {
    let status = state.jobs.get(id, &caller.scope).await?;
    Ok(Json(state.jobs.view(status).await))
}

#[derive(Debug, Deserialize)]
pub(super) struct ListParams {
    state: Option<String>,
    model: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
    cursor: Option<u64>,
    tenant: Option<String>,
}

#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(("state" = Option<String>, Query), ("model" = Option<String>, Query), ("limit" = Option<usize>, Query),
        ("offset" = Option<usize>, Query), ("cursor" = Option<u64>, Query, description = "a page's next_cursor"),
        ("tenant" = Option<String>, Query, description = "only this tenant's jobs (a tenant's token lists only its own)")),
    responses((status = 200, body = JobList), (status = 403, body = ApiErrorBody), (status = 422, body = ApiErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> ApiResult<Json<JobList>> {
    let wanted = q.state.as_deref().map(JobState::parse).transpose().map_err(|e| AppError::invalid("state", e))?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(AppError::invalid("limit", "must be 1 to 500"));
    }
    if let Some(asked) = &q.tenant {
        crate::protocol::validate_tenant("tenant", asked)?;
    }
    let tenant = match (caller.scope.tenant(), q.tenant) {
        (None, asked) => asked,
        (Some(own), Some(asked)) if asked != own => {
            return Err(AppError {
                field: Some("tenant".into()),
                ..AppError::new(ApiErrorCode::Forbidden, format!("this token lists only tenant {own}'s jobs"))
            })
        }
        (Some(own), _) => Some(own.to_string()),
    };
    let offset = q.offset.unwrap_or(0);
    let query = ListQuery { state: wanted, model: q.model, tenant, limit, offset, cursor: q.cursor };
    Ok(Json(state.jobs.list(&query).await?))
}

#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, description = "removed from the queue", body = CancelResponse),
        (status = 202, description = "the worker stops it within a step", body = CancelResponse),
        (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)), security(("bearer" = [])))]
pub(super) async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<(StatusCode, Json<CancelResponse>)> {
    let answer = state.jobs.cancel(id, &caller.scope).await?;
    let status = match answer.state {
        CancelState::Cancelled => StatusCode::OK,
        CancelState::Cancelling => StatusCode::ACCEPTED,
    };
    Ok((status, Json(answer)))
}

#[utoipa::path(get, path = "/v1/jobs/{id}/images/{n}", tag = "jobs", params(("id" = Uuid, Path), ("n" = u32, Path)),
    responses((status = 200, description = "the image", content_type = "image/png"), (status = 404, body = ApiErrorBody),
        (status = 409, body = ApiErrorBody)), security(("bearer" = [])))]
pub(super) async fn image(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath((id, n)): ApiPath<(Uuid, u32)>,
) -> ApiResult<Response> {
    let image = state.jobs.image(id, n, &caller.scope).await?;
    let content_type =
        HeaderValue::from_str(&image.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    // Streamed: many downloads of large images at once do not hold them all in memory.
    let headers = [(header::CONTENT_TYPE, content_type), (header::CONTENT_LENGTH, HeaderValue::from(image.size))];
    Ok((headers, axum::body::Body::from_stream(image.bytes)).into_response())
}
