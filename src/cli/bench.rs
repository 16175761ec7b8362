//! `sd-rbee bench`: the numbers the README quotes. `pipeline` times denoising steps (guidance on) and whole
//! images of a model at batch 1..B, after a warm-up run (`--model random:sd15` / `random:sdxl` is the real
//! architecture with seeded random weights: no download); `unet` times classifier-free-guidance UNet calls
//! at batch 1..B images (2..2B rows) of a UNet folder (e.g. the full-size SD 1.5 UNet that
//! `torch_baseline.py sd15-unet` writes, so both sides run the very same weights) or of a built-in
//! architecture with seeded random weights (`--arch`). Each prints `bench: ...` lines (or JSON), with the
//! peak resident memory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::{Args, Subcommand};

use super::{load_model, ModelArgs};
use crate::diffusion::pipeline::median;
use crate::diffusion::unet_2d::{AddedConditions, UNet2DConditionConfig, UNet2DConditionModel};
use crate::diffusion::weights::find_weights;
use crate::diffusion::{BatchMember, GenerationRequest, SchedulerKind, StepCallback};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Median ms per denoising step and per whole image (or batch) for a pipeline, and images/s.
    Pipeline(PipelineBench),
    /// Median seconds of one classifier-free-guidance UNet call per batch size, and image-steps/s.
    Unet(UnetBench),
    /// Seconds and peak memory of one VAE decode of a built-in architecture (seeded random weights), whole
    /// or in tiles: run once per setting, as peak memory is the process's.
    Vae(VaeBench),
}

#[derive(Debug, Args)]
pub struct VaeBench {
    /// `sd15`, `sd21` or `sdxl`.
    #[arg(long, default_value = "sd15")]
    pub arch: String,
    /// Image side in pixels.
    #[arg(long, default_value_t = 2048)]
    pub size: usize,
    /// Decode in tiles (as diffusers' `enable_vae_tiling()`).
    #[arg(long)]
    pub tiled: bool,
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceSpec,
    #[arg(long, default_value = "f32", value_parser = crate::device::parse_dtype)]
    pub dtype: DType,
}

#[derive(Debug, Args)]
pub struct PipelineBench {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 96)]
    pub width: usize,
    #[arg(long, default_value_t = 64)]
    pub height: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// Measured runs after one warm-up run.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Images per batch, comma-separated: that many requests (own seeds) sharing UNet passes, as a worker
    /// batches jobs; `median_image_ms` is then the batch's time.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UnetBench {
    /// A UNet folder (config.json + diffusion_pytorch_model.safetensors).
    #[arg(required_unless_present = "arch", conflicts_with = "arch")]
    pub unet_dir: Option<PathBuf>,
    /// Instead of a folder: the real UNet of `sd15`, `sd21` or `sdxl` with seeded random weights.
    #[arg(long)]
    pub arch: Option<String>,
    /// Images per call, comma-separated (each is two rows: classifier-free guidance).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    /// Latent side (64 = a 512-pixel image; default: the model's own size).
    #[arg(long)]
    pub latent: Option<usize>,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceSpec,
    #[arg(long, default_value = "f32", value_parser = crate::device::parse_dtype)]
    pub dtype: DType,
    #[arg(long)]
    pub json: bool,
    /// Save the first batch size's UNet output (as f32, tensor `out`) to this safetensors file: the same
    /// seeded weights and inputs under another dtype or kernel switch give the numbers to compare against.
    #[arg(long)]
    pub save_output: Option<PathBuf>,
    /// After the timed calls, one more with each component (conv, linear, attention, resnet, ...) timed
    /// on its own, the device waited for at its start and end: `profile: ...` lines, the same components as
    /// `benches/torch_baseline.py unet --profile` reports for diffusers.
    #[arg(long)]
    pub profile: bool,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Pipeline(b) => pipeline(b),
        BenchCommand::Unet(b) => unet(b),
        BenchCommand::Vae(b) => vae(b),
    }
}

