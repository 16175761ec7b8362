//! The worker's probes for container runtimes and Kubernetes (`--health-listen ADDR`): `GET /health` answers
//! 200 while the process runs; `GET /ready` answers 200 once the models are loaded and the job consumers
//! bound, and 503 while the worker starts, drains (after SIGTERM) or is cut off from NATS (it reconnects by
//! itself, so liveness does not depend on it). Its own small server, started before
//! the models load, so a probe never mistakes a long load for a dead process.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

/// Where the worker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Starting = 0,
    Ready = 1,
    Draining = 2,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
        }
    }
}

/// The phase the probes report, shared with whoever moves it on, and the worker's NATS connection once it
/// has one (a ready worker cut off from NATS is not ready: it can neither take jobs nor report them).
#[derive(Clone, Default)]
pub struct Health(Arc<AtomicU8>, Arc<std::sync::OnceLock<async_nats::Client>>);

impl Health {
    pub fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::Relaxed);
    }

    /// Ready, on `nats`.
    pub fn ready(&self, nats: async_nats::Client) {
        let _ = self.1.set(nats);
        self.set(Phase::Ready);
    }

    pub fn phase(&self) -> Phase {
        match self.0.load(Ordering::Relaxed) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    fn connected(&self) -> bool {
        self.1.get().is_none_or(|c| c.connection_state() == async_nats::connection::State::Connected)
    }
}

fn app(health: Health) -> Router {
    Router::new().route("/health", get(alive)).route("/ready", get(ready)).with_state(health)
}

async fn alive(State(health): State<Health>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "phase": health.phase().name()}))
}

async fn ready(State(health): State<Health>) -> Response {
    let phase = health.phase();
    let (status, name) = match phase {
        Phase::Ready if !health.connected() => (StatusCode::SERVICE_UNAVAILABLE, "disconnected from NATS"),
        Phase::Ready => (StatusCode::OK, phase.name()),
        _ => (StatusCode::SERVICE_UNAVAILABLE, phase.name()),
    };
    (status, Json(serde_json::json!({"status": name}))).into_response()
}

/// Binds `addr` (an error names it) and serves the probes in the background for as long as the runtime
/// runs; returns the bound address.
pub async fn serve(addr: SocketAddr, health: Health) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--health-listen: cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(crate::http_server::serve(listener, app(health), std::future::pending()));
    Ok(bound)
}
