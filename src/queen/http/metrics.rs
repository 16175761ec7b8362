//! `GET /metrics`: the queen's kept metrics (jobs by state, generation and step times) and what it reads at
//! scrape time from memory and one stream-info request (queue depth by model, workers by liveness and by
//! model, each worker's own counters), encoded by `prometheus-client`. No scrape reads the status bucket.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::auth::Caller;
use super::error::ApiResult;
use super::{AppError, AppState};
use crate::api::{ApiErrorBody, ApiErrorCode};
use crate::protocol;
use crate::queen::metrics::{Escaped, ModelLabel, StateLabel};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerJobsLabels {
    worker: Escaped,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerBatchLabels {
    worker: Escaped,
    /// Images in the batch.
    size: u64,
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus / OpenMetrics text format", content_type = "application/openmetrics-text"),
        (status = 403, description = "a tenant's token: metrics are for operators'", body = ApiErrorBody),
        (status = 503, description = "NATS cannot be reached: the queue depth cannot be read", body = ApiErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn metrics(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Response> {
    caller.operator_only("the fleet's metrics")?;
    let jobs = &state.jobs;
    let mut registry = Registry::default();
    jobs.stats.metrics.register(&mut registry);

    let depth = Family::<ModelLabel, Gauge>::default();
    // Workers by model: "jobs and no worker" is a per-model question (a fleet busy with one model leaves
    // another's queue unserved).
    let serving = Family::<ModelLabel, Gauge>::default();
    // A model whose queue is empty has no subject in the stream: its depth is 0, not missing (an alert on
    // a missing series never fires), and so is the count of its workers. First, so that the catalogue's
    // models are named within the bound.
    for model in jobs.catalogue().await {
        let label = jobs.stats.metrics.model_label(&model);
        let _ = (depth.get_or_create(&label), serving.get_or_create(&label));
    }
    // A depth that cannot be read fails the scrape (Prometheus' `up` says so): zeros in its place would end
    // the backlog alerts, and scale a fleet driven by them to nothing, while jobs wait.
    let unreadable = |e: &dyn std::fmt::Display| {
        AppError::new(ApiErrorCode::Unavailable, format!("cannot read the queue depth from NATS: {e}"))
    };
    let subjects = jobs.bus.subjects();
    let stream = jobs.bus.jetstream().get_stream(subjects.jobs_stream()).await.map_err(|e| unreadable(&e))?;
    let mut info = stream.info_with_subjects(subjects.jobs_wildcard()).await.map_err(|e| unreadable(&e))?;
    while let Some(page) = info.next().await {
        let (subject, count) = page.map_err(|e| unreadable(&e))?;
        // A model's priorities are three subjects: their counts add up. Past the bound on model labels,
        // models share one (queues of models no worker serves stay on the bus).
        if let Some(model) = subjects.model_of_jobs_subject(&subject) {
            let label = jobs.stats.metrics.model_label(model);
            depth.get_or_create(&label).inc_by(count as i64);
            // A queued model no worker ever advertised to this queen has its 0 too.
            let _ = serving.get_or_create(&label);
        }
    }
    registry.register("sd_rbee_queue_depth", "Jobs in the work queue (waiting or running), by model", depth);

    let now = protocol::now_millis();
    for model in jobs.fleet.models(now) {
        serving.get_or_create(&jobs.stats.metrics.model_label(&model.name)).inc_by(model.workers as i64);
    }
    registry.register("sd_rbee_model_workers", "Live workers serving each model", serving);

    let workers = jobs.fleet.workers(now);
    let liveness = Family::<StateLabel, Gauge>::default();
    for state in ["busy", "idle", "lost", "stopped"] {
        let _ = liveness.get_or_create(&StateLabel { state });
    }
    let worker_jobs = Family::<WorkerJobsLabels, Gauge>::default();
    let worker_batches = Family::<WorkerBatchLabels, Gauge>::default();
    for w in &workers {
        liveness.get_or_create(&StateLabel { state: w.liveness() }).inc();
        let worker = Escaped(w.heartbeat.worker_id.clone());
        let counts =
            [("done", w.heartbeat.jobs_done), ("failed", w.heartbeat.jobs_failed), ("cached", w.heartbeat.cache_hits)];
        for (outcome, n) in counts {
            let labels = WorkerJobsLabels { worker: worker.clone(), outcome };
            worker_jobs.get_or_create(&labels).set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for (i, &n) in w.heartbeat.batches.iter().enumerate().filter(|(_, &n)| n > 0) {
            let labels = WorkerBatchLabels { worker: worker.clone(), size: i as u64 + 1 };
            worker_batches.get_or_create(&labels).set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    registry.register("sd_rbee_workers", "Workers by liveness", liveness);
    registry.register(
        "sd_rbee_worker_jobs",
        "Jobs each worker reports done or failed since it started; cached: of the done, those answered from the result cache",
        worker_jobs,
    );
    registry.register(
        "sd_rbee_worker_batches",
        "Batches each worker has run since it started, by size (images sharing UNet passes)",
        worker_batches,
    );

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).map_err(AppError::internal)?;
    let content_type = HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8");
    Ok(([(header::CONTENT_TYPE, content_type)], out).into_response())
}
