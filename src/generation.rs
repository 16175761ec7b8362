//! From what a user asks for to files: the layer between a caller's parameters (the CLI's flags, a bus
//! job) and the diffusion core. It fills the model's defaults, brings init images and masks to the
//! requested size, pastes originals back after inpainting and encodes the results as PNG, JPEG or WebP.
//! `sd-rbee generate` and the worker both go through here, so one job gives the same bytes either way.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, RgbImage};

use crate::device::DeviceSpec;
use crate::diffusion::image::{paste_back, rgb8_to_tensor, tensor_to_rgb8};
use crate::diffusion::{
    GenerateError, GenerationOutput, GenerationRequest, InitImage, LoraWeight, ModelFamily, SchedulerKind,
    StableDiffusion, TimestepSpacing,
};
use crate::hub::RegistryEntry;
use sha2::{Digest, Sha256};

use crate::image_input::{self, ResizeMode};
use crate::protocol::ImageFormat;
use crate::vocab::{DEFAULT_IMG2IMG_STRENGTH, DEFAULT_INPAINT_STRENGTH, DEFAULT_MASK_BLUR, DEFAULT_NUM_IMAGES};

/// A loaded pipeline and the registry entry it came from, if it was named by a short name.
pub struct LoadedModel {
    pub pipeline: StableDiffusion,
    pub entry: Option<&'static RegistryEntry>,
    /// How the model was named, for people (folder, repo id or short name).
    pub display: String,
    /// What was loaded: a digest of each file's name (below the model's folder), size, and first and last
    /// 64 KiB, and of the load's options (a VAE or config given beside it, the prediction type). The same on
    /// every node that has the same files wherever they are; other weights at the same path (a model updated
    /// in place, a fine-tune of the same shapes) give another. Cheap: a few hundred KB read.
    pub weights_stamp: String,
    /// Each file's size, modification time and inode: local to this node and read without reading a file,
    /// it tells files replaced in place whose edges are the same (a LoRA merged into some tensors of the same
    /// shapes).
    pub files_signature: String,
    pub load_ms: f64,
}

/// How a model is loaded, beside where it is.
#[derive(Clone, Debug, Default)]
pub struct ModelOptions {
    pub device: DeviceSpec,
    pub dtype: Option<DType>,
    /// Use only the Hugging Face cache (also HF_HUB_OFFLINE=1).
    pub offline: bool,
    /// Single-file checkpoints: the diffusers folder with the architecture, scheduler and tokenizers.
    pub config: Option<PathBuf>,
    /// A VAE folder or file to use instead of the model's.
    pub vae: Option<PathBuf>,
    /// `epsilon`, `v_prediction` or `sample` instead of the model's.
    pub prediction_type: Option<String>,
    /// Hub models resolved once for the process (a worker's), so every load is of the same commit.
    pub pins: Option<std::sync::Arc<crate::hub::Pins>>,
}

/// The pipeline folder of `spec`, a Hub repo id or a short name (or a diffusers folder), as `opts` has it
/// resolved: its weight variant (fp16 for f16), offline or not, once for the process with its pins.
pub fn resolve_hub(spec: &str, opts: &ModelOptions) -> anyhow::Result<crate::hub::ResolvedModel> {
    let mut hub = crate::hub::HubOptions::from_env();
    hub.offline |= opts.offline;
    hub.prefer_fp16 = opts.dtype == Some(DType::F16);
    match &opts.pins {
        Some(pins) => pins.resolve(spec, &hub),
        None => crate::hub::resolve(spec, &hub),
    }
}

/// Where a model's weights come from: made up from a seed, one checkpoint file, or a diffusers folder (local,
/// or a Hub snapshot).
enum Weights {
    Random,
    File(PathBuf),
    Folder(crate::hub::ResolvedModel),
}

impl Weights {
    /// `spec` (`random:…`, a single-file `.safetensors` or pickle checkpoint, a local folder, a Hub repo id or
    /// a short name) resolved as `opts` says.
    fn of(spec: &str, opts: &ModelOptions) -> anyhow::Result<Self> {
        if spec.starts_with(RANDOM_PREFIX) {
            return Ok(Weights::Random);
        }
        let path = std::path::Path::new(spec);
        if path.is_file() || crate::diffusion::checkpoint::is_pickle(path) {
            return Ok(Weights::File(path.to_path_buf()));
        }
        Ok(Weights::Folder(resolve_hub(spec, opts)?))
    }

