//! The client side of the bus, used by `sd-rbee submit` and the tests: publish a job, follow its events
//! (replayed from the events stream, so a late follower misses nothing), cancel it, fetch its images.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::{Stream, StreamExt};
use uuid::Uuid;

use crate::bus::{self, StreamSettings};
use crate::protocol::{self, CancelRequest, Event, JobRequest, Limits, Subjects, PROTOCOL_VERSION};

/// A connection to a fleet's bus.
#[derive(Clone)]
pub struct BusClient {
    client: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    limits: Limits,
}

impl BusClient {
    /// Connects to NATS at `url`, for the fleet under `prefix` (`sd` by default), and makes sure the streams
    /// exist so a job published before any worker starts is kept.
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<Self> {
        let subjects = Subjects::new(prefix).map_err(|e| anyhow::anyhow!("--prefix {e}"))?;
        let client = bus::connect(url, "sd-rbee client", Duration::from_secs(5)).await?;
        let js = jetstream::new(client.clone());
        bus::ensure_streams(&js, &subjects, &StreamSettings::default()).await?;
        Ok(Self { client, js, subjects, limits: Limits::default() })
    }

    /// A client on an existing connection (the streams must exist).
    pub fn from_parts(client: async_nats::Client, subjects: Subjects) -> Self {
        let js = jetstream::new(client.clone());
        Self { client, js, subjects, limits: Limits::default() }
    }

    /// Validates jobs against `limits` instead of the defaults (a queen with raised limits).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    /// Validates and publishes `job` (a retried publish of the same id is not a second job).
    pub async fn submit(&self, job: &JobRequest) -> anyhow::Result<()> {
        self.submit_with_seq(job).await.map(|_| ())
    }

    /// [`submit`](Self::submit), returning the job's sequence in the jobs stream.
    pub async fn submit_with_seq(&self, job: &JobRequest) -> anyhow::Result<u64> {
        bus::publish_job(&self.js, &self.subjects, job, &self.limits).await
    }

    /// The job's events in order, from its first one, then live; ends after the terminal event.
    pub async fn events(&self, job_id: Uuid) -> anyhow::Result<impl Stream<Item = anyhow::Result<Event>>> {
        let stream =
            self.js.get_stream(self.subjects.events_stream()).await.context("cannot bind the events stream")?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subjects.events(job_id),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .context("cannot follow the job's events")?;
        let messages = consumer.messages().await.context("cannot follow the job's events")?;
        let events = messages
            .map(|m| {
                let m = m.map_err(|e| anyhow::anyhow!("event stream: {e}"))?;
                protocol::decode_event(&m.payload).map_err(anyhow::Error::from)
            })
            .scan(false, |done, e| {
                if *done {
                    return futures::future::ready(None);
                }
                *done = matches!(&e, Ok(ev) if ev.is_terminal());
                futures::future::ready(Some(e))
            });
        Ok(events)
    }

    /// The job's events stored so far (does not wait for more).
    pub async fn stored_events(&self, job_id: Uuid) -> anyhow::Result<Vec<Event>> {
        let stream =
            self.js.get_stream(self.subjects.events_stream()).await.context("cannot bind the events stream")?;
        let messages = bus::stored_messages(&stream, self.subjects.events(job_id), consumer::DeliverPolicy::All)
            .await
            .context("cannot read the job's events")?;
        // An event this version cannot read is skipped, as when following live.
        let out = messages.iter().filter_map(|m| protocol::decode_event(&m.payload).ok()).collect();
        Ok(out)
    }

    /// Follows the job until its terminal event, calling `on_event` for each; `timeout` bounds the wait.
    pub async fn wait(
        &self,
        job_id: Uuid,
        timeout: Duration,
        mut on_event: impl FnMut(&Event),
    ) -> anyhow::Result<Event> {
        let events = self.events(job_id).await?;
        tokio::pin!(events);
        let follow = async {
            while let Some(event) = events.next().await {
                // An event this build cannot read (a newer type) is skipped, as the protocol says.
                let event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping an unreadable event");
                        continue;
                    }
                };
                on_event(&event);
                if event.is_terminal() {
                    return Ok(event);
                }
            }
            anyhow::bail!("the event stream of job {job_id} ended before the job did")
        };
        tokio::time::timeout(timeout, follow)
            .await
            .with_context(|| format!("job {job_id} did not finish within {} s", timeout.as_secs()))?
    }

    /// Asks whoever runs the job to stop.
    pub async fn cancel(&self, job_id: Uuid, reason: Option<String>) -> anyhow::Result<()> {
        let req = CancelRequest { v: PROTOCOL_VERSION, job_id, at: protocol::now_millis(), reason };
        self.client.publish(self.subjects.cancel(job_id), protocol::encode(&req).into()).await?;
        self.client.flush().await?;
        Ok(())
    }
}

/// One Server-Sent Event from the queen: its name and JSON data.
#[derive(Clone, Debug, PartialEq)]
pub struct SseMessage {
    pub event: String,
    pub data: serde_json::Value,
}

impl SseMessage {
    /// `completed`, `failed` or `cancelled`.
    pub fn is_terminal(&self) -> bool {
        matches!(self.event.as_str(), "completed" | "failed" | "cancelled")
    }
}

