//! `sd-rbee generate`: one prompt in, PNG files out, with a progress bar on a terminal and a one-line
//! summary (or a JSON object with `--json`).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::Args;

use super::{load_model, ModelArgs};
use crate::diffusion::image::tensor_to_rgb8;
use crate::diffusion::{SchedulerKind, TimestepSpacing};
use crate::generation::{self, encode_image, Params};
use crate::image_input::{self, ResizeMode};
use crate::loras::{LoraLibrary, LoraLimits};
use crate::protocol::ImageFormat;

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to draw.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// What to steer away from.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Image width in pixels (a multiple of 8); default: the model's.
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (a multiple of 8); default: the model's.
    #[arg(long)]
    pub height: Option<usize>,
    /// Denoising steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (guidance is applied only when > 1).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras or unipc; default: the model's.
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// leading, linspace or trailing; default: the scheduler config's.
    #[arg(long)]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Random seed (image i of a batch uses seed + i); default: random, reported.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of images.
    #[arg(long, default_value_t = crate::vocab::DEFAULT_NUM_IMAGES as usize)]
    pub num_images: usize,
    /// Start from these latents instead of seeded noise: FILE.safetensors[:TENSOR] (default tensor
    /// `initial_latents`, shape [1,4,H/8,W/8]).
    #[arg(long, value_name = "FILE[:TENSOR]")]
    pub initial_latents: Option<String>,
    /// Also write the decoded images before 8-bit rounding (f32 tensor `image`, [N,3,H,W] in [0,1]).
    #[arg(long, value_name = "FILE.safetensors")]
    pub save_tensor: Option<PathBuf>,
    /// Image-to-image: start from this picture (PNG, JPEG or WebP).
    #[arg(long, value_name = "FILE")]
    pub init_image: Option<PathBuf>,
    /// How much of the schedule to run from the init image, in (0, 1]; default 0.8, or 1.0 with a mask.
    #[arg(long)]
    pub strength: Option<f64>,
    /// Inpainting: white = repaint (needs --init-image). Inpainting models use it as input; other models
    /// re-blend the unmasked region after every step.
    #[arg(long, value_name = "FILE")]
    pub mask: Option<PathBuf>,
    /// Repaint the black region of the mask instead of the white one.
    #[arg(long)]
    pub invert_mask: bool,
    /// Soften the mask's edge by this many pixels (Gaussian) where the original is pasted back.
    #[arg(long, default_value_t = crate::vocab::DEFAULT_MASK_BLUR as f32, value_name = "PX")]
    pub mask_blur: f32,
    /// Composite the untouched original pixels over the result outside the mask (default for models that
    /// are not inpainting models).
    #[arg(long, overrides_with = "no_paste_back")]
    pub paste_back: bool,
    /// Keep the generated pixels everywhere.
    #[arg(long, overrides_with = "paste_back")]
    pub no_paste_back: bool,
    /// png, jpeg or webp; default: from --out's extension, else png.
    #[arg(long, value_enum)]
    pub format: Option<ImageFormat>,
    /// JPEG and WebP quality, 1-100.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub quality: u8,
    /// How the init image and mask are brought to --width x --height.
    #[arg(long, value_enum, default_value_t = ResizeMode::Fit)]
    pub resize: ResizeMode,
    /// Apply a LoRA (kohya or diffusers/PEFT .safetensors) at SCALE (default 1.0, negative subtracts it);
    /// repeatable, the LoRAs add up.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = crate::loras::parse_lora_arg)]
    pub loras: Vec<(PathBuf, f64)>,
    /// A1111's clip skip for SD 1.x/2.x: 1 = the text encoder's last layer (the default), 2 = the one before.
    #[arg(long, value_name = "N")]
    pub clip_skip: Option<usize>,
    /// Decode the image in overlapping tiles (as diffusers' `enable_vae_tiling()`), in bounded memory:
    /// `on`, `off`, or `auto` (tiles past 1536 × 1536 pixels).
    #[arg(long, value_enum, default_value_t = VaeTiling::Auto)]
    pub vae_tiling: VaeTiling,
    /// Replaces the seeded noise added to the init image: FILE.safetensors[:TENSOR] (default tensor `noise`).
    #[arg(long, value_name = "FILE[:TENSOR]")]
    pub noise: Option<String>,
    /// Output file; with several images, `out.png`, `out-1.png`, ...
    #[arg(long, short = 'o', default_value = "out.png")]
    pub out: PathBuf,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Output image encodings.