    /// Their [`LoadedModel::weights_stamp`], or with `local` their [`LoadedModel::files_signature`].
    fn stamp(&self, spec: &str, opts: &ModelOptions, local: bool) -> String {
        let of = if local { files_signature } else { weights_stamp };
        match self {
            Weights::Random => spec.to_string(),
            Weights::File(path) => of(path, opts),
            Weights::Folder(resolved) => of(&resolved.dir, opts),
        }
    }
}

/// Resolves `spec` (a local folder, a single-file `.safetensors` checkpoint, a Hub repo id or a short name)
/// and loads it as `opts` says.
pub fn load_model(spec: &str, opts: &ModelOptions) -> anyhow::Result<LoadedModel> {
    use anyhow::Context;
    let start = std::time::Instant::now();
    let dtype = opts.dtype.unwrap_or(DType::F32);
    let load_opts = crate::diffusion::LoadOptions {
        device: opts.device.open()?,
        dtype,
        config: opts.config.clone(),
        vae: opts.vae.clone(),
        prediction_type: opts.prediction_type.clone(),
    };
    let weights = Weights::of(spec, opts)?;
    let (weights_stamp, files_signature) = (weights.stamp(spec, opts, false), weights.stamp(spec, opts, true));
    let (pipeline, entry, display) = match weights {
        Weights::Random => {
            let (arch, seed) = parse_random(spec.strip_prefix(RANDOM_PREFIX).unwrap_or_default())?;
            (StableDiffusion::random(arch, seed, &load_opts)?, None, spec.to_string())
        }
        Weights::File(path) => {
            let pipeline =
                StableDiffusion::load(&path, &load_opts).with_context(|| format!("cannot load model {spec}"))?;
            (pipeline, None, spec.to_string())
        }
        Weights::Folder(resolved) => {
            let pipeline = StableDiffusion::load(&resolved.dir, &load_opts)
                .with_context(|| format!("cannot load model {}", resolved.display))?;
            (pipeline, resolved.entry, resolved.display)
        }
    };
    let load_ms = start.elapsed().as_secs_f64() * 1000.0;
    Ok(LoadedModel { pipeline, entry, display, weights_stamp, files_signature, load_ms })
}

/// [`LoadedModel::files_signature`] of `spec` as it would load now with `opts`, without loading it.
pub fn files_signature_of(spec: &str, opts: &ModelOptions) -> anyhow::Result<String> {
    Ok(Weights::of(spec, opts)?.stamp(spec, opts, true))
}

/// The regular files at or under `path` (symbolic links followed, as a Hub snapshot's are, but not into a
/// folder being walked), leaving out hidden ones (`.git`, the `.cache` a `--local-dir` download leaves,
/// which differ from node to node), a few folders deep.
fn collect_files(path: &std::path::Path, walking: &mut Vec<PathBuf>, out: &mut Vec<PathBuf>) {
    let Ok(meta) = std::fs::metadata(path) else { return };
    if meta.is_file() {
        out.push(path.to_path_buf());
        return;
    }
    let Ok(real) = std::fs::canonicalize(path) else { return };
    if !meta.is_dir() || walking.len() >= 8 || walking.contains(&real) {
        return;
    }
    walking.push(real);
    for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().starts_with('.') {
            collect_files(&entry.path(), walking, out);
        }
    }
    walking.pop();
}

/// A digest of the model at `path` (a folder or a file) loaded with `opts`: each of its files (and of a config
/// or VAE given beside it) by its name below its root and by what `each_file` hashes of it, then the
/// prediction type.
fn model_digest(
    path: &std::path::Path,
    opts: &ModelOptions,
    each_file: impl Fn(&std::path::Path, &mut Sha256),
) -> String {
    let digest = |root: &std::path::Path, hash: &mut Sha256| {
        let mut files = Vec::new();
        collect_files(root, &mut Vec::new(), &mut files);
        files.sort();
        for file in files {
            let name = file.strip_prefix(root).unwrap_or(&file).to_string_lossy().into_owned();
            hash.update(format!("\0{name}\0").as_bytes());
            each_file(&file, hash);
        }
    };
    let mut hash = Sha256::new();
    digest(path, &mut hash);
    for (what, extra) in [("config", &opts.config), ("vae", &opts.vae)] {
        if let Some(extra) = extra {
            hash.update(format!("\0{what}\0").as_bytes());
            digest(extra, &mut hash);
        }
    }
    hash.update(format!("\0prediction_type\0{:?}", opts.prediction_type).as_bytes());
    hex::encode(hash.finalize())
}