/// Parses SSE frames out of a byte buffer; returns the complete ones and leaves the rest.
pub fn parse_sse(buffer: &mut String) -> Vec<SseMessage> {
    let mut out = Vec::new();
    while let Some(end) = buffer.find("\n\n") {
        let frame: String = buffer.drain(..end + 2).collect();
        let (mut event, mut data) = (String::from("message"), String::new());
        for line in frame.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if data.is_empty() {
            continue; // a keep-alive comment
        }
        let data = serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data));
        out.push(SseMessage { event, data });
    }
    out
}

/// The queen's HTTP API, as the CLI and the tests use it.
#[derive(Clone)]
pub struct QueenClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// An API error: the HTTP status and the `{error: {code, message, field}}` body.
#[derive(Debug, thiserror::Error)]
#[error("HTTP {status}: {code}: {message}{}", field.as_deref().map(|f| format!(" (field {f})")).unwrap_or_default())]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub field: Option<String>,
}

impl QueenClient {
    /// `base` like `http://127.0.0.1:8080`; `token` for `Authorization: Bearer`.
    pub fn new(base: &str, token: Option<String>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build()?;
        Ok(Self { base: base.trim_end_matches('/').to_string(), token, http })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    async fn check(response: reqwest::Response) -> anyhow::Result<reqwest::Response> {
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let e = &body["error"];
        Err(ApiError {
            status,
            code: e["code"].as_str().unwrap_or("HTTP").to_string(),
            message: e["message"].as_str().unwrap_or("request failed").to_string(),
            field: e["field"].as_str().map(String::from),
        }
        .into())
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, method: reqwest::Method, path: &str) -> anyhow::Result<T> {
        let response =
            self.request(method, path).send().await.with_context(|| format!("cannot reach {}", self.base))?;
        Ok(Self::check(response).await?.json().await?)
    }

    /// `POST /v1/jobs`.
    pub async fn submit(
        &self,
        job: &crate::queen::api::JobSubmission,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<crate::queen::api::SubmitResponse> {
        let mut r = self.request(reqwest::Method::POST, "/v1/jobs").json(job);
        if let Some(k) = idempotency_key {
            r = r.header("Idempotency-Key", k);
        }
        let response = r.send().await.with_context(|| format!("cannot reach {}", self.base))?;
        Ok(Self::check(response).await?.json().await?)
    }

    /// `GET /v1/jobs/{id}`.
    pub async fn status(&self, job_id: Uuid) -> anyhow::Result<crate::queen::api::StatusView> {
        self.json(reqwest::Method::GET, &format!("/v1/jobs/{job_id}")).await
    }

    /// `DELETE /v1/jobs/{id}`.
    pub async fn cancel(&self, job_id: Uuid) -> anyhow::Result<crate::queen::api::CancelResponse> {
        self.json(reqwest::Method::DELETE, &format!("/v1/jobs/{job_id}")).await
    }

    /// `GET /v1/jobs?...`.
    pub async fn jobs(&self, query: &str) -> anyhow::Result<crate::queen::api::JobList> {
        self.json(reqwest::Method::GET, &format!("/v1/jobs{query}")).await
    }

    /// `GET /v1/workers`.
    pub async fn workers(&self) -> anyhow::Result<serde_json::Value> {
        self.json(reqwest::Method::GET, "/v1/workers").await
    }

    /// Image `n` of a completed job: through its URL when it is absolute (presigned), else the queen.
    pub async fn image(&self, job_id: Uuid, n: u32) -> anyhow::Result<Vec<u8>> {
        let response = self
            .request(reqwest::Method::GET, &format!("/v1/jobs/{job_id}/images/{n}"))
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        Ok(Self::check(response).await?.bytes().await?.to_vec())
    }

    /// Follows `GET /v1/jobs/{id}/events`, calling `on_event` for each, until the terminal event.
    pub async fn follow(&self, job_id: Uuid, mut on_event: impl FnMut(&SseMessage)) -> anyhow::Result<SseMessage> {
        let response = self
            .request(reqwest::Method::GET, &format!("/v1/jobs/{job_id}/events"))
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let mut body = Self::check(response).await?.bytes_stream();
        let (mut raw, mut buffer) = (Vec::new(), String::new());
        while let Some(chunk) = body.next().await {
            // Only whole frames are decoded, so a character split across chunks stays whole.
            raw.extend_from_slice(&chunk?);
            if let Some(end) = raw.windows(2).rposition(|w| w == b"\n\n") {
                let complete: Vec<u8> = raw.drain(..end + 2).collect();
                buffer.push_str(&String::from_utf8_lossy(&complete));
            }
            for message in parse_sse(&mut buffer) {
                on_event(&message);
                if message.is_terminal() {
                    return Ok(message);
                }
            }
        }
        anyhow::bail!("the event stream of job {job_id} ended before the job did")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_frames_are_parsed_across_chunks() {
        let mut buf = String::from("event: queued\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: progress\ndata: {\"st");
        let got = parse_sse(&mut buf);
        assert_eq!(got, [SseMessage { event: "queued".into(), data: serde_json::json!({"a": 1}) }]);
        buf.push_str("ep\":2}\n\n");
        let got = parse_sse(&mut buf);
        assert_eq!(got[0].event, "progress");
        assert_eq!(got[0].data["step"], 2);
        assert!(buf.is_empty());
    }
}
