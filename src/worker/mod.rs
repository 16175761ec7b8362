//! `sd-rbee worker`: a generation node. It loads its models once, binds the streams and three durable pull
//! consumers per model (one per priority, see `pull`), then pulls only as many jobs as it runs at a time. While a job runs it publishes
//! progress, sends in-progress acks and listens for cancel requests; results go to the object store before
//! `completed` is published and the job is acked. Heartbeats say who it is and what it does.
//!
//! Shutdown (SIGINT/SIGTERM, or the future given to [`Worker::serve`]): stop pulling, let running jobs
//! finish within the grace period, else stop them between two steps and nak them so another worker takes
//! them, publish a last heartbeat, drain the connection.

mod batcher;
mod cache;
pub mod catalogue;
mod config;
pub mod control;
mod dead_letter;
mod effects;
mod generate;
pub mod health;
pub mod job;
pub mod policy;
mod pull;
mod resume;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus;
use crate::device::DeviceSpec;
use crate::loras::{LoraLibrary, LoraLimits};
use crate::protocol::{self, Heartbeat, Subjects, PROTOCOL_VERSION};
use crate::storage::Store;
use batcher::{BatchSettings, Batcher};
use catalogue::Catalogue;
pub use config::{ModelSpec, WorkerConfig};
use control::{Control, StopReason};

/// State shared by the worker's tasks.
pub struct Shared {
    pub config: WorkerConfig,
    pub worker_id: String,
    pub hostname: String,
    pub device: String,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub store: Store,
    /// The models it serves, resident or loaded on first use.
    pub catalogue: Catalogue,
    pub loras: Arc<LoraLibrary>,
    pub control: Control,
    /// Groups the jobs' generations into batches.
    pub batcher: Batcher,
    /// The models' identities for the result cache, worked out once each.
    pub model_identities: cache::Identities,
    pub started: Instant,
    /// Cancelled when a batch is stuck in a step ([`WorkerConfig::stall_timeout`]): the worker drains and exits.
    pub stalled: CancellationToken,
}