/// Writes one image file in `format`.
pub fn write_image(rgb: &image::RgbImage, path: &Path, format: ImageFormat, quality: u8) -> anyhow::Result<()> {
    let bytes = encode_image(rgb, format, quality).with_context(|| format!("cannot encode {}", path.display()))?;
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

pub fn output_path(out: &Path, index: usize) -> PathBuf {
    if index == 0 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let name = match out.extension() {
        Some(ext) => format!("{stem}-{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{index}"),
    };
    out.with_file_name(name)
}

/// Reads `FILE[:TENSOR]` from a safetensors file.
pub fn load_tensor_arg(spec: &str, default_name: &str) -> anyhow::Result<Tensor> {
    let (path, name) = if Path::new(spec).is_file() {
        (spec, default_name)
    } else {
        match spec.rsplit_once(':') {
            Some((p, n)) if Path::new(p).is_file() && !n.is_empty() => (p, n),
            _ => bail!("{spec}: no such file"),
        }
    };
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{path} is not a readable safetensors file"))?;
    match tensors.get(name) {
        Some(t) => Ok(t.to_dtype(DType::F32)?),
        None => {
            let mut names: Vec<&String> = tensors.keys().collect();
            names.sort();
            bail!(
                "{path} has no tensor `{name}` (it has: {})",
                names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )
        }
    }
}

fn check_size(field: &str, value: Option<usize>) -> anyhow::Result<()> {
    if let Some(v) = value {
        if v == 0 || v % 8 != 0 {
            bail!("invalid request: `{field}` must be a positive multiple of 8, got {v}");
        }
    }
    Ok(())
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    // Cheap checks before the (possibly slow) model load.
    check_size("width", args.width)?;
    check_size("height", args.height)?;
    let initial_latents = args
        .initial_latents
        .as_deref()
        .map(|s| load_tensor_arg(s, "initial_latents"))
        .transpose()
        .context("--initial-latents")?;
    if args.mask.is_some() && args.init_image.is_none() {
        bail!("--mask needs --init-image (the picture to inpaint)");
    }
    let init_picture = match &args.init_image {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("--init-image {}", path.display()))?;
            Some(image_input::decode(&bytes, "init image")?)
        }
        None => None,
    };
    let mask_picture = match &args.mask {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("--mask {}", path.display()))?;
            Some(image_input::decode(&bytes, "mask")?)
        }
        None => None,
    };
    let noise = args.noise.as_deref().map(|s| load_tensor_arg(s, "noise")).transpose().context("--noise")?;
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!("--out {}: directory {} does not exist", args.out.display(), parent.display());
        }
    }

    let mut hub = crate::hub::HubOptions::from_env();
    hub.offline |= args.model.run_on.offline;
    let library = LoraLibrary::new(None, LoraLimits::default())?.with_hub(hub);
    let loras = library.resolve_files(&args.loras).context("--lora")?;

    let loaded = load_model(&args.model)?;
    let sd = &loaded.pipeline;
    let mut params = Params::new(args.prompt.clone());
    params.negative_prompt = args.negative_prompt.clone();
    params.width = args.width;
    params.height = args.height;
    params.steps = args.steps;
    params.guidance = args.guidance;
    params.scheduler = args.scheduler;
    params.timestep_spacing = args.timestep_spacing;
    params.seed = args.seed;
    params.num_images = args.num_images;
    params.initial_latents = initial_latents;
    params.init_image = init_picture;
    params.mask = mask_picture;
    params.strength = args.strength;
    params.mask_blur = args.mask_blur;
    params.invert_mask = args.invert_mask;
    params.paste_back = match (args.paste_back, args.no_paste_back) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    params.resize = args.resize;
    params.noise = noise;
    params.loras = loras;
    params.clip_skip = args.clip_skip;
    params.vae_tiling = match args.vae_tiling {
        VaeTiling::Auto => None,
        VaeTiling::On => Some(true),
        VaeTiling::Off => Some(false),
    };
    let prepared = generation::prepare(sd, loaded.entry, params)?;
    let req = &prepared.request;

    let bar = progress_bar(req.steps, args.json);
    let mut on_step = |info: &crate::diffusion::StepInfo| {
        if let Some(bar) = &bar {
            bar.set_length(info.total as u64);
            bar.set_position(info.step as u64);
        }
    };
    let output = sd.generate(req, &mut on_step, None)?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let warnings: Vec<String> = prepared.warnings.iter().chain(&output.warnings).cloned().collect();
    for w in &warnings {
        eprintln!("warning: {w}");
    }

    let finals = prepared.finish(&output)?;
    let format = args.format.unwrap_or_else(|| ImageFormat::from_path(&args.out));
    let mut written = Vec::with_capacity(finals.len());
    for (i, (pixels, img)) in finals.iter().zip(&output.images).enumerate() {
        let path = output_path(&args.out, i);
        write_image(&tensor_to_rgb8(pixels)?, &path, format, args.quality)?;
        written.push((path, img.seed));
    }
    if let Some(path) = &args.save_tensor {
        let stacked = Tensor::stack(&finals, 0)?;
        let map: HashMap<String, Tensor> = [("image".to_string(), stacked)].into();
        candle_core::safetensors::save(&map, path).with_context(|| format!("cannot write {}", path.display()))?;
    }

    let t = &output.timings;
    if args.json {
        let images: Vec<serde_json::Value> =
            written.iter().map(|(p, s)| serde_json::json!({"path": p.display().to_string(), "seed": s})).collect();
        let summary = serde_json::json!({
            "model": loaded.display,
            "width": req.width, "height": req.height, "steps": t.step_ms.len(),
            "guidance": req.guidance_scale, "scheduler": output.scheduler.name(),
            "images": images, "warnings": warnings,
            "timings": {"load_ms": loaded.load_ms, "lora_ms": t.lora_ms, "text_encoding_ms": t.text_encoding_ms,
                        "median_step_ms": t.median_step_ms(), "denoising_ms": t.denoising_ms,
                        "decoding_ms": t.decoding_ms, "total_ms": t.total_ms},
        });
        println!("{summary}");
    } else {
        let files: Vec<String> = written.iter().map(|(p, s)| format!("{} (seed {s})", p.display())).collect();
        println!(
            "wrote {} · {}x{} · {} {} steps, guidance {} · {:.1} ms/step · {:.2} s total (load {:.2} s)",
            files.join(", "),
            req.width,
            req.height,
            output.scheduler,
            t.step_ms.len(),
            req.guidance_scale,
            t.median_step_ms(),
            t.total_ms / 1000.0,
            loaded.load_ms / 1000.0
        );
    }
    Ok(())
}

fn progress_bar(steps: usize, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {elapsed} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    Some(bar)
}

/// `--vae-tiling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VaeTiling {
    Auto,
    On,
    Off,
}
