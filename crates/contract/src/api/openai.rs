//! OpenAI's image API as the queen speaks it (`POST /v1/images/generations`, `POST /v1/images/edits`), so
//! clients written for it (the official SDKs among them) get images from the fleet. A request becomes an
//! ordinary [`JobSubmission`]; what OpenAI's fields cannot say (seed, steps, negative prompt, strength) may
//! be added as extra fields of the same names. Honoured: `prompt`, `model`, `n`, `size`, `response_format`,
//! `output_format`, `output_compression`; read and ignored: `quality`, `style`, `user`, `background`,
//! `moderation`.

use serde::{Deserialize, Serialize};

use super::JobSubmission;
use crate::vocab::ImageFormat;

/// The model names OpenAI's clients send by default or by habit: they select the queen's default model.
pub const OPENAI_MODEL_NAMES: [&str; 4] = ["dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini"];

/// `POST /v1/images/generations` (and the text fields of `/v1/images/edits`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct OpenAiImageRequest {
    pub prompt: String,
    /// A model the fleet serves; absent or an OpenAI model name: the queen's default (`--compat-model`).
    #[serde(default)]
    pub model: Option<String>,
    /// Images to make (1 to the queen's limit).
    #[serde(default)]
    pub n: Option<u32>,
    /// `WIDTHxHEIGHT` (e.g. `512x512`), or `auto` for the model's own size.
    #[serde(default)]
    pub size: Option<String>,
    /// `b64_json` (the default) or `url`.
    #[serde(default)]
    pub response_format: Option<String>,
    /// `png` (the default), `jpeg` or `webp`.
    #[serde(default)]
    pub output_format: Option<String>,
    /// JPEG/WebP quality, 0–100.
    #[serde(default)]
    pub output_compression: Option<u8>,
    /// sd-rbee's own, beyond OpenAI's fields.
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    /// img2img/inpainting (`/v1/images/edits`): how much of the image is redrawn.
    #[serde(default)]
    pub strength: Option<f64>,
}

/// How the images come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFormat {
    B64Json,
    Url,
}

/// A request field OpenAI's clients can send that this cannot honour: (field, message).
pub type FieldError = (&'static str, String);

/// The job's fields as an OpenAI client calls them, for the errors of a job checked after the mapping:
/// `(native, OpenAI's)`.
pub const FIELD_NAMES: &[(&str, &str)] = &[
    ("num_images", "n"),
    ("width", "size"),
    ("height", "size"),
    ("output.quality", "output_compression"),
    ("guidance", "guidance_scale"),
    ("init_image", "image"),
];

impl OpenAiImageRequest {
    /// The job, for `model` (already chosen: [`OpenAiImageRequest::model`] resolved against the fleet).
    pub fn to_submission(&self, model: &str) -> Result<(JobSubmission, ResponseFormat), FieldError> {
        let mut job = JobSubmission::new(model, self.prompt.clone());
        job.num_images = self.n.unwrap_or(1);
        if let Some((width, height)) = parse_size(self.size.as_deref())? {
            (job.width, job.height) = (Some(width), Some(height));
        }
        let format = match self.response_format.as_deref() {
            None | Some("b64_json") => ResponseFormat::B64Json,
            Some("url") => ResponseFormat::Url,
            Some(other) => return Err(("response_format", format!("{other:?} is not b64_json or url"))),
        };
        job.output_format = match self.output_format.as_deref() {
            None => None,
            Some("png") => Some(ImageFormat::Png),
            Some("jpeg" | "jpg") => Some(ImageFormat::Jpeg),
            Some("webp") => Some(ImageFormat::Webp),
            Some(other) => return Err(("output_format", format!("{other:?} is not png, jpeg or webp"))),
        };
        // OpenAI's 0–100 for the lossy formats (0 is the smallest file: quality 1 here); with PNG, or no format
        // (PNG), there is nothing to compress, and OpenAI's clients may send it all the same.
        let lossy = matches!(job.output_format, Some(ImageFormat::Jpeg | ImageFormat::Webp));
        job.quality = self.output_compression.filter(|_| lossy).map(|c| c.max(1));
        job.negative_prompt = self.negative_prompt.clone();
        job.seed = self.seed;
        job.steps = self.steps;
        job.guidance = self.guidance_scale;
        job.strength = self.strength;
        Ok((job, format))
    }
}

/// `WIDTHxHEIGHT`, `auto` or nothing (the model's size).
fn parse_size(size: Option<&str>) -> Result<Option<(u32, u32)>, FieldError> {
    let Some(size) = size.map(str::trim).filter(|s| !s.is_empty() && *s != "auto") else { return Ok(None) };
    let parsed = size.split_once(['x', 'X']).and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    parsed.map(Some).ok_or(("size", format!("{size:?} is not WIDTHxHEIGHT (e.g. 512x512) or auto")))
}

/// One image of an answer.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct OpenAiImage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The prompt as used (sd-rbee does not rewrite prompts: the one given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revised_prompt: Option<String>,
    /// sd-rbee's own: the image's seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// The answer of both endpoints.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct OpenAiImagesResponse {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<OpenAiImage>,
    pub output_format: String,
    /// `WIDTHxHEIGHT` of the images.
    pub size: String,
    /// sd-rbee's own: the job behind the answer (`GET /v1/jobs/{id}`).
    pub job_id: uuid::Uuid,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_fields_become_a_job() {
        let req: OpenAiImageRequest = serde_json::from_value(serde_json::json!({
            "prompt": "a fox", "model": "dall-e-3", "n": 2, "size": "64x96", "quality": "hd", "style": "vivid",
            "user": "u1", "output_format": "webp", "output_compression": 80, "seed": 7
        }))
        .unwrap();
        let (job, format) = req.to_submission("tiny").unwrap();
        assert_eq!((job.model.as_str(), job.num_images, job.width, job.height), ("tiny", 2, Some(64), Some(96)));
        assert_eq!((job.output_format, job.quality, job.seed), (Some(ImageFormat::Webp), Some(80), Some(7)));
        assert_eq!(format, ResponseFormat::B64Json);
        for (field, value) in [("size", "big"), ("response_format", "file"), ("output_format", "gif")] {
            let mut req = OpenAiImageRequest { prompt: "x".into(), ..Default::default() };
            match field {
                "size" => req.size = Some(value.into()),
                "response_format" => req.response_format = Some(value.into()),
                _ => req.output_format = Some(value.into()),
            }
            assert_eq!(req.to_submission("tiny").unwrap_err().0, field);
        }
        // The whole 0–100 of output_compression is taken for JPEG and WebP, and it is left out for PNG.
        for (output_format, compression, quality) in
            [("jpeg", 0, Some(1)), ("webp", 100, Some(100)), ("png", 80, None), ("png", 0, None)]
        {
            let req = OpenAiImageRequest {
                prompt: "x".into(),
                output_format: Some(output_format.into()),
                output_compression: Some(compression),
                ..Default::default()
            };
            assert_eq!(req.to_submission("tiny").unwrap().0.quality, quality, "{output_format} {compression}");
        }
        let auto = OpenAiImageRequest { prompt: "x".into(), size: Some("auto".into()), ..Default::default() };
        assert_eq!(auto.to_submission("tiny").unwrap().0.width, None);
    }
}