/// A worker with its models loaded and its consumers bound, ready to serve.
pub struct Worker {
    shared: Arc<Shared>,
    /// Each model's job consumers, highest priority first.
    consumers: Vec<(String, pull::Queues)>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// A worker id from the host name: subject-token safe, with a random suffix so two workers on one host
/// differ.
fn default_worker_id(host: &str) -> String {
    let clean: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .take(64)
        .collect();
    format!("{clean}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6])
}

impl Worker {
    /// Loads the models, opens the store, connects to NATS and binds the streams and consumers. Errors
    /// here are configuration errors: the worker never reports ready.
    pub async fn start(config: WorkerConfig) -> anyhow::Result<Self> {
        if config.models.is_empty() {
            bail!("no --model given: a worker serves at least one model (--model NAME=PATH_OR_REPO)");
        }
        if config.concurrency == 0 {
            bail!("--jobs must be at least 1");
        }
        if config.max_batch == Some(0) {
            bail!("--max-batch must be at least 1");
        }
        // Zero periods would spin (in-progress acks) or panic (the heartbeat timer).
        for (flag, period, least) in [
            ("--ack-wait", config.consumer.ack_wait, Duration::from_secs(1)),
            ("--heartbeat-interval", config.heartbeat_interval, Duration::from_millis(100)),
            ("--job-timeout", config.job_timeout, Duration::from_millis(1)),
        ] {
            if period < least {
                bail!("{flag} must be at least {least:?}, got {period:?}");
            }
        }
        let mut names = std::collections::HashSet::new();
        for m in &config.models {
            if !names.insert(m.name.as_str()) {
                bail!("--model {} is given twice", m.name);
            }
        }
        let subjects = Subjects::new(config.prefix.clone()).map_err(|e| anyhow::anyhow!("--prefix {e}"))?;
        let hostname = hostname();
        let worker_id = match &config.worker_id {
            Some(id) => {
                protocol::validate_worker_id(id).map_err(|e| anyhow::anyhow!("--worker-id {e}"))?;
                id.clone()
            }
            None => default_worker_id(&hostname),
        };
        let lora_limits = LoraLimits { max_per_job: config.limits.max_loras, ..config.lora_limits.clone() };
        let store = Store::open(&config.store_url, &config.store).context("--store")?;
        store.check().await.context("--store")?;
        let mut loras = LoraLibrary::new(config.lora_dir.clone(), lora_limits)?;
        if let Some(prefix) = &config.lora_store_prefix {
            loras = loras.with_store(store.clone(), prefix)?;
        }
        if config.lora_hub {
            let mut hub = crate::hub::HubOptions::from_env();
            hub.offline |= config.offline;
            loras = loras.with_hub(hub);
        }
        let loras = Arc::new(loras);

        let options = crate::generation::ModelOptions {
            device: config.device,
            dtype: Some(config.dtype),
            offline: config.offline,
            // Hub models resolved once: what the worker loads, sizes and describes to its result cache.
            pins: Some(Default::default()),
            ..Default::default()
        };
        let budget = config.max_resident_bytes.or_else(|| default_budget(config.device));
        let catalogue = Catalogue::new(&config.models, options, budget);
        catalogue.preload().await?;

        let client = bus::connect(&config.nats_url, &format!("sd-rbee worker {worker_id}"), Duration::from_secs(10))
            .await
            .context("--nats")?;
        let js = jetstream::new(client.clone());
        bus::ensure_streams(&js, &subjects, &config.streams).await?;
        let mut consumers = Vec::new();
        for spec in &config.models {
            consumers
                .push((spec.name.clone(), bus::jobs_consumers(&js, &subjects, &spec.name, &config.consumer).await?));
        }
        let device = match config.device {
            DeviceSpec::Cpu => match crate::diffusion::blas::vendor() {
                Some(blas) => format!("cpu ({} threads, BLAS {})", rayon::current_num_threads(), blas.path),
                None => format!("cpu ({} threads)", rayon::current_num_threads()),
            },
            other => other.to_string(),
        };
        let control = Control::default();
        let batcher = Batcher::start(
            BatchSettings {
                max_batch: config.max_batch,
                window: config.batch_window,
                concurrency: config.concurrency,
                step_delay: config.step_delay,
                device: config.device,
            },
            control.batches.clone(),
        );
        let shared = Arc::new(Shared {
            config,
            worker_id,
            hostname,
            device,
            client,
            js,
            subjects,
            store,
            catalogue,
            loras,
            control,
            batcher,
            model_identities: Default::default(),
            started: Instant::now(),
            stalled: CancellationToken::new(),
        });
        Ok(Self { shared, consumers })
    }

    pub fn id(&self) -> &str {
        &self.shared.worker_id
    }

    /// Its NATS connection (the probes report it).
    pub fn nats(&self) -> async_nats::Client {
        self.shared.client.clone()
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let shared = self.shared;
        let stop = CancellationToken::new();
        let beats_stop = CancellationToken::new();
        let mut background = JoinSet::new();
        // Heartbeats go on through the grace period: the worker is still there, finishing its jobs.
        background.spawn(heartbeats(shared.clone(), beats_stop.clone()));
        background.spawn(cancel_listener(shared.clone(), stop.clone()));
        background.spawn(undeliverable_listener(shared.clone()));
        // Enough jobs in hand to fill every batch that may run at once; with batches of several, as many
        // again, so the next batches are pulled and prepared while these run and start full, at once.
        let batch = shared.max_batch();
        let in_hand = shared.config.concurrency * batch * if batch > 1 { 2 } else { 1 };
        let slots = Arc::new(Semaphore::new(in_hand));
        let jobs = TaskTracker::new();
        let mut pullers = JoinSet::new();
        let backlog = Arc::new(pull::Backlog(self.consumers.clone()));
        for (model, queues) in self.consumers {
            let (slots, jobs, backlog, stop) = (slots.clone(), jobs.clone(), backlog.clone(), stop.clone());
            pullers.spawn(pull::pull(shared.clone(), model, queues, slots, jobs, backlog, stop));
        }
        send_heartbeat(&shared, false).await;
        tracing::info!(worker_id = %shared.worker_id, models = ?shared.catalogue.names(), resident = ?shared.catalogue.resident(), "ready");

        tokio::select! {
            () = shutdown => {}
            () = shared.stalled.cancelled() => {}
        }
        tracing::info!(running = shared.control.running(), "shutting down: no new jobs");
        stop.cancel();
        shared.control.hand_back_unstarted();
        while pullers.join_next().await.is_some() {}
        jobs.close();
        if tokio::time::timeout(shared.config.grace, jobs.wait()).await.is_err() {
            tracing::warn!("grace period over: handing running jobs to other workers");
            shared.control.stop_all(StopReason::Shutdown);
            // Each job answers its stop within a step, or when its step hangs, within the stall timeout (or
            // three times the step's time so far, when that is longer: see `BatchBeat::hung`). One still
            // running past this is left: its message is delivered to another worker once its ack wait passes.
            let patience = shared.config.stall_timeout + Duration::from_secs(30);
            if tokio::time::timeout(patience, jobs.wait()).await.is_err() {
                tracing::error!(
                    "jobs still running {patience:?} after they were stopped: leaving them to other workers"
                );
            }
        }
        beats_stop.cancel();
        send_heartbeat(&shared, true).await;
        // The goodbye must reach the server before the process ends: drain() returns before it has flushed.
        if !matches!(tokio::time::timeout(Duration::from_secs(5), shared.client.flush()).await, Ok(Ok(()))) {
            tracing::warn!("the last heartbeat may not have reached NATS");
        }
        background.abort_all();
        if let Err(e) = shared.client.drain().await {
            tracing::warn!(error = %e, "draining the NATS connection failed");
        }
        if shared.stalled.is_cancelled() {
            anyhow::bail!(
                "a generation step hung (--stall-timeout {}): the worker stopped so that it can be restarted",
                humantime::format_duration(shared.config.stall_timeout)
            );
        }
        tracing::info!("stopped");
        Ok(())
    }
}

impl Shared {
    /// The most images a batch may hold at any size: `--max-batch`, or the largest default on this device.
    pub fn max_batch(&self) -> usize {
        self.config.max_batch.unwrap_or_else(|| batcher::default_max_batch(self.config.device, 1, 1))
    }
}

/// The memory models may take when `--max-resident-bytes` is not given: half the machine's RAM on the CPU;
/// on GPUs, no limit (give one below the device memory to serve more models than fit).
fn default_budget(device: DeviceSpec) -> Option<u64> {
    if device != DeviceSpec::Cpu {
        return None;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024 / 2)
}

async fn send_heartbeat(shared: &Shared, stopping: bool) {
    let models = shared.catalogue.names();
    let hb = Heartbeat {
        v: PROTOCOL_VERSION,
        at: protocol::now_millis(),
        worker_id: shared.worker_id.clone(),
        hostname: shared.hostname.clone(),
        device: shared.device.clone(),
        models,
        loras: shared.loras.available(protocol::MAX_HEARTBEAT_LORAS).await,
        resident: shared.catalogue.resident(),
        state: shared.control.state(),
        jobs_done: shared.control.jobs_done.load(std::sync::atomic::Ordering::Relaxed),
        jobs_failed: shared.control.jobs_failed.load(std::sync::atomic::Ordering::Relaxed),
        uptime_s: shared.started.elapsed().as_secs(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        stopping,
        max_batch: shared.max_batch() as u32,
        batches: shared.control.batches.counts(),
        cache_hits: shared.control.cache_hits.load(std::sync::atomic::Ordering::Relaxed),
    };
    let Ok(subject) = shared.subjects.heartbeat(&shared.worker_id) else { return };
    if let Err(e) = shared.client.publish(subject, protocol::encode(&hb).into()).await {
        tracing::debug!(error = %e, "heartbeat not sent");
    }
}

async fn heartbeats(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.heartbeat_interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => send_heartbeat(&shared, false).await,
            _ = stop.cancelled() => return,
        }
    }
}

/// Cancel requests for any job (core NATS: only running workers need them).
async fn cancel_listener(shared: Arc<Shared>, stop: CancellationToken) {
    let mut sub = match shared.client.subscribe(shared.subjects.cancel_wildcard()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to cancel requests");
            return;
        }
    };
    let mut stopping = false;
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return },
            _ = stop.cancelled(), if !stopping => {
                // Keep listening while running jobs finish.
                if shared.control.running() == 0 { return }
                stopping = true;
                continue;
            }
        };
        match protocol::decode_cancel(&msg.payload) {
            Ok(req) => {
                let reason = if req.expired { StopReason::Timeout } else { StopReason::Cancelled };
                let running = shared.control.cancel(req.job_id, reason);
                tracing::info!(job_id = %req.job_id, running, "cancel request");
            }
            Err(e) => tracing::warn!(subject = %msg.subject, error = %e, "unreadable cancel request"),
        }
    }
}