/// [`LoadedModel::weights_stamp`] of the model at `path` loaded with `opts`: each file's size and edges.
fn weights_stamp(path: &std::path::Path, opts: &ModelOptions) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const EDGE: u64 = 64 << 10;
    model_digest(path, opts, |file, hash| {
        let mut edges = Vec::new();
        let len = std::fs::File::open(file).and_then(|mut f| {
            let len = f.metadata()?.len();
            f.by_ref().take(EDGE).read_to_end(&mut edges)?;
            f.seek(SeekFrom::Start(len.saturating_sub(EDGE)))?;
            f.take(EDGE).read_to_end(&mut edges)?;
            Ok(len)
        });
        hash.update(format!("{:?}\0", len.ok()).as_bytes());
        hash.update(Sha256::digest(&edges));
    })
}

/// [`LoadedModel::files_signature`] of the model at `path` loaded with `opts`: each file's size, modification
/// time and (on Unix) device and inode, which a copy, a move or a write over it changes. No file is read.
fn files_signature(path: &std::path::Path, opts: &ModelOptions) -> String {
    model_digest(path, opts, |file, hash| {
        let identity = std::fs::metadata(file).ok().map(|meta| {
            #[cfg(unix)]
            let place = {
                use std::os::unix::fs::MetadataExt;
                (meta.dev(), meta.ino())
            };
            #[cfg(not(unix))]
            let place = (0u64, 0u64);
            (meta.len(), meta.modified().ok(), place)
        });
        hash.update(format!("{identity:?}").as_bytes());
    })
}

/// `random:ARCH[:SEED]` names a real architecture with seeded random weights (benchmarks without downloads).
pub const RANDOM_PREFIX: &str = "random:";

/// `sd15`, `sd21` or `sdxl` (each optionally `-inpaint`), and an optional `:SEED` (default 0).
pub fn parse_random(text: &str) -> anyhow::Result<(crate::diffusion::checkpoint::Architecture, u64)> {
    use crate::diffusion::checkpoint::{Architecture, Family};
    let (name, seed) = match text.split_once(':') {
        Some((name, seed)) => {
            (name, seed.parse().map_err(|_| anyhow::anyhow!("random:{text}: the seed {seed:?} is not a number"))?)
        }
        None => (text, 0),
    };
    let (base, inpainting) = match name.strip_suffix("-inpaint") {
        Some(base) => (base, true),
        None => (name, false),
    };
    let family = match base {
        "sd15" => Family::Sd1,
        "sd21" => Family::Sd2,
        "sdxl" => Family::Sdxl,
        _ => anyhow::bail!("random:{text}: expected sd15, sd21 or sdxl (optionally -inpaint, then :SEED)"),
    };
    Ok((Architecture { family, inpainting, has_vae: true }, seed))
}

/// What the caller asks for; `None` means the model's default.
#[derive(Clone, Debug)]
pub struct Params {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub scheduler: Option<SchedulerKind>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub seed: Option<u64>,
    pub num_images: usize,
    /// Starting latents instead of seeded noise (txt2img).
    pub initial_latents: Option<Tensor>,
    /// img2img / inpainting: the starting picture, and the mask (white = repaint).
    pub init_image: Option<DynamicImage>,
    pub mask: Option<DynamicImage>,
    /// `None`: 0.8, or 1.0 with a mask.
    pub strength: Option<f64>,
    pub mask_blur: f32,
    pub invert_mask: bool,
    /// `None`: paste back for models that are not inpainting models.
    pub paste_back: Option<bool>,
    pub resize: ResizeMode,
    /// Replaces the seeded noise added to the init image.
    pub noise: Option<Tensor>,
    /// LoRAs for this generation, in order.
    pub loras: Vec<LoraWeight>,
    /// A1111's clip skip (1 = the last layer); SD 1.x/2.x only.
    pub clip_skip: Option<usize>,
    /// Decode in tiles; `None`: past 1536 × 1536 pixels.
    pub vae_tiling: Option<bool>,
}

