//! The `sd-rbee` command line: argument definitions and dispatch. Each subcommand lives in its own module;
//! errors reach the terminal as one line (`error: ...`) with a non-zero exit code, never as a panic.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::device::{parse_dtype, DeviceSpec};

pub mod bench;
pub mod follow;
pub mod generate;
pub mod healthcheck;
pub mod jobs;
pub mod models;
pub mod queen;
pub mod submit;
pub mod up;
pub mod worker;

#[derive(Debug, Parser)]
#[command(
    name = "sd-rbee",
    version,
    about = "Stable Diffusion on CPU, CUDA or Metal, from the command line or as a worker fleet"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log verbosity (error, warn, info, debug, trace); also RUST_LOG. Default: info for worker and queen,
    /// warn for the rest.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
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
    /// Serve models to the fleet: pull jobs from NATS JetStream, store results in object storage.
    Worker(Box<worker::WorkerArgs>),
    /// Submit a job, onto the bus or through a queen; with --wait, follow it to the end.
    Submit(Box<submit::SubmitArgs>),
    /// The control plane: HTTP API, job status and the fleet's view.
    Queen(Box<queen::QueenArgs>),
    /// Follow a job's events through the queen (progress bar; --json for JSON lines).
    Watch(jobs::WatchArgs),
    /// Cancel a job through the queen.
    Cancel(jobs::CancelArgs),
    /// Download a job's images (through the queen, or from the object store with --store).
    Fetch(jobs::FetchArgs),
    /// List jobs known to the queen.
    Jobs(jobs::JobsArgs),
    /// List the workers the queen has heard from.
    Workers(jobs::WorkersArgs),
    /// The whole fleet on one machine: nats-server, the queen (API and UI) and workers, data in one folder.
    Up(Box<up::UpArgs>),
    /// Probe a health endpoint (GET; success on a 2xx), for container HEALTHCHECKs in images without curl.
    Healthcheck(healthcheck::HealthcheckArgs),
    /// Print the queen's OpenAPI document (what `GET /openapi.json` serves; the TypeScript SDK's types are
    /// generated from it).
    Openapi,
}

/// Where a model comes from and how it runs; shared by every subcommand that loads one.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A local diffusers pipeline folder, a single-file .safetensors checkpoint, a Hugging Face repo id
    /// (owner/name[@revision]) or a short name (`sd-rbee models` lists them).
    #[arg(long, short = 'm', env = "SD_RBEE_MODEL")]
    pub model: String,
    /// For a single-file checkpoint: a diffusers folder whose configs, scheduler and tokenizers describe it
    /// (default: the built-in SD 1.5, 2.1 or XL configuration its tensors point to).
    #[arg(long, value_name = "DIR")]
    pub config: Option<std::path::PathBuf>,
    /// Use this VAE instead of the model's: a diffusers vae/ folder or a .safetensors file (e.g. an
    /// fp16-fixed SDXL VAE).
    #[arg(long, value_name = "FILE_OR_FOLDER")]
    pub vae: Option<std::path::PathBuf>,
    /// What the model predicts, instead of its scheduler config's (SD 2.x single files default to
    /// v_prediction, their inpainting variants to epsilon).
    #[arg(long, value_enum)]
    pub prediction_type: Option<PredictionArg>,
    #[command(flatten)]
    pub run_on: RunOn,
}

/// `--prediction-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PredictionArg {
    Epsilon,
    VPrediction,
    Sample,
}

impl std::fmt::Display for PredictionArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PredictionArg::Epsilon => "epsilon",
            PredictionArg::VPrediction => "v_prediction",
            PredictionArg::Sample => "sample",
        })
    }
}

/// Where models run and whether they may be downloaded; shared by `generate`, `bench` and `worker`.
#[derive(Debug, Clone, Copy, Args)]
pub struct RunOn {
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

fn init_tracing(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// A duration such as `30s`, `500ms`, `2m`, `1h 30m`, `7d` (humantime's syntax) or a plain number of
/// seconds (`1.5`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let seconds: f64 = t.parse().map_err(|_| format!("{text:?} is not a duration (e.g. 30s, 500ms, 2m)"))?;
        // try_from: a number of seconds past what a Duration holds is an error, not a panic.
        return std::time::Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("{text:?} is not a duration we can wait for"));
    }
    humantime::parse_duration(t).map_err(|e| format!("{text:?} is not a duration (e.g. 30s, 500ms, 2m, 1h 30m): {e}"))
}

