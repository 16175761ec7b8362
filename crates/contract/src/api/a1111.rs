//! AUTOMATIC1111's web UI API (`/sdapi/v1/*`) as the queen speaks it, so the many tools written against it
//! reach the fleet: `txt2img` and `img2img` with its field names and answer shapes (base64 PNGs,
//! `parameters`, `info` as a JSON string), and the lists `sd-models`, `samplers`, and `progress`.
//!
//! Honoured: `prompt`, `negative_prompt`, `seed` (-1: random), `steps`, `cfg_scale`, `width`, `height`,
//! `sampler_name` (or the older `sampler_index`) with `scheduler` (`Karras`), `batch_size` × `n_iter`
//! images, `override_settings.sd_model_checkpoint` (the model) and `.CLIP_stop_at_last_layers` (clip skip),
//! `send_images`; img2img's `init_images` (the first), `denoising_strength`, `mask`, `mask_blur`,
//! `inpainting_mask_invert`, `resize_mode`. Everything else is read and ignored (`subseed`, `restore_faces`,
//! `tiling`, `enable_hr`, `inpainting_fill`, `inpaint_full_res`, `script_name`, `alwayson_scripts`, ...).
//! Unlike A1111, a missing `width`, `height` or `steps` is the model's own default, not 512 and 50.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ImageInput, JobSubmission};
use crate::protocol::ImageResult;
use crate::vocab::{ImageFormat, ResizeMode};

/// A1111's sampler names for the schedulers sd-rbee has: (name, aliases, sd-rbee scheduler).
pub const SAMPLERS: [(&str, &[&str], &str); 6] = [
    ("Euler a", &["k_euler_a", "k_euler_ancestral"], "euler_a"),
    ("Euler", &["k_euler"], "euler"),
    ("DPM++ 2M", &["k_dpmpp_2m"], "dpmpp_2m"),
    ("DPM++ 2M Karras", &["k_dpmpp_2m_ka"], "dpmpp_2m_karras"),
    ("DDIM", &[], "ddim"),
    ("UniPC", &[], "unipc"),
];

/// The sd-rbee scheduler of an A1111 sampler name (or alias, any case), with its `scheduler` setting.
pub fn scheduler_of(sampler: &str, scheduler: Option<&str>) -> Option<&'static str> {
    let wanted = sampler.trim().to_ascii_lowercase();
    let (_, _, ours) = SAMPLERS.iter().find(|(name, aliases, _)| {
        name.to_ascii_lowercase() == wanted || aliases.iter().any(|a| a.eq_ignore_ascii_case(&wanted))
    })?;
    let karras = scheduler.is_some_and(|s| s.eq_ignore_ascii_case("karras"));
    Some(match *ours {
        "dpmpp_2m" if karras => "dpmpp_2m_karras",
        other => other,
    })
}

/// `POST /sdapi/v1/txt2img` and `POST /sdapi/v1/img2img` (the img2img fields are absent for txt2img).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct A1111Request {
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    /// -1 (or absent): a random seed.
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub cfg_scale: Option<f64>,
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    #[serde(default)]
    pub sampler_name: Option<String>,
    /// The older name of `sampler_name`.
    #[serde(default)]
    pub sampler_index: Option<String>,
    /// `Karras` turns `DPM++ 2M` into `DPM++ 2M Karras`.
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub batch_size: Option<u32>,
    #[serde(default)]
    pub n_iter: Option<u32>,
    /// `sd_model_checkpoint` picks the model; `CLIP_stop_at_last_layers` is the clip skip.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub override_settings: serde_json::Map<String, Value>,
    /// False: the answer carries no images (they are still stored).
    #[serde(default = "yes")]
    pub send_images: bool,
    #[serde(default)]
    pub init_images: Vec<String>,
    #[serde(default)]
    pub denoising_strength: Option<f64>,
    #[serde(default)]
    pub mask: Option<String>,
    #[serde(default)]
    pub mask_blur: Option<u32>,
    /// 1: repaint what the mask leaves black.
    #[serde(default)]
    pub inpainting_mask_invert: u8,
    /// 0 just resize (stretch), 1 crop and resize (sd-rbee's `fit`), 2 resize and fill (`pad`), 3 as 0.
    #[serde(default)]
    pub resize_mode: u8,
}