impl Params {
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: None,
            width: None,
            height: None,
            steps: None,
            guidance: None,
            scheduler: None,
            timestep_spacing: None,
            seed: None,
            num_images: DEFAULT_NUM_IMAGES as usize,
            initial_latents: None,
            init_image: None,
            mask: None,
            strength: None,
            mask_blur: DEFAULT_MASK_BLUR as f32,
            invert_mask: false,
            paste_back: None,
            resize: ResizeMode::Fit,
            noise: None,
            loras: Vec::new(),
            clip_skip: None,
            vae_tiling: None,
        }
    }
}

/// A bus job's parameters: its scheduler and spacing names checked (an unknown one is an error naming the
/// field), its seed fixed (derived from its id when it gives none), its sizes left to the model when absent.
/// Its images are the caller's to read (they may be in the object store).
impl TryFrom<&crate::protocol::JobRequest> for Params {
    type Error = crate::protocol::ProtocolError;

    fn try_from(job: &crate::protocol::JobRequest) -> Result<Self, Self::Error> {
        use crate::protocol::ProtocolError;
        let mut p = Params::new(job.prompt.clone());
        p.negative_prompt = job.negative_prompt.clone();
        p.width = job.width.map(|w| w as usize);
        p.height = job.height.map(|h| h as usize);
        p.steps = job.steps.map(|s| s as usize);
        p.guidance = job.guidance;
        p.scheduler = job
            .scheduler
            .as_deref()
            .map(str::parse::<SchedulerKind>)
            .transpose()
            .map_err(|e| ProtocolError::invalid("scheduler", e))?;
        p.timestep_spacing = job
            .timestep_spacing
            .as_deref()
            .map(str::parse::<TimestepSpacing>)
            .transpose()
            .map_err(|e| ProtocolError::invalid("timestep_spacing", e))?;
        p.seed = Some(job.seed_or_derived());
        p.num_images = job.num_images as usize;
        p.strength = job.strength_or_default();
        p.mask_blur = job.mask_blur as f32;
        p.invert_mask = job.invert_mask;
        p.paste_back = Some(job.paste_back);
        p.resize = job.resize_mode;
        p.clip_skip = job.clip_skip.map(|s| s as usize);
        Ok(p)
    }
}

/// A request ready for [`StableDiffusion::generate`], and what [`Prepared::finish`] needs afterwards.
pub struct Prepared {
    pub request: GenerationRequest,
    /// Things the user should see (e.g. a mask of another size was resized).
    pub warnings: Vec<String>,
    original: Option<Tensor>,
    soft_mask: Option<Tensor>,
    paste: bool,
}

fn invalid(field: &'static str, message: impl Into<String>) -> GenerateError {
    GenerateError::InvalidRequest { field, message: message.into() }
}

