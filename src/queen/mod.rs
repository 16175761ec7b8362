//! `sd-rbee queen`: the control plane. It publishes jobs onto the bus, folds the workers' events into a
//! status bucket, follows the fleet's heartbeats and serves the HTTP API. It keeps no state of its own
//! beyond NATS, so several queens can run side by side behind a load balancer.
//!
//! # Layout
//!
//! - this file: [`QueenConfig`] and [`Queen`] (start, serve, shut down);
//! - `http`: the HTTP API ([`http::app`]), thin handlers over the job service;
//! - `jobs`: the job service ([`jobs::Jobs`]): submit, list, cancel, images, the model catalogue;
//! - `submit`: a submission's checks, its idempotency key, queuing it (again, when the bus did not confirm);
//! - `queue`: where a job stands: its status view with queue position and ETA, queue depths;
//! - `queue_walk`: the queues walked once for every caller asking where a job stands (`QueueWalks`);
//! - `feed`: a job's events for Server-Sent Events, resumable; `index`: the jobs in order, for paged lists;
//! - `expiry`: jobs' ttl and its schedule; `sweeper`: deletes expired jobs' objects, stops them;
//! - `work_queue`: the queens' own work queues (the expiry schedule, webhook deliveries);
//! - `webhooks`: signed webhooks: the durable delivery queue, the address policy, the sender;
//! - `completion`: waiting for a job's images, for the APIs that answer with them (OpenAI's, A1111's);
//! - `status`: the status bucket; `aggregator`: folds worker events into it; `fleet`: the heartbeats;
//! - `metrics`: the counts `/metrics` serves, kept as things happen;
//! - `tenancy`: whose jobs a request sees ([`tenancy::Scope`]), from its token's tenant; `rate`: how fast
//!   a token may submit.

pub mod aggregator;
pub mod completion;
pub mod expiry;
pub mod feed;
pub mod fleet;
pub mod http;
pub mod index;
pub mod jobs;
pub mod metrics;
pub mod queue;
mod queue_walk;
pub mod rate;
pub mod status;
mod submit;
pub mod sweeper;
pub mod tenancy;
pub mod webhooks;
pub mod work_queue;

pub use submit::{Submitter, PUBLISH_CONFIRM_WINDOW};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::bus::BusClient;
use crate::bus::{self, StreamSettings};
use crate::protocol::Subjects;
use crate::storage::{Store, StoreOptions};
use http::{ApiConfig, AppState};

/// How long requests in flight may take to finish after the shutdown signal (Kubernetes' default grace is
/// 30 s; event streams and waits for jobs end at once).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Everything a queen is configured with.
#[derive(Clone, Debug)]
pub struct QueenConfig {
    pub nats_url: String,
    /// The fleet's object store (uploads, and images proxied for stores without presigned URLs).
    pub store_url: String,
    pub listen: SocketAddr,
    pub prefix: String,
    pub api: ApiConfig,
    /// How long job status is kept.
    pub status_max_age: Duration,
    /// The ttl of jobs that give none (`--default-ttl`).
    pub default_ttl: Option<Duration>,
    /// A worker silent this long is lost (three heartbeat intervals).
    pub worker_lost_after: Duration,
    pub store: StoreOptions,
    pub webhooks: webhooks::WebhookConfig,
    /// How often a live event feed reads its job's record, to end a feed whose terminal event was lost.
    pub feed_recheck: Duration,
    /// How long after its submission a keyed job whose publish the bus did not confirm is published again
    /// before it is failed (100 s: inside the jobs stream's duplicate window).
    pub publish_confirm_window: Duration,
}

impl QueenConfig {
    pub fn new(nats_url: impl Into<String>, store_url: impl Into<String>, listen: SocketAddr) -> Self {
        Self {
            nats_url: nats_url.into(),
            store_url: store_url.into(),
            listen,
            prefix: crate::protocol::DEFAULT_PREFIX.into(),
            api: ApiConfig::default(),
            status_max_age: Duration::from_secs(7 * 24 * 3600),
            default_ttl: None,
            worker_lost_after: Duration::from_secs(3 * crate::protocol::HEARTBEAT_INTERVAL_SECS),
            store: StoreOptions::default(),
            webhooks: webhooks::WebhookConfig::default(),
            feed_recheck: feed::RECHECK,
            publish_confirm_window: submit::PUBLISH_CONFIRM_WINDOW,
        }
    }
}

/// A queen serving on its listener.
pub struct Queen {
    pub addr: SocketAddr,
    state: AppState,
    listener: tokio::net::TcpListener,
    tasks: tokio::task::JoinSet<()>,
    stop: tokio_util::sync::CancellationToken,
}

