//! `sd-rbee bench`: the numbers the README quotes. `pipeline` times denoising steps (guidance on, batch 1)
//! and whole images on a model folder, after a warm-up run; `unet` times one classifier-free-guidance UNet
//! call (batch 2) of any UNet folder, e.g. the full-size SD 1.5 UNet that `torch_baseline.py sd15-unet`
//! writes, so both sides run the very same weights. Each prints one `bench: ...` line (or JSON).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::{Args, Subcommand};

use super::{load_model, ModelArgs};
use crate::diffusion::pipeline::median;
use crate::diffusion::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::diffusion::weights::find_weights;
use crate::diffusion::{GenerationRequest, SchedulerKind};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Median ms per denoising step and per whole image for a pipeline.
    Pipeline(PipelineBench),
    /// Median seconds of one UNet call at batch 2 (one CFG step).
    Unet(UnetBench),
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
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UnetBench {
    /// A UNet folder (config.json + diffusion_pytorch_model.safetensors).
    pub unet_dir: PathBuf,
    /// Latent side (64 = a 512-pixel image).
    #[arg(long, default_value_t = 64)]
    pub latent: usize,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceSpec,
    #[arg(long, default_value = "f32", value_parser = crate::device::parse_dtype)]
    pub dtype: DType,
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Pipeline(b) => pipeline(b),
        BenchCommand::Unet(b) => unet(b),
    }
}

fn pipeline(b: PipelineBench) -> anyhow::Result<()> {
    let loaded = load_model(&b.model)?;
    let mut req = GenerationRequest::new("a photograph of an astronaut riding a horse");
    req.negative_prompt = Some("blurry".into());
    req.width = b.width;
    req.height = b.height;
    req.steps = b.steps;
    req.guidance_scale = b.guidance;
    req.scheduler = b.scheduler;
    req.seed = Some(0);
    let mut steps = Vec::new();
    let mut images = Vec::new();
    for run in 0..=b.runs {
        let out = loaded.pipeline.generate(&req, &mut |_| {}, None)?;
        if run > 0 {
            steps.extend_from_slice(&out.timings.step_ms);
            images.push(out.timings.total_ms);
        }
    }
    let step = median(&steps);
    let image = median(&images);
    let threads = candle_core::utils::get_num_threads();
    if b.json {
        println!(
            "{}",
            serde_json::json!({"bench": "pipeline", "model": loaded.display, "width": b.width, "height": b.height,
                "steps": b.steps, "threads": threads, "median_step_ms": step, "median_image_ms": image})
        );
    } else {
        println!(
            "bench: sd-rbee pipeline {} {}x{} steps={} threads={threads} median_step_ms={step:.2} median_image_ms={image:.1}",
            loaded.display, b.width, b.height, b.steps
        );
    }
    Ok(())
}

/// Peak resident memory of this process (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn unet(b: UnetBench) -> anyhow::Result<()> {
    let device = b.device.open()?;
    let config = UNet2DConditionConfig::from_file(&b.unet_dir.join("config.json"))?;
    let files = find_weights(&b.unet_dir, "diffusion_pytorch_model", b.dtype == DType::F16)?;
    let vb = crate::diffusion::weights::var_builder(&files, b.dtype, &device)?;
    let context_dim = config.context_dim();
    let in_channels = config.in_channels;
    let model = UNet2DConditionModel::new(vb, config).context("cannot build the UNet")?;
    if model.needs_added_conditions() {
        anyhow::bail!("bench unet supports UNets without SDXL add-embeddings");
    }
    let mut rng = crate::diffusion::rng::TorchRng::new(1234);
    let context = rng.randn((2, 77, context_dim), &device)?.to_dtype(b.dtype)?;
    let latents = rng.randn((2, in_channels, b.latent, b.latent), &device)?.to_dtype(b.dtype)?;
    let call = || -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let out: Tensor = model.forward(&latents, 981.0, &context, None)?;
        device.synchronize()?;
        let _ = out.dims();
        Ok(t0.elapsed().as_secs_f64())
    };
    call()?; // warm-up
    let times = (0..b.runs).map(|_| call()).collect::<anyhow::Result<Vec<_>>>()?;
    let med = median(&times);
    let peak = peak_rss_bytes().map(|v| v as f64 / 1e9).unwrap_or(f64::NAN);
    if b.json {
        println!(
            "{}",
            serde_json::json!({"bench": "unet", "latent": b.latent, "batch": 2, "median_s": med, "peak_rss_gb": peak})
        );
    } else {
        println!(
            "bench: sd-rbee unet latent {0}x{0} batch 2 threads={1} median_s={med:.3} peak_rss_gb={peak:.2}",
            b.latent,
            candle_core::utils::get_num_threads()
        );
    }
    Ok(())
}
