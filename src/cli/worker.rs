//! `sd-rbee worker`: flags and environment to a [`WorkerConfig`], then serve until SIGINT/SIGTERM.

use std::time::Duration;

use clap::Args;

use super::parse_duration;
use crate::worker::health::{self, Health, Phase};
use crate::worker::{ModelSpec, Worker, WorkerConfig};

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// NATS server URL.
    #[arg(long, env = "SD_RBEE_NATS_URL", hide_env_values = true, default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// Where results go: file:///path (default ./sd-rbee-store), s3://bucket[/prefix], gs://..., az://...
    /// S3 reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP.
    #[arg(long, env = "SD_RBEE_STORE_URL", hide_env_values = true, default_value = "sd-rbee-store")]
    pub store: String,
    /// A model to serve: NAME=PATH_OR_REPO (or a short name alone); repeat for several.
    #[arg(long = "model", short = 'm', required = true, value_name = "NAME=PATH_OR_REPO")]
    pub models: Vec<ModelSpec>,
    #[command(flatten)]
    pub run_on: super::RunOn,
    /// This worker's id (a subject token); default: host name plus a random suffix.
    #[arg(long, env = "SD_RBEE_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Subject prefix of the fleet.
    #[arg(long, env = "SD_RBEE_PREFIX", default_value = "sd")]
    pub prefix: String,
    /// Batches run at the same time (1 is right for one GPU).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// The most images one batch generates: jobs of the same model, size, steps, scheduler spacing,
    /// strength and LoRAs share UNet passes. Default: 1 on the CPU; on GPUs 8 at 512×512, fewer for larger
    /// images (2 at 1024×1024).
    #[arg(long, env = "SD_RBEE_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// How long a job waits for others to share its batch (never longer: a lone job starts after this).
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub batch_window: Duration,
    /// Jobs are taken high priority first, then normal, then low, except one pick in this many (2 or more),
    /// which starts from the lowest priority that has jobs waiting (so low ones never starve); 0: strict
    /// priority.
    #[arg(long, default_value_t = 10, value_parser = parse_priority_share)]
    pub priority_share: u32,
    /// A job not acked within this is redelivered (the worker sends in-progress acks at a third of it, and at
    /// least every 5 s). Give every worker of a fleet the same: they share the job consumers.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,
    /// Deliveries of a job before it is dead-lettered (0 or less: no limit, and a job whose failures are
    /// transient, a store down for good, is retried for ever).
    #[arg(long, default_value_t = 3)]
    pub max_deliver: i64,
    /// Nak delays after transient failures, by delivery, comma-separated (the last repeats).
    #[arg(long, default_value = "1s,5s,30s", value_delimiter = ',', value_parser = parse_duration)]
    pub retry_backoff: Vec<Duration>,
    /// Longest a job may run when it has no earlier deadline, from when its batch starts (a job that waits this
    /// long here without starting is retried, like a transient failure).
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub job_timeout: Duration,
    /// After SIGTERM, how long running jobs may finish before they are handed to other workers.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub grace: Duration,
    /// How long a running batch may go without finishing a step, a VAE call or a tile of a tiled decode once
    /// one of its jobs was told to stop (and at least three times its longest such wait, counting the one it was
    /// in when told; a whole-image decode is one call, so keep it above a decode's time; before a batch's first step
    /// ends it is scaled by the batch's work over one guided 1024² image's, rows × pixels², up to six times): past it the device is taken for hung, the job is
    /// reported as stopped, and the worker drains and exits with an error so that its supervisor restarts it.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub stall_timeout: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// A preview JPEG in progress events every N steps; 0: none.
    #[arg(long, default_value_t = 5)]
    pub preview_every: u32,
    /// Store a running job's checkpoint (latents, scheduler and noise state) every N steps: a job this
    /// worker does not finish (a crash, a preemption, a shutdown) continues from it on the next worker
    /// instead of from step 0. 0: not by steps.
    #[arg(long, default_value_t = 10)]
    pub checkpoint_every: u32,
    /// Also store one when this long has passed since the job's last (for slow steps); 0s: not by time.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub checkpoint_interval: Duration,
    /// How long one storage operation retries transient errors before the job is retried later.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub store_retry: Duration,
    /// Validation limits as JSON, e.g. '{"max_steps": 80}' (defaults in docs/PROTOCOL.md; keep them equal to
    /// the queen's).
    #[arg(long)]
    pub limits: Option<String>,
    /// The LoRA catalogue: jobs name its NAME.safetensors files (`loras: [{"name": NAME, "scale": 0.8}]`).
    #[arg(long, env = "SD_RBEE_LORA_DIR", value_name = "DIR")]
    pub lora_dir: Option<std::path::PathBuf>,
    /// LoRAs in the object store (--store) as PREFIX/NAME.safetensors, for names not in --lora-dir: upload
    /// once, every worker sees them.
    #[arg(long, env = "SD_RBEE_LORA_STORE_PREFIX", value_name = "PREFIX")]
    pub lora_store_prefix: Option<String>,
    /// Also accept LoRA names that are Hugging Face references, owner/name[/FILE.safetensors][@revision],
    /// downloaded into the Hugging Face cache (with --offline: from the cache only).
    #[arg(long)]
    pub lora_hub: bool,
    /// Largest LoRA file accepted, in bytes (the count per job is the `max_loras` limit).
    #[arg(long, default_value_t = crate::loras::LoraLimits::default().max_file_bytes)]
    pub max_lora_bytes: u64,
    /// Disk the LoRAs fetched from the Hub (--lora-hub) may take in the Hugging Face cache (e.g. 10GiB): past
    /// it the least recently used are deleted, never a model's files nor a LoRA used in the last 10 minutes.
    #[arg(long, value_name = "SIZE", default_value = "10GiB", value_parser = crate::worker::catalogue::parse_size)]
    pub lora_hub_cache: u64,
    /// Memory the parsed LoRAs of one job may take together (e.g. 4GiB); a job over it fails INVALID_REQUEST
    /// naming the LoRA that passed it.
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = crate::worker::catalogue::parse_size)]
    pub max_lora_bytes_per_job: u64,
    /// Memory the resident models may take (e.g. 20GiB): the --model entries are a catalogue, loaded on
    /// first use, the least recently used evicted to make room. Default: half the RAM on the CPU, no limit on
    /// GPUs.
    #[arg(long, value_name = "SIZE", value_parser = crate::worker::catalogue::parse_size)]
    pub max_resident_bytes: Option<u64>,
    /// Serve the probes `GET /health` (200 while the process runs) and `GET /ready` (200 once the models are
    /// loaded and the job consumers bound, 503 while starting or draining) on this address.
    #[arg(long, env = "SD_RBEE_HEALTH_LISTEN", value_name = "ADDR")]
    pub health_listen: Option<std::net::SocketAddr>,
    /// The S3 endpoint presigned result URLs name, when their readers reach the store at another address
    /// than this worker (default: the endpoint the worker uses, AWS_ENDPOINT_URL).
    #[arg(long, env = "SD_RBEE_PRESIGN_ENDPOINT", value_name = "URL")]
    pub presign_endpoint: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    /// Pause after every denoising step (simulates a slow device; for tests and demos).
    #[arg(long, default_value = "0s", value_parser = parse_duration, hide = true)]
    pub step_delay: Duration,
    /// How long a publish to JetStream (an event, a dead letter) is retried before it is left for a later try.
    #[arg(long, default_value = "60s", value_parser = parse_duration, hide = true)]
    pub publish_patience: Duration,
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let mut config = WorkerConfig::new(args.nats, args.store, args.models);
    config.device = args.run_on.device;
    config.dtype = args.run_on.dtype;
    config.offline = args.run_on.offline;
    config.worker_id = args.worker_id;
    config.prefix = args.prefix;
    config.concurrency = args.jobs;
    config.max_batch = args.max_batch;
    config.batch_window = args.batch_window;
    config.priority_share = args.priority_share;
    config.consumer.ack_wait = args.ack_wait;
    config.consumer.max_deliver = args.max_deliver;
    config.retry_backoff = args.retry_backoff;
    config.job_timeout = args.job_timeout;
    config.grace = args.grace;
    config.stall_timeout = args.stall_timeout;
    config.heartbeat_interval = args.heartbeat_interval;
    config.preview_every = args.preview_every;
    config.checkpoint_every = args.checkpoint_every;
    config.checkpoint_interval = args.checkpoint_interval;
    config.store.retry_timeout = args.store_retry;
    config.store.presign_endpoint = args.presign_endpoint;
    config.step_delay = args.step_delay;
    config.publish_patience = args.publish_patience;
    config.lora_dir = args.lora_dir;
    config.lora_store_prefix = args.lora_store_prefix;
    config.lora_hub = args.lora_hub;
    config.max_resident_bytes = args.max_resident_bytes;
    config.lora_limits.max_file_bytes = args.max_lora_bytes;
    config.lora_limits.max_hub_cache_bytes = Some(args.lora_hub_cache);
    config.lora_limits.max_job_bytes = args.max_lora_bytes_per_job;
    if let Some(json) = &args.limits {
        config.limits = serde_json::from_str(json).map_err(|e| anyhow::anyhow!("--limits: {e}"))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let served = runtime.block_on(async {
        let health = Health::default();
        if let Some(addr) = args.health_listen {
            let bound = health::serve(addr, health.clone()).await?;
            tracing::info!(addr = %bound, "health probes listening");
        }
        let worker = Worker::start(config).await?;
        health.ready(worker.nats());
        eprintln!("sd-rbee worker {} ready", worker.id());
        worker
            .serve(async move {
                crate::shutdown::signal().await;
                health.set(Phase::Draining);
            })
            .await
    });
    // A batch stuck in a step that never returns (or a download abandoned at its timeout) still holds a
    // blocking thread: the process ends without waiting for it.
    runtime.shutdown_timeout(Duration::from_secs(5));
    served
}

/// `--priority-share`: 0, or 2 and up (1 would serve the lowest priority first every time).
fn parse_priority_share(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(1) => Err("1 would take the lowest priority first every time; give 0 (strict priority) or 2 and up".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}
