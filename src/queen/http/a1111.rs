//! AUTOMATIC1111's API (`/sdapi/v1/...`) over ordinary jobs; the mapping of fields is
//! [`crate::api::a1111`]. `txt2img` and `img2img` answer once the images exist; `progress` follows the
//! newest of the caller's jobs sent this way.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Extension, Json};
use base64::Engine as _;
use uuid::Uuid;

use super::auth::Caller;
use super::compat::{carried_base64, choose_model, submit_and_wait, StoredInputs};
use super::error::ApiResult;
use super::jobs::parse_body;
use super::AppState;
use crate::api::a1111::{
    self, A1111Model, A1111Progress, A1111ProgressState, A1111Request, A1111Response, A1111Sampler,
};
use crate::api::{ApiErrorBody, ImageInput};
use crate::queen::jobs::JobsError;

#[utoipa::path(post, path = "/sdapi/v1/txt2img", tag = "compatible", operation_id = "a1111_txt2img", request_body = A1111Request,
    responses((status = 200, body = A1111Response), (status = 401, body = ApiErrorBody),
        (status = 422, body = ApiErrorBody), (status = 503, body = ApiErrorBody),
        (status = 429, body = ApiErrorBody), (status = 504, body = ApiErrorBody),
        (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 413, body = ApiErrorBody),
        (status = 415, body = ApiErrorBody), (status = 502, body = ApiErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn txt2img(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<A1111Response>> {
    generate(&state, &caller, &headers, &body, false).await
}

#[utoipa::path(post, path = "/sdapi/v1/img2img", tag = "compatible", operation_id = "a1111_img2img", request_body = A1111Request,
    responses((status = 200, body = A1111Response), (status = 401, body = ApiErrorBody),
        (status = 422, body = ApiErrorBody), (status = 503, body = ApiErrorBody),
        (status = 429, body = ApiErrorBody), (status = 504, body = ApiErrorBody),
        (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 413, body = ApiErrorBody),
        (status = 415, body = ApiErrorBody), (status = 502, body = ApiErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn img2img(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<A1111Response>> {
    generate(&state, &caller, &headers, &body, true).await
}

async fn generate(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: &Bytes,
    img2img: bool,
) -> ApiResult<Json<A1111Response>> {
    let request: A1111Request = parse_body(headers, body)?;
    let model = choose_model(state, request.checkpoint(), "override_settings.sd_model_checkpoint").await?;
    let mut job =
        request.to_submission(&model, img2img).map_err(|(field, message)| super::AppError::invalid(field, message))?;
    let slot = caller.open_stream(state)?;
    // A1111's clients send images inline only: those too large for a job message go by the store.
    let mut stored = StoredInputs::default();
    if let Some(ImageInput::Base64(text)) = job.init_image.take() {
        job.init_image = Some(carried_base64(state, caller, text, "init_images", &mut stored).await?);
    }
    if let Some(ImageInput::Base64(text)) = job.mask.take() {
        job.mask = Some(carried_base64(state, caller, text, "mask", &mut stored).await?);
    }
    let finished = submit_and_wait(state, caller, (slot, stored), job, a1111::FIELD_NAMES, |id| {
        state.a1111_jobs.lock().insert(caller.id.clone(), id);
    })
    .await?;
    let job_id = finished.job_id;
    let images: Vec<_> = finished.images.iter().map(|(image, _)| image.clone()).collect();
    let info = a1111::info(&request, &model, &images, job_id);
    let encoded = if request.send_images {
        finished.images.iter().map(|(_, bytes)| base64::engine::general_purpose::STANDARD.encode(bytes)).collect()
    } else {
        Vec::new()
    };
    let parameters = serde_json::from_slice(body).unwrap_or_default();
    Ok(Json(A1111Response { images: encoded, parameters, info }))
}

#[utoipa::path(get, path = "/sdapi/v1/sd-models", tag = "compatible", operation_id = "a1111_sd_models",
    responses((status = 200, body = Vec<A1111Model>), (status = 401, body = ApiErrorBody)), security(("bearer" = [])))]
pub(super) async fn models(State(state): State<AppState>) -> Json<Vec<A1111Model>> {
    Json(state.jobs.catalogue().await.iter().map(|name| A1111Model::named(name)).collect())
}

#[utoipa::path(get, path = "/sdapi/v1/samplers", tag = "compatible", operation_id = "a1111_samplers",
    responses((status = 200, body = Vec<A1111Sampler>), (status = 401, body = ApiErrorBody)), security(("bearer" = [])))]
pub(super) async fn samplers() -> Json<Vec<A1111Sampler>> {
    Json(a1111::samplers())
}

#[utoipa::path(get, path = "/sdapi/v1/progress", tag = "compatible", operation_id = "a1111_progress",
    responses((status = 200, body = A1111Progress), (status = 401, body = ApiErrorBody)), security(("bearer" = [])))]
pub(super) async fn progress(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<A1111Progress>> {
    let newest: Option<Uuid> = state.a1111_jobs.lock().get(&caller.id).copied();
    let Some(job_id) = newest else { return Ok(Json(A1111Progress::default())) };
    // A job past its ttl or forgotten is as idle as one that ended: A1111's progress answers 200 regardless.
    let status = match state.jobs.get(job_id, &caller.scope).await {
        Ok(status) if !status.state.is_terminal() => status,
        Ok(_) | Err(JobsError::NotFound(_) | JobsError::Expired(_)) => return Ok(Json(A1111Progress::default())),
        Err(e) => return Err(e.into()),
    };
    let (step, total, eta_ms) = status.progress.as_ref().map_or((0, 0, None), |p| (p.step, p.total, p.eta_ms));
    Ok(Json(A1111Progress {
        progress: if total > 0 { f64::from(step) / f64::from(total) } else { 0.0 },
        eta_relative: eta_ms.map_or(0.0, |ms| ms as f64 / 1000.0),
        state: A1111ProgressState {
            job: job_id.to_string(),
            job_count: 1,
            sampling_step: step,
            sampling_steps: total,
            ..Default::default()
        },
        current_image: None,
        textinfo: None,
    }))
}
