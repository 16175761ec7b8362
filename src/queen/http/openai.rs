//! OpenAI's image endpoints (`POST /v1/images/generations`, `POST /v1/images/edits`) over ordinary jobs; the
//! mapping of fields is [`crate::api::openai`]. The answer waits for the images.

use axum::body::Bytes;
use axum::extract::{Multipart, State};
use axum::http::HeaderMap;
use axum::{Extension, Json};
use base64::Engine as _;

use super::auth::Caller;
use super::error::ApiResult;
use super::jobs::parse_body;
use super::{AppError, AppState};
use crate::api::openai::{OpenAiImage, OpenAiImageRequest, OpenAiImagesResponse, ResponseFormat, OPENAI_MODEL_NAMES};
use crate::api::{ApiErrorBody, ImageInput};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The model a compatible request runs on: the one it names, unless it names none or one of OpenAI's; then
/// the queen's `--compat-model`, else the only model of the catalogue. `field` is what the caller calls it.
pub(super) async fn choose_model(state: &AppState, asked: Option<String>, field: &str) -> ApiResult<String> {
    if let Some(model) = asked.filter(|m| !m.is_empty() && !OPENAI_MODEL_NAMES.contains(&m.as_str())) {
        return Ok(model);
    }
    if let Some(model) = &state.config.compat_model {
        return Ok(model.clone());
    }
    match state.jobs.catalogue().await.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(AppError::invalid(field, "no model is served yet; name one")),
        several => {
            Err(AppError::invalid(field, format!("name one of {} (no --compat-model default)", several.join(", "))))
        }
    }
}

#[utoipa::path(post, path = "/v1/images/generations", tag = "compatible", operation_id = "openai_generations", request_body = OpenAiImageRequest,
    responses((status = 200, body = OpenAiImagesResponse), (status = 401, body = ApiErrorBody),
        (status = 422, body = ApiErrorBody), (status = 503, body = ApiErrorBody),
        (status = 429, body = ApiErrorBody), (status = 504, body = ApiErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn generations(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<OpenAiImagesResponse>> {
    let request: OpenAiImageRequest = parse_body(&headers, &body)?;
    answer(&state, &caller, &headers, request, None, None).await
}

/// `multipart/form-data`: `image` (or `image[]`, the first), `mask` (transparent = redraw, OpenAI's
/// convention; a mask without alpha: white = redraw), and the text fields of a generation.
#[utoipa::path(post, path = "/v1/images/edits", tag = "compatible", operation_id = "openai_edits",
    request_body(content = String, content_type = "multipart/form-data"),
    responses((status = 200, body = OpenAiImagesResponse), (status = 401, body = ApiErrorBody),
        (status = 422, body = ApiErrorBody), (status = 503, body = ApiErrorBody),
        (status = 429, body = ApiErrorBody), (status = 504, body = ApiErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn edits(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    mut form: Multipart,
) -> ApiResult<Json<OpenAiImagesResponse>> {
    let (mut image, mut mask, mut fields) = (None, None, serde_json::Map::new());
    while let Some(part) = form.next_field().await.map_err(|e| AppError::invalid("multipart", e.body_text()))? {
        let name = part.name().unwrap_or_default().to_string();
        let bytes = part.bytes().await.map_err(|e| AppError::invalid(&name, e.body_text()))?;
        match name.as_str() {
            "image" | "image[]" => {
                image.get_or_insert(bytes);
            }
            "mask" => mask = Some(bytes),
            _ => {
                let text = String::from_utf8(bytes.to_vec()).map_err(|_| AppError::invalid(&name, "is not text"))?;
                fields.insert(name, form_value(&text));
            }
        }
    }
    let image = image.ok_or_else(|| AppError::invalid("image", "an edit needs an image"))?;
    let request: OpenAiImageRequest = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| AppError::invalid("multipart", e.to_string()))?;
    let mask = redraw_mask(&image, mask).await?;
    let init = ImageInput::Base64(B64.encode(&image));
    answer(&state, &caller, &headers, request, Some(init), mask.map(|m| ImageInput::Base64(B64.encode(m)))).await
}

/// A form field as JSON: a number where it reads as one (`n`, `seed`, `strength`), else text.
fn form_value(text: &str) -> serde_json::Value {
    match text.parse::<u64>() {
        Ok(n) => n.into(),
        Err(_) => text.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map_or(text.into(), Into::into),
    }
}

/// The mask as sd-rbee takes it (white = redraw, PNG): from the mask's alpha when it has one (transparent =
/// redraw), the mask itself when it has none, or the image's own transparency when no mask is given (OpenAI
/// lets a transparent image be its own mask). None: redraw everything (img2img).
async fn redraw_mask(image: &Bytes, mask: Option<Bytes>) -> ApiResult<Option<Vec<u8>>> {
    let (source, what) = match mask {
        Some(mask) => (mask, "mask"),
        None => (image.clone(), "image"),
    };
    let decoded = crate::image_input::decode_bounded(source.clone(), what)
        .await
        .map_err(|e| AppError::invalid(what, format!("{e:#}")))?;
    if !decoded.color().has_alpha() {
        return Ok((what == "mask").then(|| source.to_vec()));
    }
    let rgba = decoded.to_rgba8();
    if what == "image" && rgba.pixels().all(|p| p.0[3] >= 128) {
        return Ok(None);
    }
    let redraw = image::GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        image::Luma([if rgba.get_pixel(x, y).0[3] < 128 { 255 } else { 0 }])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    redraw.write_to(&mut png, image::ImageFormat::Png).map_err(AppError::internal)?;
    Ok(Some(png.into_inner()))
}

async fn answer(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    request: OpenAiImageRequest,
    init: Option<ImageInput>,
    mask: Option<ImageInput>,
) -> ApiResult<Json<OpenAiImagesResponse>> {
    let model = choose_model(state, request.model.clone(), "model").await?;
    let (mut job, format) =
        request.to_submission(&model).map_err(|(field, message)| AppError::invalid(field, message))?;
    (job.init_image, job.mask) = (init, mask);
    let output_format = job.output_format.unwrap_or_default();
    // The wait for the job holds a stream of the events like GET /v1/jobs/{id}/events.
    let _slot = caller.open_stream(state)?;
    let job_id = caller.submit(state, job, None).await?.job_id;
    let finished = state.jobs.finished(job_id, state.config.compat_wait, &state.shutdown).await?;
    let origin = origin(headers);
    let data = finished
        .images
        .iter()
        .map(|(image, bytes)| OpenAiImage {
            b64_json: (format == ResponseFormat::B64Json).then(|| B64.encode(bytes)),
            url: (format == ResponseFormat::Url).then(|| {
                image.url.clone().unwrap_or_else(|| format!("{origin}/v1/jobs/{job_id}/images/{}", image.index))
            }),
            revised_prompt: Some(request.prompt.clone()),
            seed: Some(image.seed),
        })
        .collect();
    let size = finished.images.first().map(|(i, _)| format!("{}x{}", i.width, i.height)).unwrap_or_default();
    let created = crate::protocol::now_millis() / 1000;
    Ok(Json(OpenAiImagesResponse {
        created,
        data,
        output_format: output_format.extension().replace("jpg", "jpeg"),
        size,
        job_id,
    }))
}

/// This queen as its client reached it (`X-Forwarded-Proto` and `Host`), for image URLs.
fn origin(headers: &HeaderMap) -> String {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let scheme = header("x-forwarded-proto").filter(|p| *p == "https").unwrap_or("http");
    format!("{scheme}://{}", header("host").unwrap_or("localhost"))
}
