//! The client commands that go through a queen's HTTP API: `watch`, `cancel`, `fetch`, `jobs`, `workers`
//! (and `submit --via`). Output is for people, or one JSON document with `--json`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use uuid::Uuid;

use crate::api::{ApiEvent, QueenClient};

/// Where the queen is.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The queen's base URL.
    #[arg(long = "queen", alias = "via", env = "SD_RBEE_QUEEN_URL", default_value = "http://127.0.0.1:8080")]
    pub queen: String,
    /// A bearer token of the queen's API (else SD_RBEE_API_TOKEN, or the first of SD_RBEE_API_TOKENS).
    #[arg(long, hide_env_values = true)]
    pub token: Option<String>,
}

impl ApiArgs {
    pub fn client(&self) -> anyhow::Result<QueenClient> {
        QueenClient::new(&self.queen, api_token(self.token.clone()))
    }
}

/// The client's token: `--token`, else `SD_RBEE_API_TOKEN`, else the first of the queen's own
/// `SD_RBEE_API_TOKENS` (so one exported list serves the queen and its clients on one machine).
pub fn api_token(given: Option<String>) -> Option<String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    given
        .or_else(|| env("SD_RBEE_API_TOKEN"))
        .or_else(|| env("SD_RBEE_API_TOKENS")?.split(',').map(str::trim).find(|t| !t.is_empty()).map(String::from))
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
    /// Read the results straight from the object store (the fleet's --store URL), without asking the queen.
    #[arg(long, env = "SD_RBEE_STORE_URL", hide_env_values = true)]
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
    /// Only this tenant's jobs (with an operator's token; a tenant's token lists its own).
    #[arg(long)]
    pub tenant: Option<String>,
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

pub fn watch(args: WatchArgs) -> anyhow::Result<bool> {
    let client = args.api.client()?;
    runtime()?.block_on(async {
        // Both take the stream up again after the last event seen when it breaks (a queen restarted).
        let mut bar = if args.json { super::follow::JobBar::json() } else { super::follow::JobBar::default() };
        let last = super::follow::on_queen(&client, args.job_id, std::time::Duration::MAX, &mut bar).await;
        bar.finish();
        if args.json {
            return Ok(matches!(last?, ApiEvent::Completed { .. }));
        }
        match last? {
            ApiEvent::Completed { .. } => println!("job {} completed", args.job_id),
            ApiEvent::Failed { code, message, .. } => {
                eprintln!("job {} failed: {code} {message}", args.job_id);
                return Ok(false);
            }
            other => {
                eprintln!("job {} {}", args.job_id, other.name());
                return Ok(false);
            }
        }
        Ok(true)
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
    runtime()?.block_on(async {
        // With --store the queen is not asked at all: the job's manifest beside its images lists them.
        let (images, store) = match &args.store {
            Some(url) => {
                let store = crate::storage::Store::open(url, &Default::default()).context("--store")?;
                let key = crate::protocol::manifest_key(args.job_id);
                let manifest = match store.get(&key).await {
                    Ok(bytes) => bytes,
                    Err(crate::storage::StoreError::NotFound { .. }) => {
                        anyhow::bail!("job {} has no results in {url} (not completed, or another store)", args.job_id)
                    }
                    Err(e) => return Err(e.into()),
                };
                let images = match crate::protocol::decode_event(&manifest)? {
                    crate::protocol::Event::Completed(c) if c.job_id == args.job_id => c.own_images(),
                    other => anyhow::bail!("{key} holds a {} event, not the job's results", other.type_name()),
                };
                (images, Some(store))
            }
            None => {
                let status = args.api.client()?.status(args.job_id).await?;
                if status.status.images.is_empty() {
                    anyhow::bail!("job {} is {} and has no images", args.job_id, status.status.state.name());
                }
                (status.status.images, None)
            }
        };
        std::fs::create_dir_all(&args.out).with_context(|| format!("-o {}", args.out.display()))?;
        for image in &images {
            let bytes = match &store {
                Some(store) => store.get(&image.key).await?.to_vec(),
                None => args.api.client()?.image(args.job_id, image.index).await?,
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
    // Encoded: a model name may hold `+`, `&` or `%`.
    let mut pairs = form_urlencoded::Serializer::new(String::new());
    pairs.append_pair("limit", &args.limit.to_string());
    if let Some(s) = &args.state {
        pairs.append_pair("state", s);
    }
    if let Some(m) = &args.model {
        pairs.append_pair("model", m);
    }
    if let Some(t) = &args.tenant {
        pairs.append_pair("tenant", t);
    }
    let query = format!("?{}", pairs.finish());
    runtime()?.block_on(async {
        let list = client.jobs(&query).await?;
        if args.json {
            println!("{}", serde_json::to_string(&list)?);
        } else {
            for j in &list.jobs {
                let progress = j.progress.as_ref().map(|p| format!(" {}/{}", p.step, p.total)).unwrap_or_default();
                let tenant = j.tenant.as_deref().map(|t| format!(" tenant={t}")).unwrap_or_default();
                println!(
                    "{} {:<9} {}{progress} {}{tenant}",
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