/// Fills `params`' gaps with the registry entry's defaults (when the model was named by a short name), else
/// the model's own, and prepares the init image and mask.
pub fn prepare(sd: &StableDiffusion, entry: Option<&RegistryEntry>, params: Params) -> Result<Prepared, GenerateError> {
    if params.mask.is_some() && params.init_image.is_none() {
        return Err(invalid("mask", "needs an init image (the picture to inpaint)"));
    }
    if params.init_image.is_none() && (params.strength.is_some() || params.noise.is_some()) {
        let field = if params.strength.is_some() { "strength" } else { "noise" };
        return Err(invalid(field, "needs an init image"));
    }
    let xl = sd.family() == ModelFamily::StableDiffusionXl;
    let native = sd.unet().config().sample_size_px(sd.vae_scale_factor());
    let mut req = GenerationRequest::new(params.prompt);
    req.negative_prompt = params.negative_prompt;
    // An init image sets the size when none is asked for: its own, rounded down to a multiple of 8 (a tiny
    // one is refused only then: resized to a size the job gives, it serves).
    let own = match &params.init_image {
        Some(img) if params.width.is_none() || params.height.is_none() => {
            Some(image_input::default_size(img).map_err(|e| invalid("init_image", format!("{e:#}")))?)
        }
        _ => None,
    };
    req.width = params.width.or(own.map(|s| s.0 as usize)).or(entry.map(|e| e.width as usize)).unwrap_or(native);
    req.height = params.height.or(own.map(|s| s.1 as usize)).or(entry.map(|e| e.height as usize)).unwrap_or(native);
    req.steps = params.steps.or(entry.map(|e| e.steps)).unwrap_or(30);
    req.guidance_scale = params.guidance.or(entry.map(|e| e.guidance)).unwrap_or(if xl { 5.0 } else { 7.5 });
    req.scheduler = match params.scheduler {
        Some(s) => Some(s),
        None => entry
            .map(|e| e.scheduler.parse::<SchedulerKind>())
            .transpose()
            .map_err(|e| invalid("scheduler", e.to_string()))?,
    };
    req.timestep_spacing = match params.timestep_spacing {
        Some(s) => Some(s),
        None => entry
            .and_then(|e| e.timestep_spacing)
            .map(|s| s.parse::<TimestepSpacing>())
            .transpose()
            .map_err(|e| invalid("timestep_spacing", e.to_string()))?,
    };
    req.seed = params.seed;
    req.num_images = params.num_images;
    req.initial_latents = params.initial_latents;
    req.loras = params.loras;
    req.clip_skip = params.clip_skip;
    req.vae_tiling = params.vae_tiling;
    for (field, value) in [("width", req.width), ("height", req.height)] {
        if value == 0 || value % 8 != 0 {
            return Err(invalid(field, format!("must be a positive multiple of 8, got {value}")));
        }
    }

    let mut warnings = Vec::new();
    let (mut original, mut soft_mask) = (None, None);
    if let Some(picture) = &params.init_image {
        let (w, h) = (req.width as u32, req.height as u32);
        let white = image::Rgba([255, 255, 255, 255]);
        let flat = DynamicImage::ImageRgb8(image_input::flatten_rgb(picture));
        let sized = image_input::resize(&flat, w, h, params.resize, white);
        let cpu = &Device::Cpu;
        let pixels = rgb8_to_tensor(&sized.to_rgb8(), cpu)?;
        let mask = match &params.mask {
            Some(m) => {
                let (values, warning) = image_input::mask_values(m, w, h, params.resize, params.invert_mask);
                warnings.extend(warning);
                let soft = image_input::blur_mask(&values, w, h, params.mask_blur);
                soft_mask = Some(Tensor::from_vec(soft, (1, 1, h as usize, w as usize), cpu)?);
                Some(Tensor::from_vec(values, (1, 1, h as usize, w as usize), cpu)?)
            }
            None => None,
        };
        original = Some(pixels.clone());
        let strength =
            params.strength.unwrap_or(if mask.is_some() { DEFAULT_INPAINT_STRENGTH } else { DEFAULT_IMG2IMG_STRENGTH });
        req.init = Some(InitImage { pixels, strength, mask, noise: params.noise });
    }
    // Paste the original back outside the mask: the default for models that are not inpainting models.
    let paste = soft_mask.is_some() && params.paste_back.unwrap_or(!sd.is_inpainting());
    Ok(Prepared { request: req, warnings, original, soft_mask, paste })
}

impl Prepared {
    /// The final images (`[3, H, W]` in [0, 1]): the generated pixels, with the original pasted back
    /// outside the (blurred) mask when that applies.
    pub fn finish(&self, output: &GenerationOutput) -> candle_core::Result<Vec<Tensor>> {
        match (&self.original, &self.soft_mask) {
            (Some(orig), Some(mask)) if self.paste => {
                output.images.iter().map(|i| paste_back(&i.pixels, orig, mask)).collect()
            }
            _ => Ok(output.images.iter().map(|i| i.pixels.clone()).collect()),
        }
    }
}

/// Encodes an RGB image. `quality` (1–100) applies to JPEG and WebP (lossy, through libwebp).
pub fn encode_image(rgb: &RgbImage, format: ImageFormat, quality: u8) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        ImageFormat::Png => rgb.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)?,
        ImageFormat::Jpeg => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(rgb)?,
        ImageFormat::Webp => {
            // `encode` unwraps libwebp's error (over 16383 pixels a side, out of memory): a panic, not an error.
            let encoder = webp::Encoder::from_rgb(rgb.as_raw(), rgb.width(), rgb.height());
            out = encoder
                .encode_simple(false, quality as f32)
                .map_err(|e| anyhow::anyhow!("WebP encoding failed: {e:?}"))?
                .to_vec()
        }
    }
    Ok(out)
}

