//! `sd-rbee submit`: publish one job on the bus, or submit it through a queen; with `--wait`, follow it to
//! the end (progress and what it waits for on stderr) and print the result, as one JSON object with `--json`.
//! An explicit `--nats` or `--queen` decides the path; without one, `SD_RBEE_QUEEN_URL` then
//! `SD_RBEE_NATS_URL` do; the path taken is said on stderr.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use super::follow::{self, JobBar};
use super::parse_duration;
use crate::api::{ApiEvent, JobSubmission};
use crate::bus::BusClient;
use crate::diffusion::{SchedulerKind, TimestepSpacing};
use crate::image_input::ResizeMode;
use crate::protocol::{self, Event, ImageFormat, ImageSource, JobKind, JobRequest};
use crate::vocab::Priority;

#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Publish straight onto the bus at this NATS URL (else SD_RBEE_NATS_URL, when SD_RBEE_QUEEN_URL is not set;
    /// default nats://127.0.0.1:4222).
    #[arg(long)]
    pub nats: Option<String>,
    /// Submit through the queen at this base URL (e.g. http://127.0.0.1:8080; else SD_RBEE_QUEEN_URL).
    #[arg(long, alias = "via")]
    pub queen: Option<String>,
    /// Subject prefix of the fleet.
    #[arg(long, env = "SD_RBEE_PREFIX", default_value = "sd")]
    pub prefix: String,
    /// The short name of a model the fleet serves (a worker's --model NAME).
    #[arg(long, short = 'm')]
    pub model: String,
    #[arg(long, short = 'p')]
    pub prompt: String,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Default: the model's (1024 for SDXL, 512 for SD 1.5), as the worker's model says.
    #[arg(long)]
    pub width: Option<u32>,
    /// Default: the model's.
    #[arg(long)]
    pub height: Option<u32>,
    #[arg(long)]
    pub steps: Option<u32>,
    #[arg(long)]
    pub guidance: Option<f64>,
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    #[arg(long)]
    pub timestep_spacing: Option<TimestepSpacing>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = crate::vocab::DEFAULT_NUM_IMAGES)]
    pub num_images: u32,
    /// img2img (or inpaint with --mask): the starting picture, sent inline.
    #[arg(long, value_name = "FILE")]
    pub init_image: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub mask: Option<PathBuf>,
    #[arg(long)]
    pub strength: Option<f64>,
    #[arg(long, default_value_t = protocol::DEFAULT_MASK_BLUR)]
    pub mask_blur: u32,
    #[arg(long)]
    pub invert_mask: bool,
    #[arg(long)]
    pub no_paste_back: bool,
    #[arg(long, value_enum, default_value_t = ResizeMode::Fit)]
    pub resize: ResizeMode,
    #[arg(long, value_enum, default_value_t = ImageFormat::Png)]
    pub format: ImageFormat,
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub quality: Option<u8>,
    /// A LoRA from the workers' catalogue (their --lora-dir) at SCALE (default 1.0); repeatable.
    #[arg(long = "lora", value_name = "NAME[:SCALE]", value_parser = parse_lora_ref)]
    pub loras: Vec<protocol::LoraRef>,
    /// The job is worthless after this long (it fails with TIMEOUT).
    #[arg(long, value_parser = parse_duration)]
    pub deadline: Option<Duration>,
    /// Which of the model's queues the job waits in: workers take high before normal before low (default:
    /// normal, or the queen's default for your token).
    #[arg(long, value_enum)]
    pub priority: Option<Priority>,
    /// Your key for this request; the queen maps a retried request to the same job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Use this job id (a UUID) instead of a fresh one: publishing the same id twice is one job.
    #[arg(long)]
    pub job_id: Option<uuid::Uuid>,
    /// Follow the job to its end; exit non-zero unless it completes.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// A bearer token of the queen's API (with --queen; else SD_RBEE_API_TOKEN, or the first of
    /// SD_RBEE_API_TOKENS).
    #[arg(long, hide_env_values = true)]
    pub token: Option<String>,
}

/// Where a job goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Bus { url: String, from: &'static str },
    Queen { url: String, from: &'static str },
}

