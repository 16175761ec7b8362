//! The result cache's key. Generation is reproducible (a seed fixes the noise), so two jobs that agree on
//! everything that decides their pixels get the same bytes, and the second can be answered with copies of
//! the first's images. [`cache_description`] is that everything, as canonical text; a worker hashes it
//! (SHA-256) to the key [`cache_key`], where it keeps the `completed` event of the job that made the images.

use serde_json::json;

use super::JobRequest;

/// What decides a job's pixels beyond the job message, as the worker that runs it knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheContext {
    /// The model's identity: a digest of its weights and configuration (not its name, which is only a
    /// worker's label for it).
    pub model: String,
    /// The job's LoRAs' content digests, in the job's order.
    pub loras: Vec<String>,
    /// Content digests of the init image and the mask.
    pub init_image: Option<String>,
    pub mask: Option<String>,
    /// The device class (`cpu`, `cuda`, `metal`) and dtype: other kernels round differently.
    pub device: String,
    pub dtype: String,
    /// The worker's numerics: its build and the switches that pick kernels which round differently (TF32,
    /// Winograd, a vendor BLAS...). Workers of other builds or settings share the store, not their pixels.
    pub numerics: String,
}

/// The canonical text of everything that decides `job`'s pixels (JSON with sorted keys); `None` when the job
/// may not use the cache: it has no seed (each run is meant to differ), or it says `cache: false`.
pub fn cache_description(job: &JobRequest, ctx: &CacheContext) -> Option<String> {
    if !job.cache {
        return None;
    }
    let seed = job.seed?;
    let loras: Vec<_> = ctx.loras.iter().zip(&job.loras).map(|(digest, l)| json!([digest, l.scale])).collect();
    let mut description = json!({
        "v": 2,
        "kind": job.kind,
        "model": ctx.model,
        "device": ctx.device,
        "dtype": ctx.dtype,
        "numerics": ctx.numerics,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "width": job.width,
        "height": job.height,
        "steps": job.steps,
        "guidance": job.guidance,
        "scheduler": job.scheduler,
        "timestep_spacing": job.timestep_spacing,
        "seed": seed,
        "num_images": job.num_images,
        "init_image": ctx.init_image,
        "mask": ctx.mask,
        "strength": job.strength,
        "mask_blur": job.mask_blur,
        "invert_mask": job.invert_mask,
        "paste_back": job.paste_back,
        "resize_mode": job.resize_mode,
        "output": job.output,
        "loras": loras,
        "clip_skip": job.clip_skip,
    });
    // Each tenant has its own entries: a hit would tell one tenant that another asked for the same image.
    // (Only when there is one, so that the keys of jobs without a tenant stay what they were.)
    if let Some(tenant) = &job.tenant {
        description["tenant"] = json!(tenant);
    }
    Some(description.to_string())
}

/// `cache/<hex digest>.msgpack`: where the `completed` event of the job a description's digest names is kept.
pub fn cache_key(digest_hex: &str) -> String {
    format!("cache/{digest_hex}.msgpack")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{JobKind, LoraRef};

    fn context() -> CacheContext {
        CacheContext {
            model: "m1".into(),
            loras: vec!["l1".into()],
            init_image: None,
            mask: None,
            device: "cpu".into(),
            dtype: "f32".into(),
            numerics: "sd-rbee 0.1.0 r2".into(),
        }
    }

    #[test]
    fn every_pixel_deciding_field_changes_the_description_and_nothing_else_does() {
        let mut job = JobRequest::with_id(uuid::Uuid::nil(), 1, JobKind::Txt2Img, "tiny", "a boat");
        job.seed = Some(7);
        job.loras = vec![LoraRef { name: "style".into(), scale: 0.5 }];
        let base = cache_description(&job, &context()).unwrap();
        // Not the pixels: the id, the creation time, the deadline, the idempotency key, the model's name.
        let mut same = job.clone();
        (same.id, same.created_at, same.deadline, same.idempotency_key) =
            (uuid::Uuid::from_u128(9), 5, Some(10), Some("k".into()));
        same.model = "another-name".into();
        same.loras[0].name = "renamed".into();
        assert_eq!(cache_description(&same, &context()).unwrap(), base);
        type Change = Box<dyn Fn(&mut JobRequest, &mut CacheContext)>;
        let changes: Vec<(&str, Change)> = vec![
            ("prompt", Box::new(|j, _| j.prompt.push('!'))),
            ("negative", Box::new(|j, _| j.negative_prompt = Some(String::new()))),
            ("width", Box::new(|j, _| j.width = Some(64))),
            ("steps", Box::new(|j, _| j.steps = Some(3))),
            ("guidance", Box::new(|j, _| j.guidance = Some(7.5))),
            ("scheduler", Box::new(|j, _| j.scheduler = Some("euler".into()))),
            ("seed", Box::new(|j, _| j.seed = Some(8))),
            ("images", Box::new(|j, _| j.num_images = 2)),
            ("lora scale", Box::new(|j, _| j.loras[0].scale = 0.6)),
            ("format", Box::new(|j, _| j.output.quality = Some(50))),
            ("clip skip", Box::new(|j, _| j.clip_skip = Some(2))),
            ("model weights", Box::new(|_, c| c.model = "m2".into())),
            ("lora weights", Box::new(|_, c| c.loras[0] = "l2".into())),
            ("init image", Box::new(|_, c| c.init_image = Some("i".into()))),
            ("device", Box::new(|_, c| c.device = "cuda".into())),
            ("dtype", Box::new(|_, c| c.dtype = "f16".into())),
            ("numerics", Box::new(|_, c| c.numerics.push_str("; SD_RBEE_TF32=1"))),
            ("tenant", Box::new(|j, _| j.tenant = Some("acme".into()))),
        ];
        // A job without a tenant keeps the key it had before tenants.
        assert!(!base.contains("tenant"), "{base}");
        for (what, change) in changes {
            let (mut j, mut c) = (job.clone(), context());
            change(&mut j, &mut c);
            assert_ne!(cache_description(&j, &c).unwrap(), base, "{what}");
        }
        let unseeded = JobRequest { seed: None, ..job.clone() };
        assert_eq!(cache_description(&unseeded, &context()), None, "no seed: never cached");
        let opted_out = JobRequest { cache: false, ..job };
        assert_eq!(cache_description(&opted_out, &context()), None);
    }
}