fn yes() -> bool {
    true
}

/// A request field this cannot honour: (field, message).
pub type FieldError = (&'static str, String);

/// The job's fields as an AUTOMATIC1111 client calls them, for the errors of a job checked after the
/// mapping: `(native, A1111's)`. The image count is `batch_size × n_iter`.
pub const FIELD_NAMES: &[(&str, &str)] = &[
    ("num_images", "batch_size"),
    ("guidance", "cfg_scale"),
    ("strength", "denoising_strength"),
    ("init_image", "init_images"),
    ("scheduler", "sampler_name"),
    ("clip_skip", "override_settings.CLIP_stop_at_last_layers"),
    ("model", "override_settings.sd_model_checkpoint"),
];

impl A1111Request {
    /// The model the request asks for: `override_settings.sd_model_checkpoint` as A1111 titles it
    /// (`name.safetensors [hash]`), reduced to the name.
    pub fn checkpoint(&self) -> Option<String> {
        let title = self.override_settings.get("sd_model_checkpoint")?.as_str()?.trim();
        let name = title.split(" [").next().unwrap_or(title).trim();
        let name = [".safetensors", ".ckpt"].iter().fold(name, |n, ext| n.strip_suffix(ext).unwrap_or(n));
        Some(name.to_string()).filter(|n| !n.is_empty())
    }

    /// The job, for `model` (already chosen); `img2img` says which endpoint was called.
    pub fn to_submission(&self, model: &str, img2img: bool) -> Result<JobSubmission, FieldError> {
        let mut job = JobSubmission::new(model, self.prompt.clone());
        job.negative_prompt = Some(self.negative_prompt.clone()).filter(|n| !n.is_empty());
        job.seed = match self.seed {
            None | Some(-1) => None,
            Some(seed) => Some(u64::try_from(seed).map_err(|_| ("seed", format!("{seed} is neither -1 nor a seed")))?),
        };
        (job.steps, job.guidance, job.width, job.height) = (self.steps, self.cfg_scale, self.width, self.height);
        let sampler = self.sampler_name.as_deref().or(self.sampler_index.as_deref());
        if let Some(sampler) = sampler.filter(|s| !s.is_empty()) {
            let names: Vec<&str> = SAMPLERS.iter().map(|(n, _, _)| *n).collect();
            let ours = scheduler_of(sampler, self.scheduler.as_deref())
                .ok_or(("sampler_name", format!("{sampler:?} is not one of {}", names.join(", "))))?;
            job.scheduler = Some(ours.to_string());
        }
        let (batch_size, n_iter) = (self.batch_size.unwrap_or(1).max(1), self.n_iter.unwrap_or(1).max(1));
        job.num_images = batch_size.checked_mul(n_iter).ok_or((
            "n_iter",
            format!("batch_size {batch_size} × n_iter {n_iter} is more images than a job can ask"),
        ))?;
        if let Some(skip) = self.override_settings.get("CLIP_stop_at_last_layers") {
            let skip = skip.as_u64().filter(|s| (1..=12).contains(s));
            job.clip_skip =
                Some(skip.ok_or(("override_settings.CLIP_stop_at_last_layers", "must be 1 to 12".into()))? as u32);
        }
        job.output_format = Some(ImageFormat::Png);
        if !img2img {
            return Ok(job);
        }
        let init = self.init_images.first().ok_or(("init_images", "img2img needs an init image".to_string()))?;
        job.init_image = Some(ImageInput::Base64(init.clone()));
        job.strength = self.denoising_strength;
        job.mask = self.mask.clone().filter(|m| !m.is_empty()).map(ImageInput::Base64);
        job.mask_blur = self.mask_blur;
        job.invert_mask = self.inpainting_mask_invert == 1;
        job.resize_mode = Some(match self.resize_mode {
            0 | 3 => ResizeMode::Stretch,
            1 => ResizeMode::Fit,
            2 => ResizeMode::Pad,
            other => return Err(("resize_mode", format!("{other} is not 0 to 3"))),
        });
        Ok(job)
    }
}

/// The answer of `txt2img` and `img2img`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct A1111Response {
    /// Base64 PNGs, without a `data:` prefix.
    pub images: Vec<String>,
    /// The request as given.
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// A JSON object as a string: `seed`, `all_seeds`, `prompt`, `infotexts`, ... as A1111 writes it.
    pub info: String,
}

