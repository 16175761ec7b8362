//! OpenAI's image endpoints (`POST /v1/images/generations`, `POST /v1/images/edits`) over ordinary jobs; the
//! mapping of fields is [`crate::api::openai`]. The answer waits for the images.

use axum::body::Bytes;
use axum::extract::{Multipart, State};
use axum::http::HeaderMap;
use axum::{Extension, Json};
use base64::Engine as _;

use super::auth::Caller;
use super::compat::{carried, choose_model, submit_and_wait, StoredInputs};
use super::error::ApiResult;
use super::jobs::parse_body;
use super::streams::StreamSlot;
use super::{AppError, AppState};
use crate::api::openai::{self, OpenAiImage, OpenAiImageRequest, OpenAiImagesResponse, ResponseFormat};
use crate::api::{ApiErrorBody, ImageInput};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[utoipa::path(post, path = "/v1/images/generations", tag = "compatible", operation_id = "openai_generations", request_body = OpenAiImageRequest,
    responses((status = 200, body = OpenAiImagesResponse), (status = 401, body = ApiErrorBody),
        (status = 422, body = ApiErrorBody), (status = 503, body = ApiErrorBody),
        (status = 429, body = ApiErrorBody), (status = 504, body = ApiErrorBody),
        (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 413, body = ApiErrorBody),
        (status = 415, body = ApiErrorBody), (status = 502, body = ApiErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn generations(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<OpenAiImagesResponse>> {
    let request: OpenAiImageRequest = parse_body(&headers, &body)?;
    let slot = caller.open_stream(&state)?;
    answer(&state, &caller, (slot, StoredInputs::default()), &headers, request, None, None).await
}

/// `multipart/form-data`: `image` (or `image[]`, the first), `mask` (transparent = redraw, OpenAI's
/// convention; a mask without alpha: white = redraw), and the text fields of a generation.
#[utoipa::path(post, path = "/v1/images/edits", tag = "compatible", operation_id = "openai_edits",
    request_body(content = String, content_type = "multipart/form-data"),
    responses((status = 200, body = OpenAiImagesResponse), (status = 401, body = ApiErrorBody),
        (status = 422, body = ApiErrorBody), (status = 503, body = ApiErrorBody),
        (status = 429, body = ApiErrorBody), (status = 504, body = ApiErrorBody),
        (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 413, body = ApiErrorBody),
        (status = 415, body = ApiErrorBody), (status = 502, body = ApiErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn edits(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    mut form: Multipart,
) -> ApiResult<Json<OpenAiImagesResponse>> {
    let (mut image, mut mask, mut fields) = (None, None, serde_json::Map::new());
    while let Some(part) = form.next_field().await.map_err(|e| multipart_error("multipart", e))? {
        let name = part.name().unwrap_or_default().to_string();
        let bytes = part.bytes().await.map_err(|e| multipart_error(&name, e))?;
        match name.as_str() {
            "image" | "image[]" => {
                image.get_or_insert(bytes);
            }
            "mask" => mask = Some(bytes),
            _ => {
                let text = String::from_utf8(bytes.to_vec()).map_err(|_| AppError::invalid(&name, "is not text"))?;
                let value = form_value(&name, &text);
                fields.insert(name, value);
            }
        }
    }
    let image = image.ok_or_else(|| AppError::invalid("image", "an edit needs an image"))?;
    let slot = caller.open_stream(&state)?;
    let request: OpenAiImageRequest =
        serde_path_to_error::deserialize(serde_json::Value::Object(fields)).map_err(|e| {
            // `.` is the form as a whole (a missing field): the message names what is missing.
            let path = e.path().to_string();
            let mut message = e.inner().to_string();
            crate::protocol::cut(&mut message, crate::protocol::MAX_ERROR_MESSAGE_BYTES);
            AppError::invalid(if path == "." { "multipart" } else { &path }, message)
        })?;
    let mut stored = StoredInputs::default();
    let mask = match redraw_mask(&image, mask).await? {
        Some(mask) => Some(carried(&state, &caller, mask, "mask", &mut stored).await?),
        None => None,
    };
    let init = carried(&state, &caller, image.to_vec(), "image", &mut stored).await?;
    answer(&state, &caller, (slot, stored), &headers, request, Some(init), mask).await
}

/// A form that cannot be read: over the body limit (413), or not multipart as its header says (400).
fn multipart_error(field: &str, e: axum::extract::multipart::MultipartError) -> AppError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        AppError::new(crate::api::ApiErrorCode::PayloadTooLarge, e.body_text()).field(field)
    } else {
        AppError::malformed(field, e.body_text())
    }
}

/// OpenAI's text fields: text whatever they read as (a prompt of `1984`).
const TEXT_FIELDS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "model",
    "size",
    "response_format",
    "output_format",
    "quality",
    "style",
    "user",
    "background",
    "moderation",
];

/// A form field as JSON: text for the text fields, else a number where it reads as one (`n`, `seed`,
/// `strength`), else text.
fn form_value(name: &str, text: &str) -> serde_json::Value {
    if TEXT_FIELDS.contains(&name) {
        return text.into();
    }
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
    let given = source.clone();
    // Made where the image is decoded: the conversions of an image as large as the limits allow stay off
    // the async threads and within the bound on decodes at once.
    let made = crate::image_input::decode_bounded_then(source, what, move |decoded| {
        if !decoded.color().has_alpha() {
            return Ok((what == "mask").then(|| given.to_vec()));
        }
        let alpha = decoded.to_luma_alpha8();
        drop(decoded);
        if what == "image" && alpha.pixels().all(|p| p.0[1] >= 128) {
            return Ok(None);
        }
        let redraw = image::GrayImage::from_fn(alpha.width(), alpha.height(), |x, y| {
            image::Luma([if alpha.get_pixel(x, y).0[1] < 128 { 255 } else { 0 }])
        });
        let mut png = std::io::Cursor::new(Vec::new());
        redraw.write_to(&mut png, image::ImageFormat::Png)?;
        Ok(Some(png.into_inner()))
    });
    Ok(made.await.map_err(|e| crate::queen::jobs::decode_error(what, e))?)
}

async fn answer(
    state: &AppState,
    caller: &Caller,
    held: (Option<StreamSlot>, StoredInputs),
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
    let finished = submit_and_wait(state, caller, held, job, openai::FIELD_NAMES, |_| {}).await?;
    let job_id = finished.job_id;
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