fn pipeline(b: PipelineBench) -> anyhow::Result<()> {
    let loaded = load_model(&b.model)?;
    let threads = candle_core::utils::get_num_threads();
    for &images in &b.batch {
        anyhow::ensure!(images > 0, "--batch sizes must be at least 1");
        // One request per image, as separate jobs batched by a worker: each its own seed.
        let requests: Vec<GenerationRequest> = (0..images)
            .map(|i| {
                let mut req = GenerationRequest::new("a photograph of an astronaut riding a horse");
                req.negative_prompt = Some("blurry".into());
                req.width = b.width;
                req.height = b.height;
                req.steps = b.steps;
                req.guidance_scale = b.guidance;
                req.scheduler = b.scheduler;
                req.seed = Some(i as u64);
                req
            })
            .collect();
        let (mut steps, mut walls) = (Vec::new(), Vec::new());
        for run in 0..=b.runs {
            let mut callbacks: Vec<StepCallback> =
                (0..images).map(|_| Box::new(|_: &crate::diffusion::StepInfo| {}) as StepCallback).collect();
            let mut members: Vec<BatchMember> = requests
                .iter()
                .zip(callbacks.iter_mut())
                .map(|(request, on_step)| BatchMember {
                    request,
                    on_step: on_step.as_mut(),
                    cancel: None,
                    on_decode: None,
                })
                .collect();
            let t0 = Instant::now();
            let outputs = loaded.pipeline.generate_batch(&mut members);
            let wall = t0.elapsed().as_secs_f64() * 1000.0;
            let first = outputs.into_iter().next().expect("one output per member")?;
            if run > 0 {
                steps.extend_from_slice(&first.timings.step_ms);
                walls.push(wall);
            }
        }
        let step = median(&steps);
        let image = median(&walls);
        let per_s = images as f64 * 1000.0 / image;
        let peak = peak_rss_bytes().map(|v| v as f64 / 1e9).unwrap_or(f64::NAN);
        if b.json {
            println!(
                "{}",
                serde_json::json!({"bench": "pipeline", "model": loaded.display, "width": b.width, "height": b.height,
                    "steps": b.steps, "images": images, "threads": threads, "blas": blas_name(), "median_step_ms": step,
                    "median_image_ms": image, "images_per_s": per_s, "peak_rss_gb": peak})
            );
        } else {
            println!(
                "bench: sd-rbee pipeline {} {}x{} steps={} images={images} threads={threads} blas={blas} median_step_ms={step:.2} median_image_ms={image:.1} images_per_s={per_s:.3} peak_rss_gb={peak:.2}",
                loaded.display, b.width, b.height, b.steps, blas = blas_name()
            );
        }
    }
    Ok(())
}

/// The most memory this process's CUDA memory pool has held (PyTorch's `max_memory_reserved`), in GB, as
/// ` peak_device_gb=N` for the bench lines; empty elsewhere.
fn device_memory_note(device: &candle_core::Device) -> String {
    #[cfg(feature = "cuda")]
    if let Some(peak) = crate::device::cuda_pool::peak_bytes(device) {
        return format!(" peak_device_gb={:.2}", peak as f64 / 1e9);
    }
    let _ = device;
    String::new()
}

/// Peak resident memory of this process (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The UNet a [`UnetBench`] times: a folder's, or a built-in architecture's with seeded random weights.
fn bench_unet(b: &UnetBench, device: &candle_core::Device) -> anyhow::Result<(UNet2DConditionModel, String)> {
    let (config, vb, what) = match (&b.unet_dir, &b.arch) {
        (Some(dir), _) => {
            let files = find_weights(dir, "diffusion_pytorch_model", b.dtype == DType::F16)?;
            let vb = crate::diffusion::weights::var_builder(&files, b.dtype, device)?;
            (UNet2DConditionConfig::from_file(&dir.join("config.json"))?, vb, dir.display().to_string())
        }
        (None, Some(arch)) => {
            let (architecture, seed) = crate::generation::parse_random(arch)?;
            let folder = crate::diffusion::checkpoint::configs::ConfigFolder::write(architecture)?;
            let config = UNet2DConditionConfig::from_file(&folder.path().join("unet").join("config.json"))?;
            let vb = crate::diffusion::random_weights::random_var_builder(seed, b.dtype, device);
            (config, vb, format!("{}{arch}", crate::generation::RANDOM_PREFIX))
        }
        (None, None) => anyhow::bail!("give a UNet folder or --arch"),
    };
    Ok((UNet2DConditionModel::new(vb, config).context("cannot build the UNet")?, what))
}

/// What runs the CPU's matrix multiplies: the `SD_RBEE_BLAS` library, else the built-in `gemm`.
fn blas_name() -> &'static str {
    crate::diffusion::blas::vendor().map_or("gemm", |b| b.path.as_str())
}