/// Tries (every 5 s) after which a max-deliveries advisory that keeps failing is tried every 5 minutes.
const MAX_ADVISORY_TRIES: i64 = 720;

/// JetStream's advisories for jobs that reached `max_deliver` without settling, from the stream that keeps
/// them (so one sent while no worker ran is handled when one starts). Any worker can handle any model's.
async fn undeliverable_listener(shared: Arc<Shared>) {
    #[derive(serde::Deserialize)]
    struct MaxDeliveries {
        consumer: String,
        stream_seq: u64,
        deliveries: i64,
        #[serde(default)]
        timestamp: Option<String>,
    }
    loop {
        let result: anyhow::Result<()> = async {
            let stream = shared.js.get_stream(shared.subjects.advisories_stream()).await?;
            let mut consumer: jetstream::consumer::PullConsumer = stream
                .get_or_create_consumer(
                    bus::ADVISORY_CONSUMER,
                    jetstream::consumer::pull::Config {
                        durable_name: Some(bus::ADVISORY_CONSUMER.into()),
                        ack_policy: jetstream::consumer::AckPolicy::Explicit,
                        ack_wait: Duration::from_secs(60),
                        ..Default::default()
                    },
                )
                .await?;
            let mut messages = consumer.messages().await?;
            loop {
                let msg = bus::next_message(&mut consumer, &mut messages, Duration::from_secs(30)).await?;
                let tries = msg.info().map_or(1, |i| i.delivered);
                let handled = match serde_json::from_slice::<MaxDeliveries>(&msg.payload) {
                    Ok(a) => match bus::parse_consumer_name(&a.consumer) {
                        Some((model, _)) => {
                            let at = a.timestamp.as_deref().and_then(|t| async_nats::datetime::parse_rfc3339(t).ok());
                            let message = (a.stream_seq, at);
                            job::give_up_undeliverable(&shared, model, message, a.deliveries, tries).await
                        }
                        None => true,
                    },
                    Err(_) => true,
                };
                // The advisory is all that ends its job: never given up, but after an hour of failing (not the
                // server's passing trouble) tried every 5 minutes, said once.
                let kind = if handled {
                    jetstream::AckKind::Ack
                } else if tries >= MAX_ADVISORY_TRIES {
                    if tries == MAX_ADVISORY_TRIES {
                        tracing::error!(
                            tries,
                            "a max-deliveries advisory fails for an hour; trying it every 5 minutes"
                        );
                    }
                    jetstream::AckKind::Nak(Some(Duration::from_secs(300)))
                } else {
                    jetstream::AckKind::Nak(Some(Duration::from_secs(5)))
                };
                let _ = msg.ack_with(kind).await;
            }
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "max-deliveries advisories interrupted; resuming");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The stream may be gone (deleted, or lost with the server's store): create it again.
        if let Err(e) = bus::ensure_streams(&shared.js, &shared.subjects, &shared.config.streams).await {
            tracing::debug!(error = %e, "cannot bind the streams yet");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_are_subject_tokens() {
        let id = default_worker_id("gpu-node.example.com");
        protocol::validate_worker_id(&id).unwrap();
        assert!(id.starts_with("gpu-node-example-com-"));
        assert_ne!(default_worker_id("h"), default_worker_id("h"));
    }
}