/// The path a job takes: an explicit flag over the environment; both flags at once is an error.
fn route(args: &SubmitArgs, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Route> {
    Ok(match (&args.nats, &args.queen) {
        (Some(_), Some(_)) => {
            anyhow::bail!("--nats and --queen both given: a job goes either onto the bus or through the queen")
        }
        (Some(url), None) => Route::Bus { url: url.clone(), from: "--nats" },
        (None, Some(url)) => Route::Queen { url: url.clone(), from: "--queen" },
        (None, None) => match (env("SD_RBEE_QUEEN_URL"), env("SD_RBEE_NATS_URL")) {
            (Some(url), _) => Route::Queen { url, from: "SD_RBEE_QUEEN_URL" },
            (None, Some(url)) => Route::Bus { url, from: "SD_RBEE_NATS_URL" },
            (None, None) => Route::Bus { url: "nats://127.0.0.1:4222".into(), from: "the default" },
        },
    })
}

/// `NAME[:SCALE]`: a catalogue name, the scale after the last `:` (default 1.0).
fn parse_lora_ref(spec: &str) -> Result<protocol::LoraRef, String> {
    let (name, scale) = match spec.rsplit_once(':') {
        Some((n, s)) => (n, s.parse::<f64>().map_err(|_| format!("{spec}: the scale after `:` is not a number"))?),
        None => (spec, 1.0),
    };
    protocol::validate_lora_name("--lora", name).map_err(|e| e.message)?;
    Ok(protocol::LoraRef { name: name.to_string(), scale })
}

/// Through the queen; the final status as JSON with each image's key and URL.
fn run_via(base: &str, job: &JobRequest, args: &SubmitArgs) -> anyhow::Result<bool> {
    let client = crate::api::QueenClient::new(base, super::jobs::api_token(args.token.clone()))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut submission = JobSubmission::from(job);
        // Asked for, even `normal`: it is then not the token's default priority.
        submission.priority = args.priority;
        let accepted = client.submit(&submission, args.idempotency_key.as_deref()).await?;
        let id = accepted.job_id;
        if !args.wait {
            if args.json {
                println!("{}", serde_json::to_string(&accepted)?);
            } else {
                println!("{id}");
            }
            return Ok(true);
        }
        let mut bar = JobBar::default();
        let last = follow::on_queen(&client, id, args.timeout, &mut bar).await;
        bar.finish();
        let last = last?;
        // The status record follows the events by a moment.
        let mut status = client.status(id).await?;
        for _ in 0..50 {
            if status.status.state.is_terminal() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            status = client.status(id).await?;
        }
        let ok = matches!(last, ApiEvent::Completed { .. });
        if args.json {
            let images: Vec<serde_json::Value> = status
                .status
                .images
                .iter()
                .zip(&status.image_urls)
                .map(|(i, url)| {
                    serde_json::json!({"index": i.index, "key": i.key, "url": url, "width": i.width,
                    "height": i.height, "seed": i.seed, "bytes": i.bytes, "content_type": i.content_type})
                })
                .collect();
            let mut value =
                serde_json::json!({"job_id": id, "model": job.model, "status": last.name(), "images": images});
            if let ApiEvent::Failed { code, message, field, .. } = &last {
                value["error"] = serde_json::json!({"code": code, "message": message, "field": field});
            }
            if !status.status.warnings.is_empty() {
                value["warnings"] = serde_json::to_value(&status.status.warnings)?;
            }
            println!("{value}");
        } else {
            for w in &status.status.warnings {
                eprintln!("warning: {w}");
            }
            match &last {
                ApiEvent::Completed { .. } => {
                    for (i, url) in status.status.images.iter().zip(&status.image_urls) {
                        println!("{} (seed {}) {url}", i.key, i.seed);
                    }
                }
                ApiEvent::Failed { code, message, .. } => eprintln!("error: job {id} failed: {code} {message}"),
                other => eprintln!("error: job {id} {}", other.name()),
            }
        }
        Ok(ok)
    })
}

fn job_of(args: &SubmitArgs) -> anyhow::Result<JobRequest> {
    let kind = match (&args.init_image, &args.mask) {
        (None, None) => JobKind::Txt2Img,
        (Some(_), None) => JobKind::Img2Img,
        (Some(_), Some(_)) => JobKind::Inpaint,
        (None, Some(_)) => anyhow::bail!("--mask needs --init-image (the picture to inpaint)"),
    };
    let mut job = JobRequest::new(kind, args.model.clone(), args.prompt.clone());
    if let Some(id) = args.job_id {
        job.id = id;
    }
    job.negative_prompt = args.negative_prompt.clone();
    job.width = args.width;
    job.height = args.height;
    job.steps = args.steps;
    job.guidance = args.guidance;
    job.scheduler = args.scheduler.map(|s| s.name().to_string());
    job.timestep_spacing = args.timestep_spacing.map(|s| s.name().to_string());
    job.seed = args.seed;
    job.num_images = args.num_images;
    let read = |p: &PathBuf, flag: &str| -> anyhow::Result<ImageSource> {
        Ok(ImageSource::Inline(std::fs::read(p).with_context(|| format!("{flag} {}", p.display()))?))
    };
    job.init_image = args.init_image.as_ref().map(|p| read(p, "--init-image")).transpose()?;
    job.mask = args.mask.as_ref().map(|p| read(p, "--mask")).transpose()?;
    job.strength = args.strength;
    job.mask_blur = args.mask_blur;
    job.invert_mask = args.invert_mask;
    job.paste_back = !args.no_paste_back;
    job.resize_mode = args.resize;
    job.output.format = args.format;
    job.output.quality = args.quality;
    job.priority = args.priority.unwrap_or(Priority::Normal);
    job.deadline = args.deadline.map(|d| job.created_at + d.as_millis() as u64);
    job.idempotency_key = args.idempotency_key.clone();
    job.loras = args.loras.clone();
    Ok(job)
}

