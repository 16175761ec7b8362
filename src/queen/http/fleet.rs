//! The fleet's endpoints: the model catalogue, the workers, and the queen's own health and readiness.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::auth::Caller;
use super::error::ApiResult;
use super::AppState;
use crate::api::{ApiErrorBody, LimitsView, ModelInfo, WorkerInfo};
use crate::protocol;

/// The models jobs may name: those live workers serve (with their LoRAs and the registry's defaults), then
/// those of the catalogue no live worker serves now (`workers: 0`; their jobs wait for one), each with its
/// queue depth.
#[utoipa::path(get, path = "/v1/models", tag = "fleet", responses((status = 200, body = Vec<ModelInfo>)),
    security(("bearer" = [])))]
pub(super) async fn models(State(state): State<AppState>) -> Json<Vec<ModelInfo>> {
    let defaults = |name: &str| {
        crate::hub::registry_entry(name).map(|e| {
            serde_json::json!({"repo": e.repo, "width": e.width, "height": e.height, "steps": e.steps,
                               "guidance": e.guidance, "scheduler": e.scheduler})
        })
    };
    let served = state.jobs.fleet.models(protocol::now_millis());
    let mut out: Vec<ModelInfo> = served
        .iter()
        .map(|m| ModelInfo {
            name: m.name.clone(),
            workers: m.workers,
            resident_workers: m.resident_workers,
            queued: None,
            loras: m.loras.clone(),
            defaults: defaults(&m.name),
        })
        .collect();
    for name in state.jobs.catalogue().await {
        if !served.iter().any(|m| m.name == name) {
            let (workers, resident_workers, queued, loras) = (0, 0, None, Vec::new());
            out.push(ModelInfo { defaults: defaults(&name), name, workers, resident_workers, queued, loras });
        }
    }
    let names: Vec<&str> = out.iter().map(|m| m.name.as_str()).collect();
    let depths = state.jobs.queue_depths(&names).await;
    for (model, queued) in out.iter_mut().zip(depths) {
        model.queued = queued;
    }
    Json(out)
}

/// The fleet's workers, with the jobs they run: for operators' tokens (a tenant's is refused, 403).
#[utoipa::path(get, path = "/v1/workers", tag = "fleet",
    responses((status = 200, body = Vec<WorkerInfo>), (status = 403, description = "a tenant's token", body = ApiErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn workers(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Vec<WorkerInfo>>> {
    caller.operator_only("the fleet's workers")?;
    Ok(Json(state.jobs.fleet.workers(protocol::now_millis())))
}

/// What a job may ask for here (sizes, steps, images, LoRAs, body sizes) and the choices its fields take.
#[utoipa::path(get, path = "/v1/limits", tag = "fleet", responses((status = 200, body = LimitsView)),
    security(("bearer" = [])))]
pub(super) async fn limits(State(state): State<AppState>) -> Json<LimitsView> {
    Json(LimitsView::new(state.config.limits.clone(), state.config.max_body_bytes))
}

#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, description = "the process is up")))]
pub(super) async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, description = "NATS reachable, streams present"), (status = 503, description = "not ready")))]
pub(super) async fn ready(State(state): State<AppState>) -> Response {
    let bus = &state.jobs.bus;
    let connected = bus.nats().connection_state() == async_nats::connection::State::Connected;
    let mut problems = Vec::new();
    if !connected {
        problems.push("not connected to NATS".to_string());
    } else {
        let subjects = bus.subjects();
        for stream in [subjects.jobs_stream(), subjects.events_stream(), subjects.dlq_stream()] {
            let check = tokio::time::timeout(Duration::from_secs(2), bus.jetstream().get_stream(&stream)).await;
            if !matches!(check, Ok(Ok(_))) {
                problems.push(format!("stream {stream} unavailable"));
            }
        }
    }
    if problems.is_empty() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "not ready", "problems": problems})))
            .into_response()
    }
}
