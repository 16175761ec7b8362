//! The `sd-rbee` command line: argument definitions and dispatch. Each subcommand lives in its own module;
//! errors reach the terminal as one line (`error: ...`) with a non-zero exit code, never as a panic.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::device::{parse_dtype, DeviceSpec};

pub mod bench;
pub mod generate;
pub mod models;

#[derive(Debug, Parser)]
#[command(
    name = "sd-rbee",
    version,
    about = "Stable Diffusion on CPU, CUDA or Metal, from the command line or as a worker fleet"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log verbosity (error, warn, info, debug, trace); also RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    pub log_level: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a text prompt.
    Generate(Box<generate::GenerateArgs>),
    /// Time denoising steps and whole images (pipeline), or one UNet call (unet).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// List the built-in model short names and their defaults.
    Models,
}

/// Where a model comes from and how it runs; shared by every subcommand that loads one.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A local diffusers pipeline folder, a Hugging Face repo id (owner/name[@revision]) or a short name
    /// (`sd-rbee models` lists them).
    #[arg(long, short = 'm', env = "SD_RBEE_MODEL")]
    pub model: String,
    /// cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: candle_core::DType,
    /// Never download; use only the Hugging Face cache (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    crate::device::pin_cpu_threads();
    crate::device::keep_freed_memory();
    let cli = Cli::parse();
    init_tracing(&cli.log_level);
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Models => models::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, without repeating a cause that the message already contains.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text.trim());
    }
    out.replace('\n', " ")
}

/// A loaded pipeline and the registry entry it came from, if it was named by a short name.
pub struct LoadedModel {
    pub pipeline: crate::diffusion::StableDiffusion,
    pub entry: Option<&'static crate::hub::RegistryEntry>,
    pub display: String,
    pub load_ms: f64,
}

/// Resolves `--model` (local folder, Hub repo or short name) and loads it on `--device` in `--dtype`.
pub fn load_model(args: &ModelArgs) -> anyhow::Result<LoadedModel> {
    use anyhow::Context;
    let start = std::time::Instant::now();
    let mut hub_opts = crate::hub::HubOptions::from_env();
    hub_opts.offline |= args.offline;
    hub_opts.prefer_fp16 = args.dtype == candle_core::DType::F16;
    let resolved = crate::hub::resolve(&args.model, &hub_opts)?;
    let device = args.device.open()?;
    let opts = crate::diffusion::LoadOptions { device, dtype: args.dtype };
    let pipeline = crate::diffusion::StableDiffusion::load(&resolved.dir, &opts)
        .with_context(|| format!("cannot load model {}", resolved.display))?;
    Ok(LoadedModel {
        pipeline,
        entry: resolved.entry,
        display: resolved.display,
        load_ms: start.elapsed().as_secs_f64() * 1000.0,
    })
}