pub fn run(args: SubmitArgs) -> anyhow::Result<bool> {
    let job = job_of(&args)?;
    let (nats, from) = match route(&args, |k| std::env::var(k).ok().filter(|v| !v.is_empty()))? {
        Route::Queen { url, from } => {
            if args.job_id.is_some() {
                anyhow::bail!(
                    "--job-id is for jobs published on the bus; the queen gives the job its id (use --idempotency-key \
                     to make a retried submission the same job)"
                );
            }
            eprintln!("submitting through the queen at {url} ({from})");
            return run_via(&url, &job, &args);
        }
        Route::Bus { url, from } => (url, from),
    };
    // The URL may carry a password: say where, not how.
    let shown = crate::bus::NatsUrl::parse(&nats).context("--nats")?.shown;
    eprintln!("publishing on the bus at {shown} ({from})");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let client = BusClient::connect(&nats, &args.prefix).await.with_context(|| format!("--nats {shown}"))?;
        client.submit(&job).await?;
        if !args.wait {
            if args.json {
                println!("{}", serde_json::json!({"job_id": job.id, "status": "queued"}));
            } else {
                println!("{}", job.id);
            }
            return Ok(true);
        }
        let mut bar = JobBar::default();
        let last = follow::on_bus(&client, job.id, &job.model, args.timeout, &mut bar).await;
        bar.finish();
        report(&job, &last?, args.json)
    })
}

/// Prints the final status; true when the job completed.
fn report(job: &JobRequest, last: &Event, json: bool) -> anyhow::Result<bool> {
    let ok = matches!(last, Event::Completed(_));
    if json {
        let mut value = serde_json::json!({"job_id": job.id, "model": job.model, "status": last.type_name()});
        match last {
            Event::Completed(c) => {
                value["images"] = serde_json::to_value(&c.images)?;
                value["timings"] = serde_json::to_value(c.timings)?;
                value["warnings"] = serde_json::to_value(&c.warnings)?;
            }
            Event::Failed(f) => {
                value["error"] = serde_json::json!({"code": f.code, "message": f.message, "field": f.field});
            }
            Event::Cancelled(c) => value["at_step"] = serde_json::json!(c.at_step),
            _ => {}
        }
        println!("{value}");
    } else {
        match last {
            Event::Completed(c) => {
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                for i in &c.images {
                    println!(
                        "{} (seed {}, {}x{}, {} bytes){}",
                        i.key,
                        i.seed,
                        i.width,
                        i.height,
                        i.bytes,
                        i.url.as_deref().map(|u| format!(" {u}")).unwrap_or_default()
                    );
                }
            }
            Event::Failed(f) => eprintln!("error: job {} failed: {} {}", job.id, f.code, f.message),
            Event::Cancelled(_) => eprintln!("job {} was cancelled", job.id),
            _ => {}
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(flags: &[&str]) -> SubmitArgs {
        let mut argv = vec!["sd-rbee", "submit", "-m", "tiny", "-p", "x"];
        argv.extend(flags);
        match crate::cli::Cli::parse_from(argv).command {
            crate::cli::Command::Submit(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn an_explicit_flag_wins_over_the_environment() {
        let env = |k: &str| match k {
            "SD_RBEE_QUEEN_URL" => Some("http://queen:8080".to_string()),
            "SD_RBEE_NATS_URL" => Some("nats://env:4222".to_string()),
            _ => None,
        };
        let bus = |url: &str, from| Route::Bus { url: url.into(), from };
        assert_eq!(route(&args(&["--nats", "nats://mine:4222"]), env).unwrap(), bus("nats://mine:4222", "--nats"));
        let queen = route(&args(&["--via", "http://q:1"]), env).unwrap();
        assert_eq!(queen, Route::Queen { url: "http://q:1".into(), from: "--queen" }, "--via is --queen");
        assert_eq!(
            route(&args(&[]), env).unwrap(),
            Route::Queen { url: "http://queen:8080".into(), from: "SD_RBEE_QUEEN_URL" }
        );
        let only_nats = |k: &str| (k == "SD_RBEE_NATS_URL").then(|| "nats://env:4222".to_string());
        assert_eq!(route(&args(&[]), only_nats).unwrap(), bus("nats://env:4222", "SD_RBEE_NATS_URL"));
        assert_eq!(route(&args(&[]), |_| None).unwrap(), bus("nats://127.0.0.1:4222", "the default"));
        let err = route(&args(&["--nats", "nats://a:1", "--queen", "http://b:2"]), env).unwrap_err().to_string();
        assert!(err.contains("--nats and --queen"), "{err}");
    }
}