/// The `info` of an answer: a JSON object as a string, with the fields A1111's clients read (`seed`,
/// `all_seeds`, `infotexts`, ...). Values the request left to the model's defaults are null.
pub fn info(req: &A1111Request, model: &str, images: &[ImageResult], job_id: uuid::Uuid) -> String {
    let seeds: Vec<u64> = images.iter().map(|i| i.seed).collect();
    let (width, height) = images.first().map_or((req.width, req.height), |i| (Some(i.width), Some(i.height)));
    let sampler = req.sampler_name.clone().or(req.sampler_index.clone());
    let infotexts: Vec<String> = seeds
        .iter()
        .map(|seed| {
            let mut text = req.prompt.clone();
            if !req.negative_prompt.is_empty() {
                text.push_str(&format!("\nNegative prompt: {}", req.negative_prompt));
            }
            let mut settings = Vec::new();
            if let Some(steps) = req.steps {
                settings.push(format!("Steps: {steps}"));
            }
            if let Some(sampler) = &sampler {
                settings.push(format!("Sampler: {sampler}"));
            }
            if let Some(cfg) = req.cfg_scale {
                settings.push(format!("CFG scale: {cfg}"));
            }
            settings.push(format!("Seed: {seed}"));
            if let (Some(w), Some(h)) = (width, height) {
                settings.push(format!("Size: {w}x{h}"));
            }
            settings.push(format!("Model: {model}"));
            format!("{text}\n{}", settings.join(", "))
        })
        .collect();
    serde_json::json!({
        "prompt": req.prompt,
        "all_prompts": vec![&req.prompt; seeds.len()],
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": vec![&req.negative_prompt; seeds.len()],
        "seed": seeds.first(),
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; seeds.len()],
        "subseed_strength": 0,
        "width": width,
        "height": height,
        "sampler_name": sampler,
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size.unwrap_or(1),
        "restore_faces": false,
        "sd_model_name": model,
        "sd_model_hash": null,
        "denoising_strength": req.denoising_strength,
        "clip_skip": req.override_settings.get("CLIP_stop_at_last_layers").and_then(Value::as_u64).unwrap_or(1),
        "styles": [],
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "job_id": job_id,
    })
    .to_string()
}

/// One entry of `GET /sdapi/v1/sd-models`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct A1111Model {
    pub title: String,
    pub model_name: String,
    pub hash: Option<String>,
    pub sha256: Option<String>,
    pub filename: String,
    pub config: Option<String>,
}

impl A1111Model {
    pub fn named(name: &str) -> Self {
        Self {
            title: name.to_string(),
            model_name: name.to_string(),
            hash: None,
            sha256: None,
            filename: name.to_string(),
            config: None,
        }
    }
}

/// One entry of `GET /sdapi/v1/samplers`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct A1111Sampler {
    pub name: String,
    pub aliases: Vec<String>,
    #[schema(value_type = Object)]
    pub options: serde_json::Map<String, Value>,
}