/// Rounds a final image to 8 bits (as diffusers does) and encodes it.
pub fn encode_tensor(pixels: &Tensor, format: ImageFormat, quality: u8) -> anyhow::Result<Vec<u8>> {
    encode_image(&tensor_to_rgb8(pixels)?, format, quality)
}

/// The default JPEG/WebP quality.
pub const DEFAULT_QUALITY: u8 = 90;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::checkpoint::Family;

    #[test]
    fn the_protocols_scheduler_and_spacing_names_are_the_cores() {
        use crate::vocab::{SCHEDULERS, TIMESTEP_SPACINGS};
        let core: Vec<&str> = crate::diffusion::SchedulerKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(core, SCHEDULERS);
        for name in TIMESTEP_SPACINGS {
            assert!(name.parse::<crate::diffusion::TimestepSpacing>().is_ok(), "{name}");
        }
    }

    #[test]
    fn random_model_names() {
        let (arch, seed) = parse_random("sd15").unwrap();
        assert_eq!((arch.family, arch.inpainting, seed), (Family::Sd1, false, 0));
        let (arch, seed) = parse_random("sdxl-inpaint:42").unwrap();
        assert_eq!((arch.family, arch.inpainting, seed), (Family::Sdxl, true, 42));
        assert!(parse_random("sd3").unwrap_err().to_string().contains("sd15, sd21 or sdxl"));
        assert!(parse_random("sd21:x").unwrap_err().to_string().contains("not a number"));
    }

    #[test]
    fn the_weights_stamp_is_the_files_not_where_they_are() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for dir in [a.path(), b.path()] {
            std::fs::create_dir_all(dir.join("unet")).unwrap();
            std::fs::write(dir.join("model_index.json"), b"{}").unwrap();
            std::fs::write(dir.join("unet/w.safetensors"), vec![1u8; 300_000]).unwrap();
        }
        // What differs from node to node, and a link back up, count for nothing.
        std::fs::create_dir_all(b.path().join(".cache/huggingface")).unwrap();
        std::fs::write(b.path().join(".cache/huggingface/w.metadata"), b"downloaded at 12:00").unwrap();
        std::os::unix::fs::symlink(b.path(), b.path().join("unet/loop")).unwrap();
        let opts = ModelOptions::default();
        let stamp = weights_stamp(a.path(), &opts);
        assert_eq!(stamp, weights_stamp(b.path(), &opts), "the same files elsewhere (another node)");
        let mut weights = vec![1u8; 300_000];
        weights[299_999] = 2;
        std::fs::write(b.path().join("unet/w.safetensors"), &weights).unwrap();
        assert_ne!(stamp, weights_stamp(b.path(), &opts), "other weights of the same size");
        let v = ModelOptions { prediction_type: Some("v_prediction".into()), ..Default::default() };
        assert_ne!(stamp, weights_stamp(a.path(), &v), "another prediction type");
    }

    #[test]
    fn the_files_signature_tells_weights_replaced_in_place_whose_edges_are_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, vec![1u8; 400_000]).unwrap();
        let opts = ModelOptions::default();
        let (stamp, signature) = (weights_stamp(&file, &opts), files_signature(&file, &opts));
        // A merge that changed only tensors in the middle, written over the file (another inode, a later
        // modification time: set apart from the first by more than any file system's resolution).
        let mut merged = vec![1u8; 400_000];
        merged[200_000] = 2;
        let replacement = dir.path().join("merged.tmp");
        std::fs::write(&replacement, &merged).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options().write(true).open(&replacement).unwrap().set_modified(later).unwrap();
        std::fs::rename(&replacement, &file).unwrap();
        assert_eq!(weights_stamp(&file, &opts), stamp, "the edges, all the stamp reads, are the same");
        assert_ne!(files_signature(&file, &opts), signature);
    }

    #[test]
    fn an_image_webp_cannot_hold_is_an_error_not_a_panic() {
        let wide = RgbImage::new(16_384, 8);
        let err = encode_image(&wide, ImageFormat::Webp, 90).unwrap_err();
        assert!(err.to_string().contains("WebP"), "{err:#}");
        assert!(!encode_image(&RgbImage::new(64, 8), ImageFormat::Webp, 90).unwrap().is_empty());
    }
}
