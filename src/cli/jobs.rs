//! The client commands that go through a queen's HTTP API: `watch`, `cancel`, `fetch`, `jobs`, `workers`
//! (and `submit --via`). Output is for people, or one JSON document with `--json`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use uuid::Uuid;

use crate::api::{QueenClient, SseMessage};

/// Where the queen is.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The queen's base URL.
    #[arg(long = "queen", env = "SD_RBEE_QUEEN_URL", default_value = "http://127.0.0.1:8080")]
    pub queen: String,
    /// A bearer token of the queen's API.
    #[arg(long, env = "SD_RBEE_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ApiArgs {
    pub fn client(&self) -> anyhow::Result<QueenClient> {
        QueenClient::new(&self.queen, self.token.clone())
    }
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    pub job_id: Uuid,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Print every event as a JSON line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    pub job_id: Uuid,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Clone, Args)]
pub struct FetchArgs {
    pub job_id: Uuid,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Folder to write `<job_id>-<n>.<ext>` into.
    #[arg(long, short = 'o', default_value = ".")]
    pub out: PathBuf,
    /// Read the images straight from the object store (the fleet's --store URL) instead of the queen.
    #[arg(long)]
    pub store: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// queued, running, completed, failed or cancelled.
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct WorkersArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[arg(long)]
    pub json: bool,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// A progress bar on stderr (hidden when stderr is not a terminal) fed by SSE messages.
pub fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} step {pos}/{len} [{bar:30}] {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_message("queued");
    bar
}

pub fn show_on_bar(bar: &indicatif::ProgressBar, m: &SseMessage) {
    match m.event.as_str() {
        "started" => bar.set_message(format!("running on {}", m.data["worker_id"].as_str().unwrap_or("?"))),
        "progress" => {
            bar.set_length(m.data["total"].as_u64().unwrap_or(0));
            bar.set_position(m.data["step"].as_u64().unwrap_or(0));
        }
        _ => {}
    }
}

pub fn watch(args: WatchArgs) -> anyhow::Result<bool> {
    let client = args.api.client()?;
    runtime()?.block_on(async {
        let bar = (!args.json).then(progress_bar);
        let last = client
            .follow(args.job_id, |m| {
                if args.json {
                    println!("{}", serde_json::json!({"event": m.event, "data": m.data}));
                } else if let Some(bar) = &bar {
                    show_on_bar(bar, m);
                }
            })
            .await?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
            match last.event.as_str() {
                "completed" => println!("job {} completed", args.job_id),
                "failed" => eprintln!("job {} failed: {} {}", args.job_id, last.data["code"], last.data["message"]),
                other => eprintln!("job {} {other}", args.job_id),
            }
        }
        Ok(last.event == "completed")
    })
}

pub fn cancel(args: CancelArgs) -> anyhow::Result<bool> {
    let client = args.api.client()?;
    runtime()?.block_on(async {
        let r = client.cancel(args.job_id).await?;
        println!("{} {}", r.job_id, r.state.name());
        Ok(true)
    })
}

pub fn fetch(args: FetchArgs) -> anyhow::Result<bool> {
    let client = args.api.client()?;
    runtime()?.block_on(async {
        let status = client.status(args.job_id).await?;
        if status.status.images.is_empty() {
            anyhow::bail!("job {} is {} and has no images", args.job_id, status.status.state.name());
        }
        std::fs::create_dir_all(&args.out).with_context(|| format!("-o {}", args.out.display()))?;
        let store = match &args.store {
            Some(url) => Some(crate::storage::Store::open(url, &Default::default()).context("--store")?),
            None => None,
        };
        for image in &status.status.images {
            let bytes = match &store {
                Some(store) => store.get(&image.key).await?.to_vec(),
                None => client.image(args.job_id, image.index).await?,
            };
            let ext = image.key.rsplit('.').next().unwrap_or("png");
            let path = args.out.join(format!("{}-{}.{ext}", args.job_id, image.index));
            std::fs::write(&path, &bytes).with_context(|| format!("cannot write {}", path.display()))?;
            println!("{} ({} bytes, seed {})", path.display(), bytes.len(), image.seed);
        }
        Ok(true)
    })
}

pub fn jobs(args: JobsArgs) -> anyhow::Result<bool> {
    let client = args.api.client()?;
    let mut query = format!("?limit={}", args.limit);
    if let Some(s) = &args.state {
        query.push_str(&format!("&state={s}"));
    }
    if let Some(m) = &args.model {
        query.push_str(&format!("&model={m}"));
    }
    runtime()?.block_on(async {
        let list = client.jobs(&query).await?;
        if args.json {
            println!("{}", serde_json::to_string(&list)?);
        } else {
            for j in &list.jobs {
                let progress = j.progress.as_ref().map(|p| format!(" {}/{}", p.step, p.total)).unwrap_or_default();
                println!(
                    "{} {:<9} {}{progress} {}",
                    j.job_id,
                    j.state.name(),
                    j.model,
                    j.worker_id.as_deref().unwrap_or("")
                );
            }
            println!("{} of {} jobs", list.jobs.len(), list.total);
        }
        Ok(true)
    })
}

pub fn workers(args: WorkersArgs) -> anyhow::Result<bool> {
    let client = args.api.client()?;
    runtime()?.block_on(async {
        let workers = client.workers().await?;
        if args.json {
            println!("{}", serde_json::to_string(&workers)?);
        } else {
            for w in &workers {
                let hb = &w.heartbeat;
                println!(
                    "{} {:<7} {} models={} done={} failed={} {}",
                    hb.worker_id,
                    w.liveness(),
                    hb.device,
                    hb.models.join(","),
                    hb.jobs_done,
                    hb.jobs_failed,
                    hb.hostname
                );
            }
        }
        Ok(true)
    })
}