/// The log level: the one given, else `info` for the long-running services (they log what they do) and
/// `warn` for one-shot commands.
fn log_level<'a>(command: &Command, given: Option<&'a str>) -> &'a str {
    match (given, command) {
        (Some(level), _) => level,
        (None, Command::Worker(_) | Command::Queen(_)) => "info",
        (None, _) => "warn",
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    crate::device::pin_cpu_threads();
    crate::device::keep_freed_memory();
    let cli = Cli::parse();
    let json_logs = match &cli.command {
        Command::Worker(w) => w.log_json,
        Command::Queen(q) => q.log_json,
        _ => false,
    };
    init_tracing(log_level(&cli.command, cli.log_level.as_deref()), json_logs);
    if matches!(cli.command, Command::Generate(_) | Command::Bench(_) | Command::Worker(_) | Command::Up(_)) {
        match crate::diffusion::blas::init() {
            Ok(Some(blas)) => tracing::info!(library = %blas.path, "CPU matrix multiplies run on this BLAS"),
            Ok(None) => {}
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args).map(|()| true),
        Command::Bench(cmd) => bench::run(cmd).map(|()| true),
        Command::Models => models::run().map(|()| true),
        Command::Openapi => queen::print_openapi().map(|()| true),
        Command::Up(args) => up::run(*args).map(|()| true),
        Command::Healthcheck(args) => healthcheck::run(args).map(|()| true),
        Command::Worker(args) => worker::run(*args).map(|()| true),
        Command::Submit(args) => submit::run(*args),
        Command::Queen(args) => queen::run(*args).map(|()| true),
        Command::Watch(args) => jobs::watch(args),
        Command::Cancel(args) => jobs::cancel(args),
        Command::Fetch(args) => jobs::fetch(args),
        Command::Jobs(args) => jobs::jobs(args),
        Command::Workers(args) => jobs::workers(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
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

pub use crate::generation::LoadedModel;

/// Resolves `--model` (local folder, Hub repo or short name) and loads it on `--device` in `--dtype`.
pub fn load_model(args: &ModelArgs) -> anyhow::Result<LoadedModel> {
    let r = args.run_on;
    let opts = crate::generation::ModelOptions {
        device: r.device,
        dtype: Some(r.dtype),
        offline: r.offline,
        config: args.config.clone(),
        vae: args.vae.clone(),
        prediction_type: args.prediction_type.map(|p| p.to_string()),
        // One load: nothing to keep consistent with.
        pins: None,
    };
    crate::generation::load_model(&args.model, &opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        use std::time::Duration;
        for (text, want) in [
            ("30s", Duration::from_secs(30)),
            ("500ms", Duration::from_millis(500)),
            ("2m", Duration::from_secs(120)),
            ("1h 30m", Duration::from_secs(5400)),
            ("7d", Duration::from_secs(7 * 86400)),
            ("1.5", Duration::from_millis(1500)),
            ("15", Duration::from_secs(15)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "soon", "5 parsecs", "1e999", "-3s"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn an_explicit_log_level_wins_over_the_service_default() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).unwrap();
        let worker = parse(&["sd-rbee", "worker", "--model", "tiny=x", "--log-level", "warn"]);
        assert_eq!(log_level(&worker.command, worker.log_level.as_deref()), "warn");
        let worker = parse(&["sd-rbee", "worker", "--model", "tiny=x"]);
        assert_eq!(log_level(&worker.command, worker.log_level.as_deref()), "info");
        let models = parse(&["sd-rbee", "models"]);
        assert_eq!(log_level(&models.command, models.log_level.as_deref()), "warn");
        let queen = parse(&["sd-rbee", "--log-level", "debug", "queen", "--no-auth"]);
        assert_eq!(log_level(&queen.command, queen.log_level.as_deref()), "debug");
    }
}