impl Queen {
    /// Connects, binds the streams, the status bucket and the listener, and starts following events and
    /// heartbeats.
    pub async fn start(config: QueenConfig) -> anyhow::Result<Self> {
        let subjects = Subjects::new(config.prefix.clone()).map_err(|e| anyhow::anyhow!("--prefix {e}"))?;
        let store = Store::open(&config.store_url, &config.store).context("--store")?;
        store.check().await.context("--store")?;
        let client =
            bus::connect(&config.nats_url, "sd-rbee queen", Duration::from_secs(10)).await.context("--nats")?;
        let js = async_nats::jetstream::new(client.clone());
        bus::ensure_streams(&js, &subjects, &StreamSettings::default()).await?;
        for model in &config.api.model_catalogue {
            bus::ensure_jobs_consumer(&js, &subjects, model).await?;
        }
        let status = status::StatusStore::open(&js, &subjects.status_bucket(), config.status_max_age).await?;
        let index = index::JobIndex::open(&js, &subjects, config.status_max_age).await?;
        let expiry = expiry::Expiry::open(&js, &subjects, config.default_ttl).await?;
        let webhooks = webhooks::Webhooks::open(&js, &subjects, config.webhooks).await?;
        let fleet = fleet::Fleet::new(config.worker_lost_after);
        let stats = aggregator::ModelStats::default();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(fleet.clone().listen(client.clone(), subjects.clone()));
        let aggregation =
            aggregator::Aggregation { status: status.clone(), index: index.clone(), stats: stats.clone() };
        tasks.spawn(aggregator::run(js.clone(), subjects.clone(), aggregation, webhooks.clone()));
        tasks.spawn(webhooks::sender::run(webhooks.clone(), status.clone()));
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let stop = tokio_util::sync::CancellationToken::new();
        let mut api = config.api;
        // An inline image travels inside its job's message: none over the bus's limit can be sent, and the
        // limits say so (`GET /v1/limits`, which the web UI reads to upload larger ones first).
        let max_payload = client.server_info().max_payload;
        api.limits.max_inline_image_bytes = api.limits.max_inline_image_bytes.min(max_payload);
        let jobs = jobs::Jobs {
            bus: BusClient::from_parts(client, subjects).with_limits(api.limits.clone()),
            status,
            index,
            store,
            fleet,
            stats,
            limits: api.limits.clone(),
            models: jobs::ModelPolicy {
                require_known: api.require_served_model,
                catalogue: api.model_catalogue.clone(),
                retention: api.model_retention,
            },
            expiry,
            webhooks,
            feed_recheck: config.feed_recheck,
            publish_confirm_window: config.publish_confirm_window,
            walks: Default::default(),
            submit_rates: Default::default(),
        };
        tasks.spawn(sweeper::run(jobs.clone()));
        let tokens = http::TokenTable::new(http::Tokens::new(api.tokens.clone(), api.token_policies.clone()));
        if let Some(source) = api.token_source.clone() {
            // Listened to from here on: a SIGHUP just after the start reads the file rather than stopping.
            let hangups = http::token_hangups(&source);
            tasks.spawn(http::tokens_watch(tokens.clone(), source, hangups, stop.clone()));
        }
        let state = AppState {
            jobs,
            config: Arc::new(api),
            shutdown: stop.clone(),
            a1111_jobs: Default::default(),
            streams: Default::default(),
            tokens,
        };
        Ok(Self { addr, state, listener, tasks, stop })
    }

    /// Serves the API until `shutdown` resolves, then finishes the requests in flight and drains NATS.
    pub async fn serve(
        mut self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let app = http::app(self.state.clone());
        tracing::info!(addr = %self.addr, "queen listening");
        let stop = self.stop.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: finishing requests in flight, ending event streams");
            stop.cancel();
        };
        let server = crate::http_server::serve(self.listener, app, signal);
        // A request stuck on a backend that went away must not hold the process past its orchestrator's patience.
        let stopped = self.stop.clone();
        let grace_over = async move {
            stopped.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        // A background task that panics (following events, heartbeats, expiries, webhooks) would leave a queen
        // that answers while its job records stop moving: stop instead, so that the orchestrator restarts it.
        // Tasks may also end on their own (no webhooks configured), which is not a failure.
        let tasks = &mut self.tasks;
        let panicked = async move {
            while let Some(ended) = tasks.join_next().await {
                if ended.is_err_and(|e| e.is_panic()) {
                    return;
                }
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = server => {}
            () = grace_over => tracing::warn!(
                "requests still open {}s after the shutdown signal: closing them", SHUTDOWN_GRACE.as_secs()
            ),
            () = panicked => {
                self.stop.cancel();
                self.tasks.abort_all();
                anyhow::bail!("a background task of the queen panicked (see above): stopping so that it can be restarted");
            }
        }
        self.tasks.abort_all();
        let _ = self.state.jobs.bus.nats().drain().await;
        tracing::info!("queen stopped");
        Ok(())
    }
}