pub fn samplers() -> Vec<A1111Sampler> {
    SAMPLERS
        .iter()
        .map(|(name, aliases, _)| A1111Sampler {
            name: name.to_string(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            options: Default::default(),
        })
        .collect()
}

/// `GET /sdapi/v1/progress`: the newest job this caller sent through the A1111 endpoints that has not ended.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct A1111Progress {
    /// 0 to 1.
    pub progress: f64,
    /// Seconds left, as A1111 estimates them.
    pub eta_relative: f64,
    pub state: A1111ProgressState,
    /// Always null: sd-rbee's previews are in the job's events (`GET /v1/jobs/{id}/events`).
    pub current_image: Option<String>,
    pub textinfo: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct A1111ProgressState {
    pub skipped: bool,
    pub interrupted: bool,
    /// The job's id, or empty when none runs.
    pub job: String,
    pub job_count: u32,
    pub job_timestamp: String,
    pub job_no: u32,
    pub sampling_step: u32,
    pub sampling_steps: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_fields_become_a_job() {
        let req: A1111Request = serde_json::from_value(serde_json::json!({
            "prompt": "a fox", "negative_prompt": "", "seed": 42, "steps": 3, "cfg_scale": 5.5, "width": 64,
            "height": 64, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "batch_size": 2, "n_iter": 2,
            "restore_faces": false, "override_settings": {"sd_model_checkpoint": "tiny.safetensors [abc123]",
            "CLIP_stop_at_last_layers": 2}
        }))
        .unwrap();
        assert_eq!(req.checkpoint().as_deref(), Some("tiny"));
        let job = req.to_submission("tiny", false).unwrap();
        assert_eq!((job.seed, job.steps, job.guidance, job.num_images), (Some(42), Some(3), Some(5.5), 4));
        assert_eq!(
            (job.scheduler.as_deref(), job.clip_skip, job.negative_prompt),
            (Some("dpmpp_2m_karras"), Some(2), None)
        );
        assert!(job.init_image.is_none());
        let random = A1111Request { seed: Some(-1), sampler_index: Some("k_euler_a".into()), ..Default::default() };
        let job = random.to_submission("tiny", false).unwrap();
        assert_eq!((job.seed, job.scheduler.as_deref()), (None, Some("euler_a")));
    }

    #[test]
    fn an_image_count_past_u32_is_refused_naming_the_fields() {
        // 641 × 6,700,417 = 2³² + 1: wrapped, it would ask for one image.
        let req = A1111Request { batch_size: Some(641), n_iter: Some(6_700_417), ..Default::default() };
        let (field, message) = req.to_submission("tiny", false).unwrap_err();
        assert_eq!(field, "n_iter");
        assert!(message.contains("641") && message.contains("6700417"), "{message}");
        let fine = A1111Request { batch_size: Some(3), n_iter: Some(5), ..Default::default() };
        assert_eq!(fine.to_submission("tiny", false).unwrap().num_images, 15);
    }

    #[test]
    fn img2img_takes_the_first_init_image_and_the_mask() {
        let req = A1111Request {
            init_images: vec!["aW1n".into()],
            mask: Some("bWFzaw==".into()),
            denoising_strength: Some(0.6),
            inpainting_mask_invert: 1,
            resize_mode: 2,
            ..Default::default()
        };
        let job = req.to_submission("tiny", true).unwrap();
        assert_eq!(job.init_image, Some(ImageInput::Base64("aW1n".into())));
        assert_eq!(job.mask, Some(ImageInput::Base64("bWFzaw==".into())));
        assert_eq!((job.strength, job.invert_mask, job.resize_mode), (Some(0.6), true, Some(ResizeMode::Pad)));
        let none = A1111Request::default();
        assert_eq!(none.to_submission("tiny", true).unwrap_err().0, "init_images");
        for (bad, field) in [
            (A1111Request { sampler_name: Some("Heun".into()), ..Default::default() }, "sampler_name"),
            (A1111Request { seed: Some(-7), ..Default::default() }, "seed"),
        ] {
            assert_eq!(bad.to_submission("tiny", false).unwrap_err().0, field);
        }
    }
}