fn unet(b: UnetBench) -> anyhow::Result<()> {
    let device = b.device.open()?;
    let (model, what) = bench_unet(&b, &device)?;
    let config = model.config().clone();
    let latent = b.latent.unwrap_or(config.sample_size_px(8) / 8);
    let threads = candle_core::utils::get_num_threads();
    let mut rng = crate::diffusion::rng::TorchRng::new(1234);
    for &images in &b.batch {
        anyhow::ensure!(images > 0, "--batch sizes must be at least 1");
        let rows = 2 * images;
        let context = rng.randn((rows, 77, config.context_dim()), &device)?.to_dtype(b.dtype)?;
        let latents = rng.randn((rows, config.in_channels, latent, latent), &device)?.to_dtype(b.dtype)?;
        let added = match (config.addition_time_embed_dim, config.projection_class_embeddings_input_dim) {
            (Some(time_dim), Some(proj)) => {
                let px = (latent * 8) as f64;
                Some(AddedConditions {
                    text_embeds: rng.randn((rows, proj - 6 * time_dim), &device)?.to_dtype(b.dtype)?,
                    time_ids: vec![vec![px, px, 0.0, 0.0, px, px]; rows],
                })
            }
            _ => None,
        };
        let forward = || model.forward(&latents, 981.0, &context, added.as_ref());
        let call = || -> anyhow::Result<f64> {
            let t0 = Instant::now();
            let out: Tensor = forward()?;
            device.synchronize()?;
            let _ = out.dims();
            Ok(t0.elapsed().as_secs_f64())
        };
        // Two warm-ups: the first compiles kernels and sizes the memory pool, the second settles cuDNN.
        call()?;
        call()?;
        if let (Some(path), true) = (&b.save_output, images == b.batch[0]) {
            let out = forward()?.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?;
            candle_core::safetensors::save(&std::collections::HashMap::from([("out", out)]), path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let times = crate::device::in_profiler_window(&device, || {
            (0..b.runs).map(|_| call()).collect::<anyhow::Result<Vec<_>>>()
        })??;
        let med = median(&times);
        let memory = device_memory_note(&device);
        let per_s = images as f64 / med;
        let peak = peak_rss_bytes().map(|v| v as f64 / 1e9).unwrap_or(f64::NAN);
        if b.json {
            println!(
                "{}",
                serde_json::json!({"bench": "unet", "model": what, "latent": latent, "images": images, "batch": rows,
                    "threads": threads, "blas": blas_name(), "median_s": med, "images_steps_per_s": per_s, "peak_rss_gb": peak})
            );
        } else {
            println!(
                "bench: sd-rbee unet {what} {dtype} latent {latent}x{latent} images {images} (batch {rows}) threads={threads} blas={blas} median_s={med:.4} image_steps_per_s={per_s:.3} peak_rss_gb={peak:.2}{memory}",
                dtype = crate::device::dtype_name(b.dtype),
                blas = blas_name()
            );
        }
        if b.profile {
            let (_, report) = crate::diffusion::profile::record(&device, forward)?;
            for line in report.to_string().lines() {
                println!("profile: sd-rbee unet images {images} {line}");
            }
        }
    }
    Ok(())
}

fn vae(b: VaeBench) -> anyhow::Result<()> {
    use crate::diffusion::vae::{AutoencoderKL, AutoencoderKLConfig};
    let device = b.device.open()?;
    let (arch, seed) = crate::generation::parse_random(&b.arch)?;
    let folder = crate::diffusion::checkpoint::configs::ConfigFolder::write(arch)?;
    let config = AutoencoderKLConfig::from_file(&folder.path().join("vae").join("config.json"))?;
    let f = config.scale_factor();
    anyhow::ensure!(b.size.is_multiple_of(f) && b.size > 0, "--size must be a positive multiple of {f}");
    let vb = crate::diffusion::random_weights::random_var_builder(seed, b.dtype, &device);
    let model = AutoencoderKL::new(vb, config)?;
    let before = peak_rss_bytes().unwrap_or(0) as f64 / 1e9;
    let latents = crate::diffusion::rng::TorchRng::new(7).randn((1, 4, b.size / f, b.size / f), &device)?;
    let t0 = Instant::now();
    let image = model.decode_to_image(&latents.to_dtype(b.dtype)?, Some(b.tiled))?;
    device.synchronize()?;
    let seconds = t0.elapsed().as_secs_f64();
    let _ = image.dims();
    let peak = peak_rss_bytes().map(|v| v as f64 / 1e9).unwrap_or(f64::NAN);
    let (arch, size, tiled) = (&b.arch, b.size, b.tiled);
    println!(
        "bench: sd-rbee vae random:{arch} {dtype} {size}x{size} tiled={tiled} seconds={seconds:.2} peak_rss_gb={peak:.2} (after loading: {before:.2}){memory}",
        dtype = crate::device::dtype_name(b.dtype),
        memory = device_memory_note(&device)
    );
    Ok(())
}
